"""Normalisations: `NORMALIZATIONS` maps `attention.normalization` to its `Normalization` class.

A normalisation acts on the features and values of the recurrence, whatever the update rule:

    none         o_t = phi(q_t) S_t / sqrt(D)       (the read is scaled like softmax's logits)
    denominator  o_t = phi(q_t) S_t / max(phi(q_t) . z_t, eps), z_t updated like S_t with v = 1
    sum          phi(x) <- phi(x) / max(sum_i phi(x)_i, eps) for queries and keys   (Schlag et al. 2021)

A new one is one subclass of `Normalization` with a `name` (`dfw.attention.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .feature_maps import FeatureMap
from .registry import Registered
from .update_rules import TokenInputs

NORMALIZATIONS: dict[str, type[Normalization]] = {}


class Normalization(Registered):
    """How the features and the output of a fast-weight core are normalised; one per core, built with `eps`.

    extra_columns: value columns the state carries beyond the head size (its shape is [B, H, m, D + extra]).
    cancels_feature_scale: a constant factor on phi(q) or phi(k) leaves the output unchanged (the read
        then needs no scale of its own, and a feature-map scale cannot calibrate the output).
    divides_by_score_sum: the output is the read divided by the sum of its scores phi(q_t) . phi(k_s)
        (with a plain-sum update rule, the output is then normalised kernel weights applied to v).
    """

    registry: ClassVar[dict[str, type[Normalization]]] = NORMALIZATIONS
    extra_columns: ClassVar[int] = 0
    cancels_feature_scale: ClassVar[bool] = True
    divides_by_score_sum: ClassVar[bool] = False

    def __init__(self, eps: float):
        self.eps = eps

    @classmethod
    def check(cls, feature_map: str, feature_maps: Mapping[str, type[FeatureMap]]) -> None:
        """Raise a ConfigError if the feature map `feature_map` (a key of `feature_maps`) cannot take this
        one."""

    def features(self, phi_q: Tensor, phi_k: Tensor) -> tuple[Tensor, Tensor]:
        """Query and key features [B, T, H, m], normalised."""
        return phi_q, phi_k

    def token_inputs(self, inputs: TokenInputs) -> TokenInputs:
        """The recurrence's token-wise inputs, with what this normalisation carries in the state."""
        return inputs

    def output(self, o: Tensor) -> Tensor:
        """The core's output [B, T, H, D] from the read phi(q_t) S_t [B, T, H, D + extra_columns]."""
        return o


def _maps_that(
    capable: Callable[[type[FeatureMap]], bool], feature_maps: Mapping[str, type[FeatureMap]]
) -> str:
    return ", ".join(name for name, cls in feature_maps.items() if capable(cls))


class NoNormalization(Normalization):
    name = "none"
    cancels_feature_scale = False

    @classmethod
    def check(cls, feature_map: str, feature_maps: Mapping[str, type[FeatureMap]]) -> None:
        if feature_maps[feature_map].needs_normalization:
            raise ConfigError(
                f"attention.feature_map={feature_map} needs attention.normalization=denominator or sum "
                "(its queries are rescaled for range by a factor only a normalisation cancels)"
            )


class Denominator(Normalization):
    """o_t = phi(q_t) S_t / max(phi(q_t) . z_t, eps): z_t is one more value column of ones in the state."""

    name = "denominator"
    extra_columns = 1
    divides_by_score_sum = True

    @classmethod
    def check(cls, feature_map: str, feature_maps: Mapping[str, type[FeatureMap]]) -> None:
        if not feature_maps[feature_map].positive_kernel:
            raise ConfigError(
                f"attention.normalization=denominator needs a positive kernel, and feature_map={feature_map} "
                f"gives signed scores (the denominator crosses 0); use normalization=none or one of "
                f"{_maps_that(lambda cls: cls.positive_kernel, feature_maps)}"
            )

    def token_inputs(self, inputs: TokenInputs) -> TokenInputs:
        # Carry z_t = sum_s decay * phi(k_s) as one more value column of ones (never value-gated).
        v = inputs.v
        B, T, H, _ = v.shape
        log_value_gate = None if inputs.log_value_gate is None else F.pad(inputs.log_value_gate, (0, 1))
        return inputs._replace(
            v=torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1),  # (B, T, H, D + 1)
            log_value_gate=log_value_gate,  # (B, T, H, D + 1)
        )

    def output(self, o: Tensor) -> Tensor:
        return o[..., :-1] / o[..., -1:].clamp_min(self.eps)  # (B, T, H, D)


class FeatureSum(Normalization):
    """phi(x) <- phi(x) / max(sum_i phi(x)_i, eps) for queries and keys (the delta rule needs it)."""

    name = "sum"

    @classmethod
    def check(cls, feature_map: str, feature_maps: Mapping[str, type[FeatureMap]]) -> None:
        if not feature_maps[feature_map].nonnegative:
            raise ConfigError(
                f"attention.normalization=sum needs non-negative features, and feature_map={feature_map} can "
                "be negative (its sum can be 0); use "
                f"feature_map={_maps_that(lambda cls: cls.nonnegative, feature_maps)}, or normalization=none"
            )

    def features(self, phi_q: Tensor, phi_k: Tensor) -> tuple[Tensor, Tensor]:
        phi_q = phi_q / phi_q.sum(-1, keepdim=True).clamp_min(self.eps)
        phi_k = phi_k / phi_k.sum(-1, keepdim=True).clamp_min(self.eps)
        return phi_q, phi_k
