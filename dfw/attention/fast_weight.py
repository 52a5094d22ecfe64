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

The core composes three registries and has no case of its own: `FEATURE_MAPS` (feature_maps.py; each
map states what it can be normalised with), `UPDATE_RULES` (update_rules/: each rule owns its gate
parameters, their conversion initialisation, and its parallel, recurrent and decode-step forms) and
the normalisations here, which act on features and values whatever the rule. Gated is the decaying
recurrence with a scalar key-side gate log g_t and keys scaled by 1 - g_t; the delta rule has its own
chunkwise (WY/UT) form in `update_rules/delta.py`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from dfw_kernels import KERNELS
from dfw_kernels import cuda as cuda_kernel
from dfw_kernels.reference import accumulation_dtype
from torch import Tensor, nn

from ..errors import ConfigError
from .base import AttentionCore, State
from .feature_maps import FEATURE_MAPS
from .update_rules import UPDATE_RULES, TokenInputs
from .update_rules.base import check_choice

NORMALIZATIONS = ("none", "denominator", "sum")


class FastWeightAttention(AttentionCore):
    """Arguments after `scaling` are the attention config (conf/attention/*.yaml):

    feature_map: a key of FEATURE_MAPS.            update_rule: a key of UPDATE_RULES (add | gated | delta | decay).
    normalization: none | denominator | sum.       state_size: m; null for the feature map's natural size.
    output_norm: LayerNorm over each head's output (off in the paper).
    chunk_size: tokens per chunk of the parallel form.   kernel: auto | cuda | torch | triton (the dfw_kernels op).
    eps: clamp of the denominator and of feature sums.
    redraw_interval, seed: random feature maps (favor, rff): redraw every N training calls (null: never),
        deterministically from (seed, layer_idx, draw number).
    learned_scale: rff, learn RFA's per-dimension scale.   dpfp_order: dpfp, nu.
    **rule_options: the update rules' own options (`UpdateRule.options`), e.g. decay's gates=key|value|both;
        each rule reads its own, so a preset's option stays valid when `update_rule` is overridden.
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
        output_norm: bool = False,
        chunk_size: int = 64,
        kernel: str = "auto",
        eps: float = 1e-6,
        redraw_interval: int | None = None,
        seed: int = 0,
        learned_scale: bool = True,
        dpfp_order: int = 1,
        **rule_options: Any,
    ):
        super().__init__()
        check_choice("attention.feature_map", feature_map, FEATURE_MAPS)
        check_choice("attention.update_rule", update_rule, UPDATE_RULES)
        check_choice("attention.normalization", normalization, NORMALIZATIONS)
        check_choice("attention.kernel", kernel, KERNELS)
        if kernel == "cuda" and (reason := cuda_kernel.unavailable_reason()) is not None:
            raise ConfigError(f"attention.kernel=cuda cannot run here: {reason}; use attention.kernel=auto or torch")
        _check_rule_options(rule_options)
        if state_size is not None and (not isinstance(state_size, int) or state_size <= 0):
            raise ConfigError(f"attention.state_size must be a positive integer or null, got {state_size!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
            raise ConfigError(f"attention.chunk_size must be a positive multiple of 16, got {chunk_size!r}")
        _check_normalization(feature_map, normalization)
        rule_class = UPDATE_RULES[update_rule]
        rule_class.check(feature_map, normalization)
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

        self.rule = rule_class(hidden_size, num_heads, head_dim, self.state_size, {**rule_class.options, **rule_options})
        # The rule's new parameters are the core's own children, so their keys are attn.core.<name>.*
        # (key_gate, value_gate, head_gate, write_strength), whatever rule made them.
        gates = self.rule.gates()
        for name, gate in gates.items():
            self.add_module(name, gate)
        self.gate_names = tuple(gates)
        self.output_norm = nn.LayerNorm(head_dim) if output_norm else None

    def _features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            self.feature_map.training_call()  # random features redraw on their schedule
        phi_q = self.feature_map(q, is_query=True)  # (B, T, H, m)
        phi_k = self.feature_map(k)  # (B, T, H, m)
        if self.normalization == "sum":
            phi_q = phi_q / phi_q.sum(-1, keepdim=True).clamp_min(self.eps)
            phi_k = phi_k / phi_k.sum(-1, keepdim=True).clamp_min(self.eps)
        return phi_q * self.read_scale, phi_k

    def _prepare(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, token_mask: Tensor | None = None
    ) -> TokenInputs:
        """Token-wise inputs of the recurrence: features, values and the rule's gates, all [B, T, H, *];
        pads (token_mask False) made into tokens that leave the state as it was (`UpdateRule.skip_pads`)."""
        phi_q, phi_k = self._features(q, k)
        gates = {name: getattr(self, name) for name in self.gate_names}
        inputs = self.rule.token_inputs(gates, x, TokenInputs(phi_q, phi_k, v))
        if self.normalization == "denominator":
            # Carry z_t = sum_s decay * phi(k_s) as one more value column of ones (never value-gated).
            B, T, H, _ = v.shape
            log_value_gate = None if inputs.log_value_gate is None else F.pad(inputs.log_value_gate, (0, 1))
            inputs = inputs._replace(
                v=torch.cat([inputs.v, v.new_ones(B, T, H, 1)], dim=-1),  # (B, T, H, D + 1)
                log_value_gate=log_value_gate,  # (B, T, H, D + 1)
            )
        if token_mask is not None:
            inputs = self.rule.skip_pads(inputs, token_mask)
        return inputs

    def _finish(self, o: Tensor) -> Tensor:
        if self.normalization == "denominator":
            o = o[..., :-1] / o[..., -1:].clamp_min(self.eps)  # (B, T, H, D)
        if self.output_norm is not None:
            o = self.output_norm(o)
        return o

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: State | None = None,
        output_state: bool = False,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, State | None]:
        inputs = self._prepare(q, k, v, x, token_mask)
        state = _fast_weights(state)
        o, state = self.rule.parallel(inputs, state, output_state, self.chunk_size, self.kernel)
        return self._finish(o), state

    def recurrent(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: State | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        o, state = self.rule.recurrent(self._prepare(q, k, v, x, token_mask), _fast_weights(state))
        return self._finish(o), state

    def allocate_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Zeros [B, H, m, D] (D + 1 with a denominator column), float32 (float64 for float64 activations)."""
        columns = self.head_dim + (self.normalization == "denominator")
        shape = (batch_size, self.num_heads, self.state_size, columns)
        return torch.zeros(shape, device=device, dtype=accumulation_dtype(dtype))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State, token_mask: Tensor | None = None
    ) -> Tensor:
        """One decode token [B, 1, H, D]: updates `state` in place (the CUDA decode kernel on GPU) and
        returns o. The state keeps its address, so a decode step can be captured in a CUDA graph."""
        inputs = self._prepare(q, k, v, x, token_mask)
        return self._finish(self.rule.step(inputs, _fast_weights(state), self.kernel))

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # The state is kept in float32 whatever the activations' dtype, and does not grow with seq_len.
        columns = self.head_dim + (self.normalization == "denominator")
        return batch_size * self.num_heads * self.state_size * columns * torch.float32.itemsize

    def extra_repr(self) -> str:
        rule = self.rule.extra_repr()
        return (
            f"feature_map={self.feature_map_name}, update_rule={self.update_rule}{', ' + rule if rule else ''}, "
            f"normalization={self.normalization}, state_size={self.state_size}, chunk_size={self.chunk_size}, "
            f"kernel={self.kernel}"
        )


