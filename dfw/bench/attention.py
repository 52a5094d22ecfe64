"""`python -m dfw.bench attention [--shape gpt2-small] [--presets decay,decay+window=16] [--device cuda]`

One table row per preset of conf/attention/ (`name+option=value` sets an option of it: `decay+window=16` is
DFW with a 16-token softmax window, `attention.window`), at a named shape: the training step of one attention
layer's core (forward + backward through q, k, v, x and the core's parameters, the parallel form),
as tokens/s (median over repeats, after a warm-up); the memory it takes (CUDA: peak allocated during
the step; every device: the activations autograd saves for the backward); and the state a model of the
shape's depth keeps per sequence for generation after T tokens (softmax: its KV cache, which grows
with T; the recurrent presets: a fixed-size state).

The q/k/v projections, MLPs and LM head are the same for every preset and are left out. On CUDA the
step runs under bf16 autocast, as training does; on CPU in float32. Softmax is timed as training runs
it: GPT-2's own attention (surgery keeps `GPT2Attention`) through transformers' SDPA attention function,
with GPT-2's attention dropout (`attn_pdrop`, 0.1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from transformers import GPT2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dfw.attention import SoftmaxAttention
from dfw.model import core_factory
from dfw.presets import attention_preset, names

from .timing import Table, device_name, time_ms, write_json

PRESETS = ("softmax", "linear", "performer", "rfa", "t2r", "delta", "decay", "decay+window=16")


@dataclass(frozen=True)
class Shape:
    batch: int  # sequences per step
    seq_len: int  # T
    num_heads: int  # H
    head_dim: int  # D
    num_layers: int  # for the state size of a whole model

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim


SHAPES = {
    "gpt2-small": Shape(batch=8, seq_len=1024, num_heads=12, head_dim=64, num_layers=12),  # GPU default
    "gpt2-small-cpu": Shape(batch=1, seq_len=512, num_heads=12, head_dim=64, num_layers=12),  # CPU default
    "tiny": Shape(batch=2, seq_len=64, num_heads=2, head_dim=16, num_layers=2),  # smoke test
}


class GPT2SoftmaxCore(nn.Module):
    """Softmax as a softmax model trains (GPT2Attention, unconverted): transformers' SDPA attention function
    at GPT-2's scale, with GPT-2's attention dropout in training mode, on q, k, v."""

    is_causal = True  # read by transformers' attention function, as from GPT2Attention

    def __init__(self, shape: Shape):
        super().__init__()
        self.dropout = GPT2Config().attn_pdrop  # GPT-2's, 0.1
        # for its scale and its state_bytes (the KV cache)
        self.kv_cache = SoftmaxAttention(shape.hidden_size, shape.num_heads, shape.head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> tuple[Tensor, None]:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        o, _ = sdpa_attention_forward(self, q, k, v, None, dropout=dropout, scaling=self.kv_cache.scaling)
        return o, None  # (B, T, H, D)

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return self.kv_cache.state_bytes(batch_size, seq_len, dtype)


def preset_node(spec: str):
    """`name` or `name+option=value+...`: conf/attention/<name>.yaml with those options set (YAML values)."""
    name, *options = spec.split("+")
    node = attention_preset(name)
    for option in options:
        key, _, value = option.partition("=")
        node[key] = yaml.safe_load(value)
    return node


def build_core(preset: str, shape: Shape, device: torch.device) -> nn.Module:
    node = preset_node(preset)
    factory = core_factory(node)
    H, D = shape.num_heads, shape.head_dim
    core = factory(hidden_size=shape.hidden_size, num_heads=H, head_dim=D, layer_idx=0)
    if isinstance(core, SoftmaxAttention):  # a softmax model keeps GPT-2's attention: time that
        core = GPT2SoftmaxCore(shape)
    return core.to(device)


def _saved_bytes(step, parameters) -> int:
    """Bytes of the activations autograd saves for the backward (distinct storages), over one forward.

    The layer's parameters are left out: autograd saves them too (a Linear's weight), but they are in
    memory with or without a backward."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(storages.values())


def measure(preset: str, shape: Shape, device: torch.device, warmup: int, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    core = build_core(preset, shape, device).train()
    B, T, H, D, C = shape.batch, shape.seq_len, shape.num_heads, shape.head_dim, shape.hidden_size
    q, k, v = (torch.randn(B, T, H, D, device=device, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(backward: bool = True) -> None:
        with autocast:
            o, _ = core(q, k, v, x)
        if backward:
            o.float().square().mean().backward()

    peak = None
    if device.type == "cuda":
        step()  # warm: allocator and lazy initialisation
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    timing = time_ms(step, device, warmup, repeats)
    state_bytes = core.state_bytes(1, T) * shape.num_layers  # per sequence, whole model
    return {
        "preset": preset,
        "tokens/s": B * T / (timing.median_ms / 1e3),
        "step ms": timing,
        "peak MiB": peak,
        "saved MiB": _saved_bytes(step, core.parameters()) / 2**20,
        "state/seq": state_bytes,
        "params": sum(p.numel() for p in core.parameters()),
    }


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dfw.bench attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="default: gpt2-small on CUDA, gpt2-small-cpu on CPU"
    )
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated conf/attention names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape_name = args.shape or ("gpt2-small" if device.type == "cuda" else "gpt2-small-cpu")
    shape = SHAPES[shape_name]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p.split("+")[0] not in names("attention")]
    if unknown:
        parser.error(f"no conf/attention/{unknown[0]}.yaml; choose from {', '.join(PRESETS)}")

    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    table = Table(
        f"attention core, one layer, training step (forward + backward), shape {shape_name}: "
        f"B={shape.batch} T={shape.seq_len} H={shape.num_heads} D={shape.head_dim}; {device_name(device)}, "
        f"{precision}; step ms: median ±IQR/2 of {args.repeats} after {args.warmup} warm-up",
        ["preset", "tokens/s", "step ms", "peak MiB", "saved MiB", "state/seq", "new params"],
    )
    table.notes.append(
        f"state/seq: generation state per sequence after T tokens, {shape.num_layers} layers, as kept "
        "(fp32 states, KV cache in fp32); peak MiB on CUDA only"
    )
    for preset in presets:
        row = measure(preset, shape, device, args.warmup, args.repeats)
        params, state = row.pop("params"), row.pop("state/seq")
        table.add(**row, **{"state/seq": _bytes(state), "new params": params})
    rows = {row["preset"]: row for row in table.rows}
    if "decay" in rows and "softmax" in rows:  # the two ratios issue 11 (item 8) tracks
        decay, softmax = rows["decay"], rows["softmax"]
        table.notes.append(
            f"ratios decay/softmax: tokens/s {decay['tokens/s'] / softmax['tokens/s']:.2f}x, "
            f"saved for backward {decay['saved MiB'] / softmax['saved MiB']:.1f}x"
        )
    if "decay" in rows and "decay+window=16" in rows:  # issue 19's target: at most 1.3x DFW's step
        window, decay = rows["decay+window=16"], rows["decay"]
        table.notes.append(
            "ratio decay+window=16/decay: step time "
            f"{window['step ms'].median_ms / decay['step ms'].median_ms:.2f}x, "
            f"saved for backward {window['saved MiB'] / decay['saved MiB']:.1f}x"
        )
    table.print()
    write_json(args.json, "attention", device, [table], shape=shape.__dict__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
