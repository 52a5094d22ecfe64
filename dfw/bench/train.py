"""`python -m dfw.bench train`: end-to-end training throughput, through the real LightningModule and
optimizer.

For each variant, a GPT-2-shaped model with random weights (no hub) and GPT-2's vocabulary is built by
`dfw.model.build_model` from the composed training config (conf/train.yaml: `module` = LanguageModel,
AdamW, the LR schedule; `trainer` = gradient clipping, precision), and Lightning's `Trainer.fit` runs
--warmup + --steps optimizer steps on random token blocks. Every step is timed between two
synchronisations (a Lightning callback); the table gives tokens/s from the median step, the step's
median and spread, and the peak GPU memory of the timed steps.

Variants: softmax (the model's own SDPA attention), decay (conf/attention/decay.yaml) with the CUDA
kernel, decay with the PyTorch chunked reference, and on a GPU the first two again under torch.compile
(--no-compile skips those). A variant that cannot run here (no GPU for the CUDA kernel, a compile error)
is a row with a note, not a crash.

Fixed, named sizes (--size): `gpu` is GPT-2 small (12 layers, 12 heads of 64, 768 wide), batch
16 x 1,024 tokens, bf16-mixed; `cpu` is a 2-layer, 64-wide GPT-2 at batch 2 x 64 in float32 (what the
CPU tests run).

    python -m dfw.bench train                  # --size gpu on a GPU, cpu otherwise
    python -m dfw.bench train --size cpu --json outputs/bench/train.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .. import presets
from ..model import build_model
from .timing import Table, Timing, device_name, write_json

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    n_embd: int
    batch: int  # sequences per optimizer step
    seq_len: int  # tokens per sequence
    precision: str  # Lightning's trainer.precision
    steps: int  # timed optimizer steps
    warmup: int  # untimed steps first (allocator, autotuning, compilation)


SIZES = {
    "gpu": Size(
        n_layer=12, n_head=12, n_embd=768, batch=16, seq_len=1024, precision="bf16-mixed", steps=10, warmup=4
    ),
    "cpu": Size(n_layer=2, n_head=2, n_embd=64, batch=2, seq_len=64, precision="32-true", steps=3, warmup=1),
}


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str  # conf/attention preset
    kernel: str | None  # attention.kernel override (decay presets)
    compile: bool

    @property
    def key(self) -> str:
        """What --variants calls it: softmax, decay-cuda, decay-torch, softmax-compiled, ..."""
        kernel = [self.kernel] if self.kernel else []
        return "-".join([self.attention, *kernel, *(["compiled"] if self.compile else [])])


VARIANTS = (
    Variant("softmax (sdpa)", "softmax", None, False),
    Variant("decay, cuda kernel", "decay", "cuda", False),
    Variant("decay, torch reference", "decay", "torch", False),
    Variant("softmax (sdpa), compiled", "softmax", None, True),
    Variant("decay, cuda kernel, compiled", "decay", "cuda", True),
)


class _Vocabulary:
    """What build_model asks of a tokenizer: its size and end-of-text id (GPT-2's; the tokens are random)."""

    eos_token_id = GPT2_VOCAB - 1

    def __len__(self) -> int:
        return GPT2_VOCAB


class StepTimer(L.Callback):
    """Wall time of every optimizer step (synchronised on CUDA) and the peak memory after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.samples_ms, self.peak_bytes = warmup, [], None
        self._start = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        if batch_idx == self.warmup and module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        if batch_idx >= self.warmup:
            self.samples_ms.append(1e3 * (time.perf_counter() - self._start))

    def on_train_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(module.device)


def _compose(variant: Variant, size: Size, root: Path):
    overrides = [
        "model=tiny",
        f"attention={variant.attention}",
        f"model.config.n_layer={size.n_layer}",
        f"model.config.n_head={size.n_head}",
        f"model.config.n_embd={size.n_embd}",
        f"model.config.n_positions={max(size.seq_len, 1024)}",
        f"trainer.max_steps={size.warmup + size.steps}",
        f"trainer.precision={size.precision}",
        f"paths.output_dir={root}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    if variant.kernel is not None:
        overrides.append(f"attention.kernel={variant.kernel}")
    return presets.compose("train", overrides)


def measure(variant: Variant, size: Size, device: torch.device) -> dict[str, object]:
    """One row: tokens/s, step time and peak memory of `variant` at `size` (raises if it cannot run)."""
    from dfw.errors import instantiate

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cfg = _compose(variant, size, Path(root))
        net = build_model(cfg.model, cfg.attention, _Vocabulary())
        module = instantiate(cfg.module, _partial_=True)(net=net, run_config=None)
        if variant.compile:
            module.net = torch.compile(module.net)
        n_steps = size.warmup + size.steps
        tokens = torch.randint(
            0, GPT2_VOCAB, (n_steps * size.batch, size.seq_len), generator=torch.Generator().manual_seed(0)
        )
        loader = DataLoader([{"input_ids": t} for t in tokens], batch_size=size.batch)
        timer = StepTimer(size.warmup)
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            accelerator=device.type,
            devices=1,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
        )
        trainer.fit(module, train_dataloaders=loader)
    if len(timer.samples_ms) != size.steps:
        raise RuntimeError(f"timed {len(timer.samples_ms)} steps, expected {size.steps}")
    timing = Timing.of(timer.samples_ms)
    return {
        "tokens/s": size.batch * size.seq_len / (timing.median_ms / 1e3),
        "step ms": timing,
        "peak GiB": None if timer.peak_bytes is None else timer.peak_bytes / 2**30,
    }


def run(size: Size, device: torch.device, variants=VARIANTS) -> Table:
    table = Table(
        f"training throughput on {device_name(device)}: GPT-2 shape {size.n_layer} layers x {size.n_head} "
        f"heads, {size.n_embd} wide, random weights, batch {size.batch} x {size.seq_len} tokens, "
        f"{size.precision}; step ms: median ±IQR/2 of {size.steps} optimizer steps after {size.warmup}",
        ["variant", "tokens/s", "step ms", "peak GiB", "vs softmax", "note"],
    )
    baseline: dict[bool, float] = {}  # compile -> softmax tokens/s
    for variant in variants:
        if variant.kernel == "cuda" and device.type != "cuda":
            table.add(variant=variant.name, note="needs an NVIDIA GPU")
            continue
        if variant.compile and device.type != "cuda":
            table.add(variant=variant.name, note="compiled variants run on a GPU only")
            continue
        try:
            row = measure(variant, size, device)
        except Exception as error:  # one variant that cannot run here is a row with its reason
            if device.type == "cuda":
                torch.cuda.empty_cache()
            table.add(
                variant=variant.name, note=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            )
            continue
        if variant.attention == "softmax":
            baseline[variant.compile] = row["tokens/s"]
        share = row["tokens/s"] / baseline[variant.compile] if variant.compile in baseline else None
        table.add(variant=variant.name, **row, **{"vs softmax": share})
        print(f"  {variant.name}: {row['tokens/s']:,.0f} tokens/s", flush=True)
    table.notes.append("vs softmax: tokens/s over softmax's with the same compile setting")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfw.bench train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=[*SIZES, "auto"], default="auto", help="auto: gpu on a GPU, cpu otherwise"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument(
        "--variants", nargs="+", choices=[v.key for v in VARIANTS], help="only these variants (default: all)"
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per variant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[("gpu" if device.type == "cuda" else "cpu") if args.size == "auto" else args.size]
    overrides = {"steps": args.steps, "warmup": args.warmup}
    size = Size(**{**asdict(size), **{k: v for k, v in overrides.items() if v is not None}})
    chosen = set(args.variants or [v.key for v in VARIANTS])
    variants = [v for v in VARIANTS if not (args.no_compile and v.compile) and v.key in chosen]
    table = run(size, device, variants)
    table.print()
    write_json(args.json, "train", device, [table], size=asdict(size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
