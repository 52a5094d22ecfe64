"""A converted GPT-2 as a transformers model type of its own, so an export says what it is.

An export's config.json has `model_type: dfw-gpt2` and holds the attention config it was converted
with (`attention`), which weights it holds (`exported_weights`: final or best, `exported_step`).
`import dfw` registers the type with transformers' Auto classes, so

    import dfw
    from transformers import AutoModelForCausalLM
    net = AutoModelForCausalLM.from_pretrained("<export>")   # a DFWForCausalLM, attention converted

Without dfw, transformers refuses the unknown model type `dfw-gpt2` (rather than loading a softmax
GPT-2 that silently drops the converted attention). The stored attention config is checked against
dfw's own attention classes before anything is built from it (`dfw.safe_config`).

A DFWForCausalLM generates the way transformers' tools call it (`pipeline("text-generation")`,
lm-eval, `model.generate(ids)`): `generate` without a cache gets a `dfw.cache.RecurrentCache`, and a
decode step runs dfw's lean step (`dfw.cache.decode`), replayed from a CUDA graph on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .cache import RecurrentCache, decode, decode_call_unsupported
from .surgery import convert_to

MODEL_TYPE = "dfw-gpt2"
# Beside a softmax export (a plain GPT-2) and in exports of earlier versions: the attention config.
ATTENTION_FILE = "dfw_attention.yaml"


class DFWConfig(GPT2Config):
    """GPT2Config plus the attention a dfw model was converted to.

    attention: the `conf/attention/*.yaml` node (resolved, plain data) every layer's core is built from;
        its `softmax_layers` names the layers that keep softmax (`dfw.surgery.softmax_layers`).
    exported_weights: "final" (the weights at the end of training) or "best" (the best-by-val/ppl checkpoint).
    exported_step: the optimizer step those weights are from.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        attention: dict[str, Any] | None = None,
        exported_weights: str | None = None,
        exported_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.attention = dict(attention or {})
        self.exported_weights = exported_weights
        self.exported_step = exported_step
        super().__init__(**kwargs)


class DFWForCausalLM(GPT2LMHeadModel):
    """GPT2LMHeadModel whose every layer's attention is converted to `config.attention` (but the layers its
    `softmax_layers` keeps softmax in)."""

    config_class = DFWConfig

    def __init__(self, config: DFWConfig) -> None:
        super().__init__(config)
        if not config.attention:
            raise ValueError("DFWConfig.attention is empty: not a converted model")
        # config.attention comes from a file (config.json), so it is checked as untrusted input.
        source = f"{config._name_or_path}/config.json" if config._name_or_path else "DFWConfig"
        convert_to(self, config.attention, source=source)

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """`generate` without a cache gets a RecurrentCache (transformers would make a DynamicCache, which
        holds none of a converted layer's state), as fla's and mamba's models supply their own; a cache
        passed in, or use_cache=False, is left to transformers."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r}: a converted model decodes "
                "with its own RecurrentCache (fixed-size states, not keys and values); leave it unset"
            )
        model_kwargs["cache"] = RecurrentCache(self)

    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """`GPT2LMHeadModel.forward`, except for a plain decode step (one new token with a RecurrentCache of a
        model whose every layer is converted, in inference: `dfw.cache.decode_call_unsupported`), which runs
        dfw's lean decode step, replayed from a CUDA graph on a GPU (`dfw.cache.decode`)."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        inputs = dict(
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if decode_call_unsupported(self, cache, input_ids, attention_mask, **inputs) is None:
            logits = decode(self, cache, input_ids, position_ids)  # (B, 1, V)
            return CausalLMOutputWithCrossAttentions(logits=logits, cache=cache)
        return super().forward(
            input_ids=input_ids,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **inputs,
        )


def as_dfw_model(net: GPT2LMHeadModel, attention: dict[str, Any], **metadata: Any) -> DFWForCausalLM:
    """`net` (converted by dfw.surgery) as a DFWForCausalLM sharing its tensors (no copy)."""
    fields = {
        k: v
        for k, v in net.config.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version")
    }
    # metadata replaces what a pretrained model's config may carry from an earlier export (exported_step, ...)
    config = DFWConfig(**{**fields, **metadata, "attention": attention})
    with torch.device("meta"):
        model = DFWForCausalLM(config)
    model.load_state_dict(net.state_dict(), strict=True, assign=True)
    for name, buffer in net.named_buffers():  # non-persistent buffers are not in the state dict
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if getattr(module, buffer_name).is_meta:
            module.register_buffer(buffer_name, buffer, persistent=False)
    model.tie_weights()
    return model.train(net.training)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know `dfw-gpt2` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, DFWConfig)
    except ValueError:  # already registered (a second call)
        pass
    try:
        AutoModelForCausalLM.register(DFWConfig, DFWForCausalLM)
    except ValueError:
        pass
