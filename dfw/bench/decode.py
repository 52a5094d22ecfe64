"""`python -m dfw.bench decode`: per-token decode latency and cache memory against context length.

In one process, for each batch size, three models of the same shape and random weights:
  softmax   Hugging Face GPT2LMHeadModel (SDPA) with its KV cache (DynamicCache), one eager forward per
            token, as `generate` runs it: the KV cache grows by 2 * layers * width values per token.
  dfw       the same GPT-2 converted to decaying fast weights (conf/attention/decay.yaml, state size m =
            the head size), a `DFWForCausalLM` with `dfw.cache.RecurrentCache`: a fixed-size state per layer,
            decoded by the library's eager decode step (`dfw.cache.decode`, what `generate` runs). On a GPU,
            also row `dfw (graph)`: the same step replayed from the CUDA graph the library captures
            (`dfw.cache.DecodeGraphs`, once per batch size), so that kernel-launch overhead on the host does
            not hide the O(1) cost per token.
  dfw + softmax layer   the same conversion with softmax kept in one layer, the middle one
            (`attention.softmax_layers=[n_layer // 2]`, docs/hybrids.md): that layer's KV cache grows with the
            context beside the other layers' fixed states; decoded by transformers' forward (a KV cache is not
            static, so the lean step and its CUDA graph do not apply).
Each context is reached by prefilling random tokens in chunks (the parallel form), then --warmup
decode steps, then the median over --steps timed steps (greedy: each step feeds back its argmax).

Fixed, named sizes (--size): `gpu` is GPT-2 small (12 layers, 12 heads of 64, bfloat16) at contexts
256 to 16,384 and batch 1 and 32; `cpu` is a 4-layer, 256-wide GPT-2 (heads of 64, float32) at
contexts 256 to 2,048 and batch 1 and 8, small enough for a laptop. GPT-2 has 1,024 learned positions;
here the models are built with enough positions for the longest context (random weights: for timing
only), which the output says.

    python -m dfw.bench decode                         # --size gpu on a GPU, cpu otherwise
    python -m dfw.bench decode --size gpu --plot outputs/bench/decode_gpu.png
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from .. import presets
from ..cache import RecurrentCache, cache_bytes
from ..hf import as_dfw_model
from ..surgery import convert_to
from .timing import Table, Timing, device_name, time_ms, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    n_embd: int
    dtype: torch.dtype
    contexts: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    prefill_chunk: int  # tokens per prefill call
    steps: int
    warmup: int


SIZES = {
    "gpu": Size(
        12, 12, 768, torch.bfloat16, (256, 512, 1024, 2048, 4096, 8192, 16384), (1, 32), 1024, 50, 10
    ),
    "cpu": Size(4, 4, 256, torch.float32, (256, 512, 1024, 2048), (1, 8), 256, 10, 3),
}
VOCAB = 50257
HYBRID = "dfw + softmax layer"  # the row of DFW with one layer kept softmax


@dataclass
class Row:
    model: str
    batch: int
    context: int
    ms_per_token: float  # median
    state_bytes: int
    spread_ms: float = 0.0  # interquartile range of the timed steps
    peak_bytes: int | None = None  # CUDA: peak allocated during the timed steps, model weights included
    notes: list[str] = field(default_factory=list)


def build(
    size: Size,
    attention: str | None,
    n_positions: int,
    device: torch.device,
    softmax_layers: list[int] | None = None,
) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=n_positions,
        n_layer=size.n_layer,
        n_head=size.n_head,
        n_embd=size.n_embd,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    config._attn_implementation = "sdpa"
    net = GPT2LMHeadModel(config)
    if attention is not None:
        node = presets.attention_preset(attention)
        node.softmax_layers = softmax_layers
        convert_to(net, node)
        net = as_dfw_model(net, OmegaConf.to_container(node, resolve=True))  # decodes as an export does
    return net.to(device=device, dtype=size.dtype).eval()


class Decoder:
    """One model, one batch: prefill to a context, then time greedy decode steps, each one forward call as
    `generate` makes it (for dfw: the library's decode step, eager or replayed from its CUDA graph)."""

    def __init__(self, net: GPT2LMHeadModel, batch: int, device: torch.device, recurrent: bool, graph: bool):
        self.net, self.device = net, device
        self.cache = RecurrentCache(net, cuda_graph=graph) if recurrent else DynamicCache(config=net.config)
        self.seen = 0
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1), the token being fed

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, position_ids=position_ids, cache=self.cache, use_cache=True).logits

    def prefill(self, context: int, chunk: int, generator: torch.Generator) -> None:
        B = self.ids.shape[0]
        while self.seen < context:
            n = min(chunk, context - self.seen)
            ids = torch.randint(0, VOCAB, (B, n), generator=generator).to(self.device)  # (B, n)
            positions = torch.arange(self.seen, self.seen + n, device=self.device)[None]  # (1, n)
            self.forward(ids, positions)
            self.seen += n

    def step(self) -> None:
        position = torch.full((1, 1), self.seen, dtype=torch.long, device=self.device)  # (1, 1)
        logits = self.forward(self.ids, position)  # (B, 1, V)
        self.ids.copy_(logits[:, -1:].argmax(dim=-1))  # greedy: the next input
        self.seen += 1

    def time_steps(self, warmup: int, steps: int) -> Timing:
        """ms per decode step (median, spread); a CUDA graph is captured during the warm-up steps."""
        return time_ms(self.step, self.device, warmup, steps)

    def graph_note(self) -> str | None:
        """What the library did with the CUDA graph of this decoder's cache (None: not asked for one)."""
        graphs = self.cache.graphs if isinstance(self.cache, RecurrentCache) else None
        if graphs is None:
            return None
        if graphs.replays == 0:
            return f"no CUDA graph: {graphs.fallback_reason or 'no decode step ran'}; eager"
        return f"CUDA graph: {graphs.captures} captured, {graphs.replays} replays"


