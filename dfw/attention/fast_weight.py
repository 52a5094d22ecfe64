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

`attention.window=W` (null: off) adds exact softmax attention over the last W tokens; the memory then holds
the tokens before them (`window.py`: the math, the combination per normalisation, padding, the state).
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
from .window import (
    WindowState,
    chronological_to_ring,
    delayed,
    front_padded_last,
    gather_time,
    ring_to_chronological,
    shared_normaliser,
    sliding_window_attention,
)


class FastWeightAttention(AttentionCore):
    """Arguments after `scaling` are the attention config (conf/attention/*.yaml):

    feature_map: a key of FEATURE_MAPS.
    update_rule: a key of UPDATE_RULES (add | gated | delta | decay).
    normalization: a key of NORMALIZATIONS (none | denominator | sum).
    state_size: m; null for the map's natural size.
    window: W, exact softmax over the last W tokens beside the memory of the earlier ones (window.py);
        null: no window.
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
        window: int | None = None,
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
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ConfigError(
                f"attention.window must be a positive integer (tokens of exact softmax attention) or null "
                f"(no window), got {window!r}"
            )
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
        # The window (window.py): GPT-2's score scale, and for a read without a score sum to share, the
        # memory's weight alpha_h per head, 0 at conversion (why: window.py).
        self.window, self.window_scale = window, softmax_scale
        shares_normaliser = self.normalizer.divides_by_score_sum
        self.memory_weight = (
            nn.Parameter(torch.zeros(num_heads)) if window is not None and not shares_normaliser else None
        )  # (H,)

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
        if self.window is not None:
            return self._windowed_parallel(q, k, v, x, _window_state(state), output_state, token_mask)
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
        if self.window is not None:
            return self._windowed_recurrent(q, k, v, x, _window_state(state), token_mask)
        o, state = self.rule.recurrent(self._prepare(q, k, v, x, token_mask), _fast_weights(state))
        return self._finish(o), state

    def allocate_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        """Zeros [B, H, m, D] (D + 1 with a denominator column), float32 (float64 for float64 activations);
        with a window, a `WindowState`: those zeros and an empty buffer of W tokens."""
        columns = self.head_dim + self.normalizer.extra_columns
        shape = (batch_size, self.num_heads, self.state_size, columns)
        fast_weights = torch.zeros(shape, device=device, dtype=accumulation_dtype(dtype))
        if self.window is None:
            return fast_weights
        B, W, H, dtype = batch_size, self.window, self.num_heads, fast_weights.dtype
        zeros = lambda width: torch.zeros(B, W, H, width, device=device, dtype=dtype)
        return WindowState(
            fast_weights,
            keys=zeros(self.head_dim),
            values=zeros(columns),
            write_keys=zeros(self.state_size),
            write_strength=zeros(self._write_strength_width),
            seen=torch.zeros(B, dtype=torch.long, device=device),
        )

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State, token_mask: Tensor | None = None
    ) -> Tensor:
        """One decode token [B, 1, H, D]: updates `state` in place (the CUDA decode kernel on GPU) and
        returns o. The state keeps its address, so a decode step can be captured in a CUDA graph."""
        if self.window is not None:
            return self._windowed_step(q, k, v, x, _window_state(state), token_mask)
        fast_weights = _fast_weights(state)
        if fast_weights is None:
            raise TypeError("FastWeightAttention.step updates a state in place: pass allocate_state(...)")
        return self._finish(self.rule.step(self._prepare(q, k, v, x, token_mask), fast_weights, self.kernel))

    # -- The window (window.py) ---------------------------------------------------------------------------
    @property
    def _write_strength_width(self) -> int:
        return 1 if "write_strength" in self.gate_names else 0

    def _combine(self, o_window: Tensor, lse: Tensor | None, read: Tensor) -> Tensor:
        """The layer's output [B, T, H, D] from the window's softmax (and its log-sum-exp) and the memory's
        read phi(q) M [B, T, H, D (+1)]; computed in float32 (float64 for float64 inputs)."""
        dtype = accumulation_dtype(read.dtype)
        o_window, read = o_window.to(dtype), read.to(dtype)
        if self.memory_weight is None:  # a shared normaliser (LoLCATs)
            assert lse is not None
            o = shared_normaliser(o_window, lse.to(dtype), read)
        else:  # the window plus alpha_h times the read (Liger)
            o = o_window + self.memory_weight.to(dtype)[:, None] * self.normalizer.output(read)
        if self.output_norm is not None:
            o = self.output_norm(o)
        return o

    def _window_parts(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: WindowState | None,
        output_state: bool,
        token_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor, WindowState | None]:
        """The parallel form's two parts for this call's T tokens: (o_window [B, T, H, D], its lse [B, T, H]
        or None, the memory's read [B, T, H, D (+1)], the state after the last token or None)."""
        B, T, H, D = q.shape
        W = self.window
        assert W is not None
        inputs = self._prepare(q, k, v, x, token_mask)
        width = self._write_strength_width
        strength = inputs.v.new_zeros(B, T, H, 0) if inputs.write_strength is None else inputs.write_strength
        # One sequence of L positions: the buffer's W tokens (when continuing from a state), then this call's.
        # Buffer positions are steps that change nothing (no decay, nothing written, no query that is kept).
        window_q, keys, phi_q = q, k, inputs.phi_q
        values, write_keys = inputs.v, inputs.phi_k
        gates = [inputs.log_key_gate, inputs.log_value_gate]
        valid = token_mask
        if state is not None:
            (buffer_keys, buffer_values, buffer_write_keys, buffer_strength), buffer_valid = (
                ring_to_chronological(state)
            )
            cat = lambda past, now: torch.cat([past.to(now.dtype), now], dim=1)  # (B, W + T, H, *)
            no_query = lambda t: t.new_zeros(B, W, *t.shape[2:])
            window_q, phi_q = cat(no_query(q), q), cat(no_query(phi_q), phi_q)
            keys, values = cat(buffer_keys, k), cat(buffer_values, values)
            write_keys, strength = cat(buffer_write_keys, write_keys), cat(buffer_strength, strength)
            gates = [None if g is None else cat(no_query(g), g) for g in gates]
            now = torch.ones(B, T, dtype=torch.bool, device=q.device) if token_mask is None else token_mask
            valid = torch.cat([buffer_valid, now], dim=1)  # (B, W + T)
        L = keys.shape[1]
        order = None
        if valid is not None:
            # Every pad and empty slot to the front of its row (a stable permutation): then the last W real
            # tokens are a band of W positions, and "W real tokens later" a shift by W.
            order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices  # (B, L)
            move = lambda t: gather_time(t, order)
            window_q, keys, phi_q, values = move(window_q), move(keys), move(phi_q), move(values)
            write_keys, strength, valid = move(write_keys), move(strength), move(valid)
            gates = [None if g is None else move(g) for g in gates]
        o_window, lse = sliding_window_attention(
            window_q, keys, values[..., :D], W, self.window_scale, valid, with_lse=self.memory_weight is None
        )  # (B, L, H, D), (B, L, H)
        # The memory: the rule's own recurrence on the write inputs delayed by W tokens, gates of the step.
        memory_inputs = TokenInputs(
            phi_q,
            delayed(write_keys, W),
            delayed(values, W),
            gates[0],
            gates[1],
            delayed(strength, W) if width else None,
        )
        fast_weights = None if state is None else state.fast_weights
        read, final = self.rule.parallel(
            memory_inputs, fast_weights, output_state, self.chunk_size, self.kernel
        )  # (B, L, H, D (+1)), (B, H, m, D (+1))
        if order is not None:
            back = order.argsort(dim=1)  # (B, L): the inverse permutation
            o_window, read = gather_time(o_window, back), gather_time(read, back)
            lse = None if lse is None else gather_time(lse, back)
        o_window, read = o_window[:, L - T :], read[:, L - T :]
        lse = None if lse is None else lse[:, L - T :]
        new_state = None
        if output_state:
            assert final is not None
            seen = state.seen if state is not None else torch.zeros(B, dtype=torch.long, device=q.device)
            count = seen + (T if token_mask is None else token_mask.sum(1))  # (B,)
            last = [front_padded_last(t, W) for t in (keys, values, write_keys, strength)]  # oldest first
            last_valid = (
                front_padded_last(torch.ones(B, L, dtype=torch.bool, device=q.device), W)
                if valid is None
                else front_padded_last(valid, W)
            )  # (B, W)
            dtype = final.dtype
            ring = chronological_to_ring([t.to(dtype) for t in last], last_valid, count)
            new_state = WindowState(final, ring[0], ring[1], ring[2], ring[3], count)
        return o_window, lse, read, new_state

    def _windowed_parallel(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: WindowState | None,
        output_state: bool,
        token_mask: Tensor | None,
    ) -> tuple[Tensor, WindowState | None]:
        o_window, lse, read, new_state = self._window_parts(q, k, v, x, state, output_state, token_mask)
        return self._combine(o_window, lse, read).to(v.dtype), new_state

    def _window_token(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: WindowState, token_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, TokenInputs, list[Tensor], Tensor]:
        """One token [B, 1, *] and the ring buffer, out of place: (o_window [B, 1, H, D], its lse [B, 1, H],
        the memory's inputs for this step (the evicted token's write, this token's gates and query), the
        buffer's tensors after this token, its count)."""
        B, _, H, D = q.shape
        W = self.window
        assert W is not None
        inputs = self._prepare(q, k, v, x, token_mask)
        dtype = state.keys.dtype
        real = torch.ones(B, dtype=torch.bool, device=q.device) if token_mask is None else token_mask[:, 0]
        slot = (state.seen % W)[:, None]  # (B, 1): the oldest token's slot, where this one goes
        buffer = [state.keys, state.values, state.write_keys, state.write_strength]
        width = self._write_strength_width
        strength = inputs.v.new_zeros(B, 1, H, 0) if inputs.write_strength is None else inputs.write_strength
        token = [k, inputs.v, inputs.phi_k, strength]
        # The token W real tokens back leaves the window and is written to the memory.
        evicted = (real & (state.seen >= W))[:, None, None, None]  # (B, 1, 1, 1)
        leaving = [torch.where(evicted, gather_time(t, slot), 0.0) for t in buffer]  # (B, 1, H, *) each
        memory_inputs = inputs._replace(
            phi_k=leaving[2].to(inputs.phi_k.dtype),
            v=leaving[1].to(inputs.v.dtype),
            write_strength=leaving[3].to(inputs.v.dtype) if width else None,
        )
        # This token takes its slot (a pad takes none).
        here = (torch.arange(W, device=q.device)[None] == slot) & real[:, None]  # (B, W)
        buffer = [
            torch.where(here[:, :, None, None], new.to(dtype), old)
            for old, new in zip(buffer, token, strict=True)
        ]
        count = state.seen + real.long()  # (B,)
        filled = torch.arange(W, device=q.device)[None] < count[:, None]  # (B, W): slots that hold a token
        buffer = [torch.where(filled[:, :, None, None], t, 0.0) for t in buffer]  # empty slots stay zero
        # The window: the buffer's tokens, and a pad's own key (a pad attends to itself only).
        keys = torch.cat([buffer[0], k.to(dtype)], dim=1)  # (B, W + 1, H, D)
        values = torch.cat([buffer[1][..., :D], inputs.v[..., :D].to(dtype)], dim=1)  # (B, W + 1, H, D)
        seen = torch.cat([filled & real[:, None], ~real[:, None]], dim=1)  # (B, W + 1)
        scores = torch.einsum("bhd,bwhd->bhw", q[:, 0].to(dtype), keys) * self.window_scale  # (B, H, W + 1)
        scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
        lse = scores.logsumexp(-1)  # (B, H)
        o_window = torch.einsum("bhw,bwhd->bhd", torch.exp(scores - lse[..., None]), values)  # (B, H, D)
        return o_window[:, None], lse[:, None], memory_inputs, buffer, count

    def _windowed_recurrent(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: WindowState | None, token_mask: Tensor | None
    ) -> tuple[Tensor, WindowState]:
        """The loop over tokens: each one against the ring buffer (`_window_token`), the memory by the rule's
        recurrent form; the oracle of the tests."""
        B, T = q.shape[:2]
        if state is None:
            state = _window_state(self.allocate_state(B, q.device, q.dtype))
            assert state is not None
        outputs = []
        for t in range(T):
            one = slice(t, t + 1)
            mask = None if token_mask is None else token_mask[:, one]
            o_window, lse, memory_inputs, buffer, count = self._window_token(
                q[:, one], k[:, one], v[:, one], x[:, one], state, mask
            )
            read, fast_weights = self.rule.recurrent(memory_inputs, state.fast_weights)
            outputs.append(self._combine(o_window, lse, read))
            state = WindowState(fast_weights, buffer[0], buffer[1], buffer[2], buffer[3], count)
        o = torch.cat(outputs, dim=1) if outputs else q.new_zeros(q.shape)  # (B, T, H, D)
        return o.to(v.dtype), state

    def _windowed_step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: WindowState | None,
        token_mask: Tensor | None,
    ) -> Tensor:
        """`_window_token`, then the rule's in-place step on the memory, the buffer copied back."""
        if state is None:
            raise TypeError("FastWeightAttention.step updates a state in place: pass allocate_state(...)")
        with torch.no_grad():
            o_window, lse, memory_inputs, buffer, count = self._window_token(q, k, v, x, state, token_mask)
            read = self.rule.step(memory_inputs, state.fast_weights, self.kernel)  # in place
            for target, source in zip(
                (state.keys, state.values, state.write_keys, state.write_strength), buffer, strict=True
            ):
                target.copy_(source)
            state.seen.copy_(count)
            return self._combine(o_window, lse, read).to(v.dtype)

    # -- Attention transfer (AttentionCore's interface) ---------------------------------------------------
    @property
    def has_attention_weights(self) -> bool:
        # o_t = sum_j (phi(q_t) . phi(k_j)) v_j / sum_j phi(q_t) . phi(k_j): a plain sum, divided by its
        # scores' sum. With a window, the shared normaliser: exp(s_tj) in the window, phi(q_t) . phi(k_j)
        # before it.
        return self.rule.plain_sum and self.normalizer.divides_by_score_sum and self.output_norm is None

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        if not self.has_attention_weights:
            return super().attention_weights(q, k)
        phi_q, phi_k = self._features(q, k)  # (B, T, H, m) each
        T = q.shape[1]
        scores = torch.einsum("bihm,bjhm->bhij", phi_q, phi_k)  # (B, H, T, T)
        if self.window is not None:
            distance = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]
            in_window = (distance >= 0) & (distance < self.window)  # (T, T)
            # (B, H, T, T): the memory's tokens (where the kernel is positive)
            before = (distance >= self.window) & (scores > 0)
            log_kernel = torch.where(before, torch.where(before, scores, 1.0).log(), float("-inf"))
            softmax_scores = torch.einsum("bihd,bjhd->bhij", q, k) * self.window_scale  # (B, H, T, T)
            return torch.where(in_window, softmax_scores, log_kernel).softmax(-1)
        scores = scores * torch.ones(T, T, dtype=scores.dtype, device=q.device).tril()
        return scores / scores.sum(-1, keepdim=True).clamp_min(self.eps)

    @property
    def output_scale_calibratable(self) -> bool:
        # Without a normaliser (and output norm) the output is bilinear in phi: scaling phi by c scales it
        # by c^2. With a window, the memory's weight alpha_h scales the memory's part of the output exactly.
        if self.window is not None:
            return self.memory_weight is not None and self.output_norm is None
        return (
            self.feature_map.scalable
            and not self.normalizer.cancels_feature_scale
            and self.output_norm is None
        )

    def scale_output(self, factor: Tensor) -> None:
        if not self.output_scale_calibratable:
            super().scale_output(factor)
        if self.memory_weight is not None:  # a window: the memory's part of the output x factor
            with torch.no_grad():
                self.memory_weight.mul_(factor.to(self.memory_weight))
            return
        self.feature_map.scale_features(factor.sqrt())  # phi(q), phi(k) x sqrt(factor): the output x factor

    def calibration_fit(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, o: Tensor, target: Tensor
    ) -> Tensor:
        """With a window, the memory's weight alpha_h [H] that fits the output to `target` by least squares:
        o = o_win + alpha_h r with r the memory's read, alpha_h = <r, target - o_win> / <r, r> (kept as it is
        where r is zero: no token has left the window)."""
        if self.memory_weight is None:
            return super().calibration_fit(q, k, v, x, o, target)
        o_window, _, read, _ = self._window_parts(q, k, v, x, None, False, None)
        dtype = accumulation_dtype(read.dtype)
        memory = self.normalizer.output(read.to(dtype))  # (B, T, H, D)
        residual = target.to(dtype) - o_window.to(dtype)
        dims = (0, 1, 3)
        energy = memory.square().sum(dims)  # (H,)
        fit = (memory * residual).sum(dims) / energy.clamp_min(1e-30)
        return torch.where(energy > 0, fit, self.memory_weight.detach().to(dtype))

    def apply_calibration(self, fit: Tensor) -> None:
        if self.memory_weight is None:
            return super().apply_calibration(fit)
        with torch.no_grad():
            self.memory_weight.copy_(fit)  # alpha_h itself

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # The state is kept in float32 whatever the activations' dtype, and does not grow with seq_len.
        # With a window, the ring buffer of the last W tokens too (keys, values, write features; a counter).
        columns = self.head_dim + self.normalizer.extra_columns
        numbers = self.num_heads * self.state_size * columns
        if self.window is not None:
            per_token = self.head_dim + columns + self.state_size + self._write_strength_width
            numbers += self.window * self.num_heads * per_token
        counter = torch.int64.itemsize if self.window is not None else 0
        return batch_size * (numbers * torch.float32.itemsize + counter)

    def extra_repr(self) -> str:
        rule = self.rule.extra_repr()
        return (
            f"feature_map={self.feature_map_name}, "
            f"update_rule={self.update_rule}{', ' + rule if rule else ''}, "
            f"normalization={self.normalization}, state_size={self.state_size}, "
            f"chunk_size={self.chunk_size}, kernel={self.kernel}"
            f"{'' if self.window is None else f', window={self.window}'}"
        )


def _window_state(state: State | None) -> WindowState | None:
    """A windowed core's state is a `WindowState` (the fast weights and the ring buffer)."""
    if state is not None and not isinstance(state, WindowState):
        raise TypeError(
            f"a FastWeightAttention with a window keeps a WindowState, not {type(state).__name__}; "
            "start from allocate_state(...) or None"
        )
    return state


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
