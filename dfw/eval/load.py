"""The model `model=` names, on the device `device=` picks, with what is recorded about it (`ModelInfo`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import ConvertedAttention
from ..config import auto_precision
from ..errors import ConfigError
from ..generate import is_converted
from ..loading import load_model
from ..surgery import model_size_metrics
from .base import EvalModel, ModelInfo

DTYPES = ("float32", "bfloat16", "float16")


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`device`: auto (cuda when available) | cpu | cuda[:N]; `dtype`: float32 | bfloat16 | float16 | auto
    (bfloat16 on a GPU that has it, else float32)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA GPU is available here; use device=cpu or device=auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and auto_precision() == "bf16-mixed" else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return torch.device(device), getattr(torch, dtype)


def describe(net: nn.Module, source: str, kind: str, attention: dict[str, Any] | None) -> ModelInfo:
    """ModelInfo of `net`: its attention preset, state size m and generation state of one full context."""
    config = net.config
    context = int(config.n_positions)
    if is_converted(net):  # softmax layers kept (attention.softmax_layers) count with their KV cache
        cores = [block.attn.core for block in net.transformer.h if isinstance(block.attn, ConvertedAttention)]
        state_size = getattr(cores[0], "state_size", None)
        state_bytes = model_size_metrics(net, context)["model/state_bytes_per_sequence"]
        name = str((attention or {}).get("name") or type(cores[0]).__name__)
    else:  # a plain GPT-2: softmax with its KV cache, keys and values of every layer and position
        state_size, name = None, "softmax"
        state_bytes = 2 * config.n_layer * config.n_embd * context * torch.float32.itemsize
    return ModelInfo(
        source=source,
        kind=kind,
        attention=name,
        state_size=int(state_size) if state_size is not None else None,
        state_bytes=int(state_bytes),
        context=context,
        parameters=sum(p.numel() for p in net.parameters()),
    )


def load_eval_model(
    source: str, device: str = "auto", dtype: str = "float32", batch_size: int = 16, progress: bool = True
) -> EvalModel:
    """An export, a dfw.train checkpoint, a Hugging Face directory or hub id, ready to evaluate."""
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    loaded = load_model(source, option="model")
    net = loaded.net.to(device=torch_device, dtype=torch_dtype).eval()  # dropout off
    return EvalModel(
        net, loaded.tokenizer, describe(net, source, loaded.kind, loaded.attention), batch_size, progress
    )
