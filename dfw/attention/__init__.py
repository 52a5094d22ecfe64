"""Attention variants: softmax and the fast-weight family, behind one interface (`AttentionCore`).

`conf/attention/<name>.yaml` selects a core with `_target_` (and `_partial_: true`); the model
surgery in `dfw.surgery` finishes building it per layer with the layer's sizes. The fast-weight family
is three registries, `FEATURE_MAPS`, `UPDATE_RULES` and `NORMALIZATIONS`, filled the same way: a subclass
of `FeatureMap`, `UpdateRule` or `Normalization` with a `name` registers itself (`registry.py`).
"""

from .base import AttentionCore, ConvertedAttention
from .fast_weight import FastWeightAttention
from .feature_maps import FEATURE_MAPS, FeatureMap
from .normalizations import NORMALIZATIONS, Normalization
from .softmax import SoftmaxAttention
from .update_rules import UPDATE_RULES, TokenInputs, UpdateRule
from .update_rules.decay import uniform_gate_bias
from .update_rules.delta import chunk_delta_rule, recurrent_delta_rule
from .update_rules.gated import head_gate_bias

__all__ = [
    "FEATURE_MAPS",
    "NORMALIZATIONS",
    "UPDATE_RULES",
    "AttentionCore",
    "ConvertedAttention",
    "FastWeightAttention",
    "FeatureMap",
    "Normalization",
    "SoftmaxAttention",
    "TokenInputs",
    "UpdateRule",
    "chunk_delta_rule",
    "head_gate_bias",
    "recurrent_delta_rule",
    "uniform_gate_bias",
]