def run(
    size: Size, device: torch.device, graphs: bool, attention: str = "decay"
) -> tuple[list[Row], list[str]]:
    n_positions = max(size.contexts) + 4 * (size.warmup + size.steps) + 16
    notes = [
        f"models: GPT-2 shape, {size.n_layer} layers, {size.n_head} heads of {size.n_embd // size.n_head}, "
        f"{str(size.dtype).removeprefix('torch.')}, random weights, {n_positions} learned positions "
        f"(GPT-2 has 1024: raised so that every context fits; for timing only)",
    ]
    kept = [size.n_layer // 2]  # the hybrid's one softmax layer: the middle one
    notes.append(f"{HYBRID}: softmax kept in layer {kept[0]} of {size.n_layer}, the others converted")
    # (row name, preset, CUDA graph, attention.softmax_layers)
    variants: list[tuple[str, str | None, bool, list[int] | None]] = [
        ("softmax", None, False, None),
        ("dfw", attention, False, None),
        (HYBRID, attention, False, kept),
    ]
    if device.type == "cuda" and graphs:
        variants.append(("dfw (graph)", attention, True, None))
    rows = []
    for name, core, graph, softmax_layers in variants:
        net = build(size, core, n_positions, device, softmax_layers)
        for batch in size.batch_sizes:
            generator = torch.Generator().manual_seed(batch)
            decoder = Decoder(net, batch, device, recurrent=core is not None, graph=graph)
            for context in size.contexts:
                row = Row(name, batch, context, float("nan"), 0)
                try:
                    with torch.no_grad():
                        decoder.prefill(context, size.prefill_chunk, generator)
                        row.state_bytes = cache_bytes(decoder.cache)  # after exactly `context` tokens
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        timing = decoder.time_steps(size.warmup, size.steps)
                        row.ms_per_token, row.spread_ms = timing.median_ms, timing.iqr_ms
                    if device.type == "cuda":
                        row.peak_bytes = torch.cuda.max_memory_allocated(device)
                except torch.cuda.OutOfMemoryError:
                    row.notes.append("out of memory")
                    rows.append(row)
                    break
                note = decoder.graph_note() if graph else None
                if note is not None and not note.startswith("CUDA graph:"):
                    row.notes.append(note)  # the library fell back to eager steps: say why
                rows.append(row)
                print(
                    f"  {name}, batch {batch}, context {context}: {row.ms_per_token:.3g} ms/token", flush=True
                )
            if graph and (note := decoder.graph_note()) is not None:
                notes.append(f"{name}, batch {batch}: {note}")
            del decoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del net
    return rows, notes


def table(rows: list[Row], title: str, steps: int) -> Table:
    out = Table(
        title,
        ["model", "batch", "context", "ms/token", "tokens/s", "state MiB", "MiB/seq", "peak MiB", "notes"],
    )
    for row in rows:
        ok = row.ms_per_token == row.ms_per_token
        out.add(
            model=row.model,
            batch=row.batch,
            context=row.context,
            **{
                "ms/token": Timing(row.ms_per_token, row.spread_ms, steps) if ok else None,
                "tokens/s": row.batch * 1e3 / row.ms_per_token if ok else None,
                "state MiB": row.state_bytes / 2**20,
                "MiB/seq": row.state_bytes / row.batch / 2**20,
                "peak MiB": row.peak_bytes / 2**20 if row.peak_bytes is not None else None,
                "notes": "; ".join(row.notes) or None,
            },
        )
    return out


def summary(rows: list[Row]) -> list[str]:
    """Flatness of each curve (slowest over fastest context) and softmax over the fastest pure dfw row at
    equal batch and context."""
    lines = []
    width = max((len(r.model) for r in rows), default=12)
    for model in dict.fromkeys(r.model for r in rows):
        for batch in dict.fromkeys(r.batch for r in rows):
            curve = [
                r for r in rows if r.model == model and r.batch == batch and r.ms_per_token == r.ms_per_token
            ]
            if len(curve) < 2:
                continue
            times = [r.ms_per_token for r in curve]
            states = {r.state_bytes for r in curve}
            lines.append(
                f"{model:<{width}} batch {batch:>3}: ms/token {min(times):.2f} to {max(times):.2f} "
                f"(slowest / fastest = {max(times) / min(times):.2f}) from {curve[0].context} to "
                f"{curve[-1].context} tokens; state {'constant' if len(states) == 1 else 'grows'}: "
                f"{min(states) / curve[0].batch / 2**20:.2f} to {max(states) / curve[0].batch / 2**20:.2f} "
                "MiB per sequence"
            )
    fastest = {}
    for r in rows:
        if r.model not in ("softmax", HYBRID) and r.ms_per_token == r.ms_per_token:  # pure dfw rows
            key = (r.batch, r.context)
            fastest[key] = min(fastest.get(key, float("inf")), r.ms_per_token)
    for r in rows:
        if (
            r.model == "softmax"
            and (r.batch, r.context) in fastest
            and r.context == max(x.context for x in rows if x.batch == r.batch and x.model == "softmax")
        ):
            lines.append(
                f"softmax / fastest dfw at batch {r.batch}, context {r.context}: "
                f"{r.ms_per_token / fastest[(r.batch, r.context)]:.1f}x"
            )
    return lines


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in dict.fromkeys(r.model for r in rows):
        for batch in dict.fromkeys(r.batch for r in rows):
            curve = [
                r for r in rows if r.model == model and r.batch == batch and r.ms_per_token == r.ms_per_token
            ]
            if not curve:
                continue
            contexts = [r.context for r in curve]
            style = {"softmax": "-", "dfw": "--", HYBRID: "-."}.get(model, ":")
            label = f"{model}, batch {batch}"
            ax_time.plot(contexts, [r.ms_per_token for r in curve], style, marker="o", label=label)
            ax_memory.plot(
                contexts, [r.state_bytes / r.batch / 2**20 for r in curve], style, marker="o", label=label
            )
    ax_time.set(
        xscale="log",
        yscale="log",
        xlabel="context (tokens)",
        ylabel="ms per decode step",
        title="decode latency",
    )
    ax_memory.set(
        xscale="log",
        yscale="log",
        xlabel="context (tokens)",
        ylabel="MiB per sequence",
        title="cache / state memory",
    )
    for ax in (ax_time, ax_memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfw.bench decode", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=[*SIZES, "auto"], default="auto", help="auto: gpu on a GPU, cpu otherwise"
    )
    parser.add_argument("--contexts", type=int, nargs="+", help="override the size's context lengths")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="override the size's batch sizes")
    parser.add_argument("--steps", type=int, help="timed decode steps per point (median)")
    parser.add_argument("--warmup", type=int, help="untimed decode steps per point")
    parser.add_argument("--attention", default="decay", help="conf/attention preset of the converted model")
    parser.add_argument(
        "--no-cuda-graph", action="store_true", help="on a GPU, time the eager decode step only"
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("outputs/bench/decode.png"), help="where to write the PNG"
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES["gpu" if device.type == "cuda" else "cpu"] if args.size == "auto" else SIZES[args.size]
    overrides = {
        "contexts": tuple(sorted(args.contexts)) if args.contexts else None,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    size = Size(**{**size.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    where = device_name(device)
    print(
        f"decode benchmark on {where}: {size.steps} timed steps after {size.warmup} warm-up steps per point",
        flush=True,
    )
    rows, notes = run(size, device, graphs=not args.no_cuda_graph, attention=args.attention)
    result = table(rows, f"decode: ms per token (median ±IQR/2 of {size.steps} steps) on {where}", size.steps)
    result.notes += summary(rows) + notes
    result.print()
    title = f"{where}; {notes[0]}"
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}")
    write_json(
        args.json,
        "decode",
        device,
        [result],
        size={**asdict(size), "dtype": str(size.dtype)},
        plot=str(args.plot),
    )
    return 0
