"""Fast-weight attention: a feature map, an update rule and a normalisation, in two forms that agree.

    S_t = update(S_{t-1}, phi(k_t), v_t)        o_t = normalise(phi(q_t) S_t)

with the state S [B, H, m, D] (key features x values; the paper writes its transpose, D x m). The three
choices are independent config options (`attention.feature_map`, `.update_rule`, `.normalization`):

    update_rule   add      S_t = S_{t-1} + phi(k_t)^T v_t                                  (Katharopoulos et al. 2020)
                  gated    S_t = g_t S_{t-1} + (1 - g_t) phi(k_t)^T v_t, g_t = sigmoid(w_h . x_t + b_h)   (RFA, Peng et al. 2021)
                  delta    S_t = S_{t-1} + beta_t phi(k_t)^T (v_t - phi(k_t) S_{t-1}), beta_t = sigmoid(w_h . x_t + b_h)
                                                                                           (Schlag et al. 2021)
                  decay    S_t = diag(f_t) S_{t-1} diag(z_t) + phi(k_t)^T v_t,  f_t = sigmoid(W_f x_t + b_f) in (0,1)^m,
                                                                    z_t = sigmoid(W_z x_t + b_z) in (0,1)^D  (DFW, Mao 2022)
    normalization none         o_t = phi(q_t) S_t / sqrt(D)
                  denominator  o_t = phi(q_t) S_t / max(phi(q_t) . z_t, eps), z_t updated like S_t with v = 1
                  sum          phi(x) <- phi(x) / max(sum_i phi(x)_i, eps) for queries and keys (Schlag et al. 2021)

x_t is the input of the attention block. Decaying fast weights is `feature_map=linear,
update_rule=decay, normalization=none`.

The parallel form of add, gated and decay is the chunkwise op of `dfw_kernels` (the CUDA kernel on GPU
when available): gated is its scalar key-side gate log g_t with keys scaled by 1 - g_t. The delta rule
has its own chunkwise (WY/UT) form in `delta.py`. The recurrent forms are the loops over time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dfw_kernels import KERNELS, decay_fast_weights, decay_fast_weights_step, recurrent_decay_fast_weights
from torch import Tensor, nn

from ..errors import ConfigError
from .base import AttentionCore, State
from .delta import chunk_delta_rule, recurrent_delta_rule
from .feature_maps import FEATURE_MAPS

UPDATE_RULES = ("add", "gated", "delta", "decay")
NORMALIZATIONS = ("none", "denominator", "sum")
GATES = ("key", "value", "both")
# Feature maps whose phi(q) . phi(k) estimates a positive kernel, so a denominator z^T phi(q) is
# (close to) positive: every non-negative map, and RFA's signed random Fourier features as in RFA.
DENOMINATOR_FEATURE_MAPS = ("elu", "relu_mlp", "favor", "rff", "dpfp", "hedgehog")


def uniform_gate_bias(n: int) -> Tensor:
    """b = logit(u) with u spread evenly over (1/n, 1 - 1/n) across n channels.

    Retention then spans time scales from ~1 token (u = 1/n) to ~n tokens (u = 1 - 1/n).
    """
    u = torch.linspace(1.0 / n, 1.0 - 1.0 / n, n) if n > 1 else torch.full((1,), 0.5)
    return torch.logit(u)


def head_gate_bias(num_heads: int, shortest: float = 32.0, longest: float = 1024.0) -> Tensor:
    """Scalar gate biases b_h = logit(1 - 1/tau_h), tau_h log-spaced over [shortest, longest] tokens.

    Our choice for RFA's gate (the papers do not state one): every head starts with a long memory,
    close to the ungated update, and the heads span time scales from 32 to 1024 tokens (GPT-2's context).
    """
    tau = torch.logspace(math.log10(shortest), math.log10(longest), num_heads) if num_heads > 1 else torch.tensor([128.0])
    return torch.log(tau - 1.0)  # logit(1 - 1/tau)


class FastWeightAttention(AttentionCore):
    """Arguments after `scaling` are the attention config (conf/attention/*.yaml):

    feature_map: a key of FEATURE_MAPS.            update_rule: add | gated | delta | decay.
    normalization: none | denominator | sum.       state_size: m; null for the feature map's natural size.
    gates: decay only, which side is gated (key | value | both).
    output_norm: LayerNorm over each head's output (off in the paper).
    chunk_size: tokens per chunk of the parallel form.   kernel: auto | cuda | torch (add, gated, decay).
    eps: clamp of the denominator and of feature sums.
    redraw_interval, seed: random feature maps (favor, rff): redraw every N training calls (null: never),
        deterministically from (seed, layer_idx, draw number).
    learned_scale: rff, learn RFA's per-dimension scale.   dpfp_order: dpfp, nu.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        scaling: float | None = None,
        *,
        feature_map: str = "linear",
        update_rule: str = "decay",
        normalization: str = "none",
        state_size: int | None = None,
        gates: str = "both",
        output_norm: bool = False,
        chunk_size: int = 64,
        kernel: str = "auto",
        eps: float = 1e-6,
        redraw_interval: int | None = None,
        seed: int = 0,
        learned_scale: bool = True,
        dpfp_order: int = 1,
    ):
        super().__init__()
        _check_choice("attention.feature_map", feature_map, FEATURE_MAPS)
        _check_choice("attention.update_rule", update_rule, UPDATE_RULES)
        _check_choice("attention.normalization", normalization, NORMALIZATIONS)
        _check_choice("attention.kernel", kernel, KERNELS)
        if state_size is not None and (not isinstance(state_size, int) or state_size <= 0):
            raise ConfigError(f"attention.state_size must be a positive integer or null, got {state_size!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
            raise ConfigError(f"attention.chunk_size must be a positive multiple of 16, got {chunk_size!r}")
        if update_rule == "decay":
            _check_choice("attention.gates", gates, GATES)
        _check_combination(feature_map, update_rule, normalization)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.feature_map_name, self.update_rule, self.normalization = feature_map, update_rule, normalization
        self.chunk_size, self.kernel, self.eps = chunk_size, kernel, eps
        options = dict(
            redraw_interval=redraw_interval, seed=seed, layer_idx=layer_idx,
            learned_scale=learned_scale, dpfp_order=dpfp_order,
        )  # fmt: skip
        try:
            self.feature_map = FEATURE_MAPS[feature_map](num_heads, head_dim, state_size, options)
        except ValueError as err:
            raise ConfigError(f"attention: {err}") from None
        self.state_size = self.feature_map.output_size  # m
        # Without a normaliser the read phi(q) S is scaled like softmax's logits (1/sqrt(D));
        # with one, a constant factor on phi(q) cancels.
        self.read_scale = (head_dim**-0.5 if scaling is None else scaling) if normalization == "none" else 1.0

        # New parameters of the update rules, all computed from the block input x. Weights start at
        # zero, so at conversion every gate is a constant set by its bias (README, "Conversion: what is new").
        self.key_gate = self.value_gate = self.head_gate = self.write_strength = None
        if update_rule == "decay" and gates in ("key", "both"):
            self.key_gate = self._gate(hidden_size, self.state_size, uniform_gate_bias(self.state_size).repeat(num_heads))  # f_t, (C -> H*m)
        if update_rule == "decay" and gates in ("value", "both"):
            self.value_gate = self._gate(hidden_size, head_dim, uniform_gate_bias(head_dim).repeat(num_heads))  # z_t, (C -> H*D)
        if update_rule == "gated":
            self.head_gate = self._gate(hidden_size, 1, head_gate_bias(num_heads))  # g_t, (C -> H)
        if update_rule == "delta":
            # beta_t = sigmoid(0) = 1/2 at conversion: our choice (Schlag et al. do not state one).
            self.write_strength = self._gate(hidden_size, 1, torch.zeros(num_heads))  # beta_t, (C -> H)
        self.output_norm = nn.LayerNorm(head_dim) if output_norm else None

    def _gate(self, hidden_size: int, width: int, bias: Tensor) -> nn.Linear:
        """A (C -> H * width) projection with zero weights and the given bias [H * width]."""
        gate = nn.Linear(hidden_size, self.num_heads * width)
        nn.init.zeros_(gate.weight)
        with torch.no_grad():
            gate.bias.copy_(bias)
        return gate

    def _features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            self.feature_map.training_call()  # random features redraw on their schedule
        phi_q = self.feature_map(q, is_query=True)  # (B, T, H, m)
        phi_k = self.feature_map(k)  # (B, T, H, m)
        if self.normalization == "sum":
            phi_q = phi_q / phi_q.sum(-1, keepdim=True).clamp_min(self.eps)
            phi_k = phi_k / phi_k.sum(-1, keepdim=True).clamp_min(self.eps)
        return phi_q * self.read_scale, phi_k

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor):
        """Token-wise inputs of the recurrence: features, values and gates, all [B, T, H, *]."""
        B, T, H, D = q.shape
        phi_q, phi_k = self._features(q, k)
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # gates in float32 under bf16 autocast
        if self.update_rule == "delta":
            beta = torch.sigmoid(self.write_strength(x).to(gate_dtype)).view(B, T, H, 1)  # (B, T, H, 1)
            return phi_q, phi_k, v, beta, None
        log_f = None if self.key_gate is None else F.logsigmoid(self.key_gate(x).to(gate_dtype)).view(B, T, H, -1)
        log_z = None if self.value_gate is None else F.logsigmoid(self.value_gate(x).to(gate_dtype)).view(B, T, H, -1)
        if self.head_gate is not None:
            logit = self.head_gate(x).to(gate_dtype).view(B, T, H, 1)  # (B, T, H, 1)
            log_f = F.logsigmoid(logit)  # log g_t, one scalar per head
            phi_k = phi_k * F.logsigmoid(-logit).exp().to(phi_k.dtype)  # (1 - g_t) phi(k_t)
        if self.normalization == "denominator":
            # Carry z_t = sum_s decay * phi(k_s) as one more value column of ones (never value-gated).
            v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)  # (B, T, H, D + 1)
            if log_z is not None:
                log_z = F.pad(log_z, (0, 1))  # (B, T, H, D + 1)
        return phi_q, phi_k, v, log_f, log_z

    def _finish(self, o: Tensor) -> Tensor:
        if self.normalization == "denominator":
            o = o[..., :-1] / o[..., -1:].clamp_min(self.eps)  # (B, T, H, D)
        if self.output_norm is not None:
            o = self.output_norm(o)
        return o

    def forward(self, q, k, v, x, state: State = None, output_state: bool = False) -> tuple[Tensor, State]:
        phi_q, phi_k, v, gate_a, gate_b = self._prepare(q, k, v, x)
        if self.update_rule == "delta":
            o, state = chunk_delta_rule(phi_q, phi_k, v, gate_a, state, output_state, chunk_size=self.chunk_size)
        else:
            o, state = decay_fast_weights(
                phi_q, phi_k, v, gate_a, gate_b, state, output_state,
                chunk_size=self.chunk_size, kernel=self.kernel,
            )  # fmt: skip
        return self._finish(o), state

    def recurrent(self, q, k, v, x, state: State = None) -> tuple[Tensor, State]:
        phi_q, phi_k, v, gate_a, gate_b = self._prepare(q, k, v, x)
        if self.update_rule == "delta":
            o, state = recurrent_delta_rule(phi_q, phi_k, v, gate_a, state, output_final_state=True)
        else:
            o, state = recurrent_decay_fast_weights(phi_q, phi_k, v, gate_a, gate_b, state, output_final_state=True)
        return self._finish(o), state

    def step(self, q, k, v, x, state: Tensor) -> Tensor:
        """One decode token [B, 1, H, D]: updates `state` in place (the CUDA decode kernel on GPU) and
        returns o. The state keeps its address, so a decode step can be captured in a CUDA graph."""
        phi_q, phi_k, v, gate_a, gate_b = self._prepare(q, k, v, x)
        if self.update_rule == "delta":
            o, new_state = recurrent_delta_rule(phi_q, phi_k, v, gate_a, state, output_final_state=True)
            state.copy_(new_state)
        else:
            o = decay_fast_weights_step(phi_q, phi_k, v, gate_a, gate_b, state, kernel=self.kernel)
        return self._finish(o)

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # The state is kept in float32 whatever the activations' dtype, and does not grow with seq_len.
        columns = self.head_dim + (self.normalization == "denominator")
        return batch_size * self.num_heads * self.state_size * columns * torch.float32.itemsize

    def extra_repr(self) -> str:
        return (
            f"feature_map={self.feature_map_name}, update_rule={self.update_rule}, normalization={self.normalization}, "
            f"state_size={self.state_size}, chunk_size={self.chunk_size}, kernel={self.kernel}"
        )


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {sorted(choices)}, got {value!r}")


def _check_combination(feature_map: str, update_rule: str, normalization: str) -> None:
    """Combinations that would train badly or not at all fail here, before any forward pass."""
    if update_rule == "delta" and normalization != "sum":
        raise ConfigError(
            f"attention.update_rule=delta needs attention.normalization=sum (sum-normalised features keep the "
            f"delta rule's state bounded), got {normalization}"
        )
    if normalization == "sum" and not FEATURE_MAPS[feature_map].nonnegative:
        raise ConfigError(
            f"attention.normalization=sum needs non-negative features, and feature_map={feature_map} can be negative "
            f"(its sum can be 0); use feature_map=elu, relu_mlp, favor or dpfp, or normalization=none"
        )
    if normalization == "denominator" and feature_map not in DENOMINATOR_FEATURE_MAPS:
        raise ConfigError(
            f"attention.normalization=denominator needs a positive kernel, and feature_map={feature_map} gives "
            f"signed scores (the denominator crosses 0); use normalization=none or one of {list(DENOMINATOR_FEATURE_MAPS)}"
        )
    if normalization == "none" and FEATURE_MAPS[feature_map].needs_normalization:
        raise ConfigError(
            f"attention.feature_map={feature_map} needs attention.normalization=denominator or sum "
            "(its queries are rescaled for range by a factor only a normalisation cancels)"
        )