def _fast_weights(state: State | None) -> Tensor | None:
    """The fast-weight core's state is one tensor [B, H, m, D (+1)]."""
    if state is not None and not isinstance(state, Tensor):
        raise TypeError(f"FastWeightAttention's state is one tensor [B, H, m, D], not {type(state).__name__}")
    return state


def _check_rule_options(rule_options: dict[str, Any]) -> None:
    known = {option for rule in UPDATE_RULES.values() for option in rule.options}
    unknown = sorted(set(rule_options) - known)
    if unknown:
        raise ConfigError(
            f"attention has no option {', '.join(unknown)}; remove it (the fast-weight options are the arguments of "
            f"dfw.attention.FastWeightAttention, and the update rules' own: {sorted(known)})"
        )


def _check_normalization(feature_map: str, normalization: str) -> None:
    """Normalisations that the feature map cannot take fail here, before any forward pass."""
    phi = FEATURE_MAPS[feature_map]
    maps_that = lambda capable: ", ".join(name for name, cls in FEATURE_MAPS.items() if capable(cls))
    if normalization == "sum" and not phi.nonnegative:
        raise ConfigError(
            f"attention.normalization=sum needs non-negative features, and feature_map={feature_map} can be negative "
            f"(its sum can be 0); use feature_map={maps_that(lambda cls: cls.nonnegative)}, or normalization=none"
        )
    if normalization == "denominator" and not phi.positive_kernel:
        raise ConfigError(
            f"attention.normalization=denominator needs a positive kernel, and feature_map={feature_map} gives "
            f"signed scores (the denominator crosses 0); use normalization=none or one of "
            f"{maps_that(lambda cls: cls.positive_kernel)}"
        )
    if normalization == "none" and phi.needs_normalization:
        raise ConfigError(
            f"attention.feature_map={feature_map} needs attention.normalization=denominator or sum "
            "(its queries are rescaled for range by a factor only a normalisation cancels)"
        )
