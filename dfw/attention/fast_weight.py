"""Fast-weight attention: a feature map, an update rule and a normalisation, in two forms that agree.

    S_t = update(S_{t-1}, phi(k_t), v_t)        o_t = normalise(phi(q_t) S_t)

with the state S [B, H, m, D] (key features x values; the paper writes its transpose, D x m).
Decaying fast weights (Mao, EMNLP 2022) is `feature_map=linear, update_rule=decay,
normalization=none`:

    S_t = diag(f_t) S_{t-1} diag(z_t) + phi(k_t)^T v_t,   f_t = sigmoid(W_f x_t + b_f) in (0,1)^m (key side),
                                                          z_t = sigmoid(W_z x_t + b_z) in (0,1)^D (value side).

The parallel form is the chunkwise op of `dfw_kernels` (the CUDA kernel on GPU when available);
the recurrent form is its loop over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dfw_kernels import KERNELS, decay_fast_weights, recurrent_decay_fast_weights
from torch import Tensor, nn

from ..errors import ConfigError
from .base import AttentionCore, State
from .feature_maps import FEATURE_MAPS

UPDATE_RULES = ("add", "decay")
NORMALIZATIONS = ("none", "denominator")
GATES = ("key", "value", "both")


def uniform_gate_bias(n: int) -> Tensor:
    """b = logit(u) with u spread evenly over (1/n, 1 - 1/n) across n channels.

    Retention then spans time scales from ~1 token (u = 1/n) to ~n tokens (u = 1 - 1/n).
    """
    u = torch.linspace(1.0 / n, 1.0 - 1.0 / n, n) if n > 1 else torch.full((1,), 0.5)
    return torch.logit(u)


class FastWeightAttention(AttentionCore):
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
    ):
        super().__init__()
        state_size = head_dim if state_size is None else state_size
        _check_choice("attention.feature_map", feature_map, FEATURE_MAPS)
        _check_choice("attention.update_rule", update_rule, UPDATE_RULES)
        _check_choice("attention.normalization", normalization, NORMALIZATIONS)
        _check_choice("attention.kernel", kernel, KERNELS)
        if not isinstance(state_size, int) or state_size <= 0:
            raise ConfigError(f"attention.state_size must be a positive integer, got {state_size!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
            raise ConfigError(f"attention.chunk_size must be a positive multiple of 16, got {chunk_size!r}")
        if update_rule == "decay":
            _check_choice("attention.gates", gates, GATES)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.update_rule, self.normalization = update_rule, normalization
        self.chunk_size, self.kernel, self.eps = chunk_size, kernel, eps
        try:
            self.feature_map = FEATURE_MAPS[feature_map](num_heads, head_dim, state_size)
        except ValueError as err:
            raise ConfigError(f"attention: {err}") from None
        self.state_size = self.feature_map.output_size  # m
        # Without a normaliser the read phi(q) S is scaled like softmax's logits (1/sqrt(D));
        # with one, a constant factor on phi(q) cancels.
        self.read_scale = (head_dim**-0.5 if scaling is None else scaling) if normalization == "none" else 1.0

        # Decay gates (new parameters): weights zero, biases by uniform gate initialisation, so the
        # converted layer starts as a fixed multi-timescale decay and learns to make it data-dependent.
        self.key_gate = self.value_gate = None
        if update_rule == "decay" and gates in ("key", "both"):
            self.key_gate = self._gate(hidden_size, self.state_size)  # f_t, (C -> H*m)
        if update_rule == "decay" and gates in ("value", "both"):
            self.value_gate = self._gate(hidden_size, head_dim)  # z_t, (C -> H*D)
        self.output_norm = nn.LayerNorm(head_dim) if output_norm else None

    def _gate(self, hidden_size: int, width: int) -> nn.Linear:
        gate = nn.Linear(hidden_size, self.num_heads * width)
        nn.init.zeros_(gate.weight)
        with torch.no_grad():
            gate.bias.copy_(uniform_gate_bias(width).repeat(self.num_heads))
        return gate

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor):
        """Token-wise inputs of the recurrence: features, values and log-gates, all [B, T, H, *]."""
        B, T, H, D = q.shape
        phi_q = self.feature_map(q) * self.read_scale  # (B, T, H, m)
        phi_k = self.feature_map(k)  # (B, T, H, m)
        log_f = None if self.key_gate is None else F.logsigmoid(self.key_gate(x).float()).view(B, T, H, -1)
        log_z = None if self.value_gate is None else F.logsigmoid(self.value_gate(x).float()).view(B, T, H, -1)
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
        phi_q, phi_k, v, log_f, log_z = self._prepare(q, k, v, x)
        o, state = decay_fast_weights(
            phi_q, phi_k, v, log_f, log_z, state, output_state,
            chunk_size=self.chunk_size, kernel=self.kernel,
        )  # fmt: skip
        return self._finish(o), state

    def recurrent(self, q, k, v, x, state: State = None) -> tuple[Tensor, State]:
        phi_q, phi_k, v, log_f, log_z = self._prepare(q, k, v, x)
        o, state = recurrent_decay_fast_weights(phi_q, phi_k, v, log_f, log_z, state, output_final_state=True)
        return self._finish(o), state

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # The state is kept in float32 whatever the activations' dtype, and does not grow with seq_len.
        columns = self.head_dim + (self.normalization == "denominator")
        return batch_size * self.num_heads * self.state_size * columns * torch.float32.itemsize

    def extra_repr(self) -> str:
        return (
            f"update_rule={self.update_rule}, normalization={self.normalization}, state_size={self.state_size}, "
            f"chunk_size={self.chunk_size}, kernel={self.kernel}"
        )


def _check_choice(option: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {sorted(choices)}, got {value!r}")
