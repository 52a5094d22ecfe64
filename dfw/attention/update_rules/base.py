"""What an update rule is: its gate parameters, the token-wise inputs it makes, and its three forms.

A rule is a subclass of `UpdateRule` with a `name`; defining it registers it in `UPDATE_RULES` (the
registry that `attention.update_rule` names; `dfw.attention.registry`), and every module of this package is
imported, so a new rule is one new file here plus a preset in `conf/attention/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from dfw_kernels import decay_fast_weights, decay_fast_weights_step, recurrent_decay_fast_weights
from torch import Tensor, nn

from ...errors import ConfigError
from ..registry import Registered

UPDATE_RULES: dict[str, type[UpdateRule]] = {}


class TokenInputs(NamedTuple):
    """The token-wise inputs of the recurrence, all [B, T, H, *]; a rule fills the fields it uses.

    With `normalization=denominator` the core appends a column of ones to `v` (and of zeros, no decay,
    to `log_value_gate`), so the state carries the denominator's running sum as one more value column.
    """

    phi_q: Tensor  # (B, T, H, m) query features, scaled for the read
    phi_k: Tensor  # (B, T, H, m) key features
    v: Tensor  # (B, T, H, D), or (B, T, H, D + 1) with a denominator column
    log_key_gate: Tensor | None = None  # (B, T, H, m) or (B, T, H, 1): log of the key-side decay, <= 0
    log_value_gate: Tensor | None = None  # (B, T, H, D) or (B, T, H, 1): log of the value-side decay, <= 0
    write_strength: Tensor | None = None  # (B, T, H, 1): the delta rule's beta_t in (0, 1)


class UpdateRule(Registered):
    """One update rule S_t = update(S_{t-1}, phi(k_t), v_t, gates(x_t)).

    Built once per layer from the layer's sizes and the attention config's options (`options` lists
    the rule's own, with their defaults; the core passes their values). The rule owns:
    - `gates()`: its new parameters, initialised for conversion; the core registers them under these
      names, so their state-dict keys are `...attn.core.<name>.*`;
    - `token_inputs()`: the gates of each token, computed from the block input x;
    - `parallel()`, `recurrent()`, `step()`: the chunkwise form (training, prefill), the loop over time
      (generation, and the tests' oracle) and one in-place decode step; they agree (tests/attention/).

    The defaults here run the decaying recurrence of `dfw_kernels`,
    S_t = diag(f_t) S_{t-1} diag(z_t) + phi(k_t)^T v_t, which add, gated and decay are cases of; a rule
    with another recurrence overrides all three forms.
    """

    registry: ClassVar[dict[str, type[UpdateRule]]] = UPDATE_RULES  # name: the value of attention.update_rule
    options: ClassVar[dict[str, Any]] = {}  # rule-specific config options and their defaults
    plain_sum: ClassVar[bool] = (
        False  # S_t = sum_s phi(k_s)^T v_s: no gate, no decay (attention transfer asks)
    )

    def __init__(
        self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, options: Mapping[str, Any]
    ):
        self.hidden_size, self.num_heads, self.head_dim, self.state_size = (
            hidden_size,
            num_heads,
            head_dim,
            state_size,
        )

    @classmethod
    def check(cls, feature_map: str, normalization: str) -> None:
        """Raise a ConfigError if the rule cannot work with this feature map and normalisation."""

    def gates(self) -> dict[str, nn.Module]:
        """The rule's new parameters, initialised for conversion (none by default)."""
        return {}

    def token_inputs(self, gates: Mapping[str, nn.Module], x: Tensor, inputs: TokenInputs) -> TokenInputs:
        """`inputs` (features and values) with this rule's gates for every token of x [B, T, C]."""
        return inputs

    def skip_pads(self, inputs: TokenInputs, token_mask: Tensor) -> TokenInputs:
        """`inputs` with every pad (token_mask [B, T] False) made a token that leaves the state as it was.

        No write (key features and values 0) and no decay (log-gates 0, gates 1): exact for the decaying
        recurrence, which then adds phi(k)^T v = 0 and multiplies by exp(0) = 1, and for the delta rule,
        whose write beta phi(k)^T (v - phi(k) S) is 0 with phi(k) = 0; a rule with another recurrence
        overrides it. `torch.where`, not a product, so a non-finite value at a pad cannot leak in.
        """
        real = token_mask[:, :, None, None]  # (B, T, 1, 1)
        at_pads_zero = lambda t: torch.where(real, t, 0.0)
        gate = lambda t: None if t is None else at_pads_zero(t)
        return inputs._replace(
            phi_k=at_pads_zero(inputs.phi_k),
            v=at_pads_zero(inputs.v),
            log_key_gate=gate(inputs.log_key_gate),
            log_value_gate=gate(inputs.log_value_gate),
        )

    def parallel(
        self, inputs: TokenInputs, state: Tensor | None, output_state: bool, chunk_size: int, kernel: str
    ) -> tuple[Tensor, Tensor | None]:
        return decay_fast_weights(
            inputs.phi_q,
            inputs.phi_k,
            inputs.v,
            inputs.log_key_gate,
            inputs.log_value_gate,
            state,
            output_state,
            chunk_size=chunk_size,
            kernel=kernel,
        )

    def recurrent(self, inputs: TokenInputs, state: Tensor | None) -> tuple[Tensor, Tensor]:
        o, final_state = recurrent_decay_fast_weights(
            inputs.phi_q,
            inputs.phi_k,
            inputs.v,
            inputs.log_key_gate,
            inputs.log_value_gate,
            state,
            output_final_state=True,
        )
        assert final_state is not None  # output_final_state=True
        return o, final_state

    def step(self, inputs: TokenInputs, state: Tensor, kernel: str) -> Tensor:
        """One token: updates `state` in place (so it keeps its address) and returns o."""
        return decay_fast_weights_step(
            inputs.phi_q,
            inputs.phi_k,
            inputs.v,
            inputs.log_key_gate,
            inputs.log_value_gate,
            state,
            kernel=kernel,
        )

    def extra_repr(self) -> str:
        return ""


def zero_weight_gate(hidden_size: int, bias: Tensor) -> nn.Linear:
    """A (C -> bias.numel()) projection of the block input with zero weights and the given bias.

    At conversion every gate is then a constant set by its bias, and learns to depend on the data.
    """
    gate = nn.Linear(hidden_size, bias.numel())
    nn.init.zeros_(gate.weight)
    with torch.no_grad():
        gate.bias.copy_(bias)
    return gate


def gate_logits(gate: nn.Module, x: Tensor, num_heads: int) -> Tensor:
    """gate(x) as [B, T, H, width], in float32 under bf16 autocast (gates need the range)."""
    B, T, _ = x.shape
    logits = gate(x)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return logits.view(B, T, num_heads, -1)  # (B, T, H, width)


def check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {sorted(choices)}, got {value!r}")
