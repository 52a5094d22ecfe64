"""Fast-weight attention: a feature map, an update rule and a normalisation, in two forms that agree.

    S_t = update(S_{t-1}, phi(k_t), v_t)        o_t = normalise(phi(q_t) S_t)

with the state S [B, H, m, D] (key features x values; the paper writes its transpose, D x m). The three
choices are independent config options (`attention.feature_map`, `.update_rule`, `.normalization`):

    update_rule   add      S_t = S_{t-1} + phi(k_t)^T v_t                      (Katharopoulos et al. 2020)
                  gated    S_t = g_t S_{t-1} + (1 - g_t) phi(k_t)^T v_t,           (RFA, Peng et al. 2021)
                              g_t = sigmoid(w_h . x_t + b_h)
                  delta    S_t = S_{t-1} + beta_t phi(k_t)^T (v_t - phi(k_t) S_{t-1}),   (Schlag et al. 2021)
                              beta_t = sigmoid(w_h . x_t + b_h)
                  decay    S_t = diag(f_t) S_{t-1} diag(z_t) + phi(k_t)^T v_t,             (DFW, Mao 2022)
                              f_t = sigmoid(W_f x_t + b_f) in (0,1)^m, z_t = sigmoid(W_z x_t + b_z) in (0,1)^D
    normalization none         o_t = phi(q_t) S_t / sqrt(D)
                  denominator  o_t = phi(q_t) S_t / max(phi(q_t) . z_t, eps), z_t updated like S_t with v = 1
                  sum          phi(x) <- phi(x) / max(sum_i phi(x)_i, eps) for queries and keys
                                                                                      (Schlag et al. 2021)

x_t is the input of the attention block. Decaying fast weights is `feature_map=linear,
update_rule=decay, normalization=none`.

The core composes three registries, filled the same way (`dfw.attention.registry`), and has no case of
its own: `FEATURE_MAPS` (feature_maps.py; each map states what it can be normalised with), `UPDATE_RULES`
(update_rules/: each rule owns its gate parameters, their conversion initialisation, and its parallel,
recurrent and decode-step forms) and `NORMALIZATIONS` (normalizations.py: each acts on features, values
and the output whatever the rule, and states which feature maps it takes). Gated is the decaying
recurrence with a scalar key-side gate log g_t and keys scaled by 1 - g_t; the delta rule has its own
chunkwise (WY/UT) form in `update_rules/delta.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from dfw_kernels import KERNELS, unavailable_reason
from dfw_kernels.reference import accumulation_dtype
from torch import Tensor, nn

from ..errors import ConfigError
from .base import AttentionCore, State
from .feature_maps import FEATURE_MAPS
from .normalizations import NORMALIZATIONS
from .update_rules import UPDATE_RULES, TokenInputs
from .update_rules.base import check_choice


class FastWeightAttention(AttentionCore):
    """Arguments after `scaling` are the attention config (conf/attention/*.yaml):

    feature_map: a key of FEATURE_MAPS.
    update_rule: a key of UPDATE_RULES (add | gated | delta | decay).
    normalization: a key of NORMALIZATIONS (none | denominator | sum).
    state_size: m; null for the map's natural size.
    output_norm: LayerNorm over each head's output (off in the paper).
    chunk_size: tokens per chunk of the parallel form.
    kernel: auto | cuda | torch | triton (the dfw_kernels op).
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
        if (reason := unavailable_reason(kernel)) is not None:  # cuda or triton that cannot run here
            raise ConfigError(
                f"attention.kernel={kernel} cannot run here: {reason}; use attention.kernel=auto or torch"
            )
        _check_rule_options(rule_options)
        if state_size is not None and (not isinstance(state_size, int) or state_size <= 0):
            raise ConfigError(f"attention.state_size must be a positive integer or null, got {state_size!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
            raise ConfigError(f"attention.chunk_size must be a positive multiple of 16, got {chunk_size!r}")
        NORMALIZATIONS[normalization].check(feature_map, FEATURE_MAPS)
        rule_class = UPDATE_RULES[update_rule]
        rule_class.check(feature_map, normalization)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.feature_map_name, self.update_rule, self.normalization = feature_map, update_rule, normalization
        self.chunk_size, self.kernel, self.eps = chunk_size, kernel, eps
        options = dict(
            redraw_interval=redraw_interval,
            seed=seed,
            layer_idx=layer_idx,
            learned_scale=learned_scale,
            dpfp_order=dpfp_order,
        )
        try:
            self.feature_map = FEATURE_MAPS[feature_map](num_heads, head_dim, state_size, options)
        except ValueError as err:
            raise ConfigError(f"attention: {err}") from None
        self.state_size = self.feature_map.state_size  # m
        self.normalizer = NORMALIZATIONS[normalization](eps)
        # Without a normaliser the read phi(q) S is scaled like softmax's logits (1/sqrt(D));
        # with one, a constant factor on phi(q) cancels.
        softmax_scale = head_dim**-0.5 if scaling is None else scaling
        self.read_scale = 1.0 if self.normalizer.cancels_feature_scale else softmax_scale

        self.rule = rule_class(
            hidden_size, num_heads, head_dim, self.state_size, {**rule_class.options, **rule_options}
        )
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
        phi_q, phi_k = self.normalizer.features(phi_q, phi_k)
        return phi_q * self.read_scale, phi_k

    def _prepare(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, token_mask: Tensor | None = None
    ) -> TokenInputs:
        """Token-wise inputs of the recurrence: features, values and the rule's gates, all [B, T, H, *];
        pads (token_mask False) made into tokens that leave the state as it was (`UpdateRule.skip_pads`)."""
        phi_q, phi_k = self._features(q, k)
        gates = {name: getattr(self, name) for name in self.gate_names}
        inputs = self.rule.token_inputs(gates, x, TokenInputs(phi_q, phi_k, v))
        inputs = self.normalizer.token_inputs(inputs)
        if token_mask is not None:
            inputs = self.rule.skip_pads(inputs, token_mask)
        return inputs

    def _finish(self, o: Tensor) -> Tensor:
        o = self.normalizer.output(o)  # (B, T, H, D)
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
        fast_weights = _fast_weights(state)
        o, final = self.rule.parallel(inputs, fast_weights, output_state, self.chunk_size, self.kernel)
        return self._finish(o), final

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
        columns = self.head_dim + self.normalizer.extra_columns
        shape = (batch_size, self.num_heads, self.state_size, columns)
        return torch.zeros(shape, device=device, dtype=accumulation_dtype(dtype))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State, token_mask: Tensor | None = None
    ) -> Tensor:
        """One decode token [B, 1, H, D]: updates `state` in place (the CUDA decode kernel on GPU) and
        returns o. The state keeps its address, so a decode step can be captured in a CUDA graph."""
        fast_weights = _fast_weights(state)
        if fast_weights is None:
            raise TypeError("FastWeightAttention.step updates a state in place: pass allocate_state(...)")
        return self._finish(self.rule.step(self._prepare(q, k, v, x, token_mask), fast_weights, self.kernel))

    # -- Attention transfer (AttentionCore's interface) ---------------------------------------------------
    @property
    def has_attention_weights(self) -> bool:
        # o_t = sum_j (phi(q_t) . phi(k_j)) v_j / sum_j phi(q_t) . phi(k_j): a plain sum, divided by its
        # scores' sum.
        return self.rule.plain_sum and self.normalizer.divides_by_score_sum and self.output_norm is None

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        if not self.has_attention_weights:
            return super().attention_weights(q, k)
        phi_q, phi_k = self._features(q, k)  # (B, T, H, m) each
        T = q.shape[1]
        scores = torch.einsum("bihm,bjhm->bhij", phi_q, phi_k)  # (B, H, T, T)
        scores = scores * torch.ones(T, T, dtype=scores.dtype, device=q.device).tril()
        return scores / scores.sum(-1, keepdim=True).clamp_min(self.eps)

    @property
    def output_scale_calibratable(self) -> bool:
        # Without a normaliser (and output norm) the output is bilinear in phi: scaling phi by c scales it
        # by c^2.
        return (
            self.feature_map.scalable
            and not self.normalizer.cancels_feature_scale
            and self.output_norm is None
        )

    def scale_output(self, factor: Tensor) -> None:
        if not self.output_scale_calibratable:
            super().scale_output(factor)
        self.feature_map.scale_features(factor.sqrt())  # phi(q), phi(k) x sqrt(factor): the output x factor

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # The state is kept in float32 whatever the activations' dtype, and does not grow with seq_len.
        columns = self.head_dim + self.normalizer.extra_columns
        return batch_size * self.num_heads * self.state_size * columns * torch.float32.itemsize

    def extra_repr(self) -> str:
        rule = self.rule.extra_repr()
        return (
            f"feature_map={self.feature_map_name}, "
            f"update_rule={self.update_rule}{', ' + rule if rule else ''}, "
            f"normalization={self.normalization}, state_size={self.state_size}, "
            f"chunk_size={self.chunk_size}, kernel={self.kernel}"
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
            f"attention has no option {', '.join(unknown)}; remove it (the fast-weight options are the "
            f"arguments of dfw.attention.FastWeightAttention, and the update rules' own: {sorted(known)})"
        )
