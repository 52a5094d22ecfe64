"""dfw: fine-tune pretrained Transformers into decaying fast weights (Mao, EMNLP 2022)."""

__version__ = "0.1.0"

from .config import register_resolvers

register_resolvers()
