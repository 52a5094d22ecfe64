"""lm-evaluation-harness's `HFLM` for dfw's models, registered with lm-eval as `--model dfw`.

Importing this module needs lm-eval (`pip install 'dfw[lm_eval]'`); `dfw.eval.harness` imports it only
when an lm-eval task runs. What it adds to HFLM:

- `pretrained=` may be anything dfw loads (an export, a dfw.train `.ckpt`, a Hugging Face directory or
  hub id), loaded by dfw, with the model's own tokenizer;
- generate-until tasks decode a converted model with `dfw.cache.RecurrentCache` (its state; transformers'
  default cache holds none of it), a softmax GPT-2 with transformers' KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..cache import RecurrentCache
from ..generate import is_converted


@register_model("dfw")
class DFWLM(HFLM):
    """`HFLM` around a model dfw loaded (or loads from `pretrained`, a path or hub id)."""

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str):
            from .load import load_eval_model

            # lm-eval's command line asks for cuda:0 by default; as its HFLM, take the CPU where there is no
            # GPU.
            usable = device is not None and (
                device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())
            )
            loaded = load_eval_model(pretrained, device if usable else "auto", dtype)
            pretrained, tokenizer = loaded.net, tokenizer or loaded.tokenizer
        if tokenizer is None:
            raise ValueError("DFWLM: pass the model's tokenizer with a model object")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ):
        if is_converted(self.model) and generation_kwargs.get("cache") is None:
            generation_kwargs["cache"] = RecurrentCache(self.model)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
