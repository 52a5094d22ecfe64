"""Attention variants: softmax and the fast-weight family, behind one interface (`AttentionCore`).

`conf/attention/<name>.yaml` selects a core with `_target_` (and `_partial_: true`); the model
surgery in `dfw.surgery` finishes building it per layer with the layer's sizes.
"""

from .base import AttentionCore, ConvertedAttention
from .fast_weight import FastWeightAttention, uniform_gate_bias
from .feature_maps import FEATURE_MAPS
from .softmax import SoftmaxAttention

__all__ = [
    "FEATURE_MAPS",
    "AttentionCore",
    "ConvertedAttention",
    "FastWeightAttention",
    "SoftmaxAttention",
    "uniform_gate_bias",
]
