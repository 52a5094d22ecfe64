"""dfw: fine-tune pretrained Transformers into decaying fast weights (Mao, EMNLP 2022)."""

__version__ = "0.1.0"

from .config import register_resolvers
from .hf import register as _register_model_type

register_resolvers()
_register_model_type()  # AutoModelForCausalLM.from_pretrained(<dfw export>) builds the converted model
