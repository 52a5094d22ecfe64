"""Attention variants: softmax and the fast-weight family, behind one interface (`AttentionCore`).

`conf/attention/<name>.yaml` selects a core with `_target_` (and `_partial_: true`); the model
surgery in `dfw.surgery` finishes building it per layer with the layer's sizes.
"""

from .base import AttentionCore, ConvertedAttention
from .delta import chunk_delta_rule, recurrent_delta_rule
from .fast_weight import NORMALIZATIONS, UPDATE_RULES, FastWeightAttention, head_gate_bias, uniform_gate_bias
from .feature_maps import FEATURE_MAPS, FeatureMap
from .softmax import SoftmaxAttention

__all__ = [
    "FEATURE_MAPS",
    "NORMALIZATIONS",
    "UPDATE_RULES",
    "AttentionCore",
    "ConvertedAttention",
    "FastWeightAttention",
    "FeatureMap",
    "SoftmaxAttention",
    "chunk_delta_rule",
    "head_gate_bias",
    "recurrent_delta_rule",
    "uniform_gate_bias",
]
