"""`python -m dfw.bench kernel`: the DFW recurrence kernels at GPT-2-small shapes, on one GPU.

Shapes (fixed, named): H = 12 heads of D = 64, 16,384 tokens per batch (B = 16384 / T), T in
{512, 1024, 2048, 4096, 8192}, bfloat16 q, k, v and float32 log-gates on both sides. For each T it
times, in this process, forward and forward+backward (medians and spread over --reps after --warmup runs, CUDA
events, dfw/bench/timing.py):
  dfw cuda       this project's fused recurrent kernel (dfw_kernels, kernel="cuda")
  dfw triton     this project's chunked tensor-core kernel (kernel="triton", triton_chunk.py)
  torch chunked  the PyTorch path (kernel="torch": chunked.py's scan, chunks up to 64), the fallback
  sdpa           torch SDPA, causal, FlashAttention backend: softmax attention, the floor to aim at
  fla recurrent  fla's fused_recurrent_gla(q, k, v, gk, gv, scale=1.0): the same two-sided recurrence
  fla chunk      fla's chunk_gla(q, k, v, g=gk, scale=1.0): key-side gate only (it has no value gate)
(the fla rows need the optional extra: pip install -e '.[fla]'). Then the decode step (one token, the
state updated in place) against batch size. Targets on an H200 are in kernels/README.md.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .timing import Table, Timing, time_ms, write_json

TOKENS_PER_BATCH = 16_384
HEADS, HEAD_DIM = 12, 64
SEQ_LENS = (512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 8, 32, 128, 512)


def _try(fn: Callable[[], Timing]) -> Timing | str:
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as error:  # a peer op that does not run here: say why in the table's notes
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _inputs(B: int, T: int, dtype: torch.dtype, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)
    q = (randn(B, T, HEADS, HEAD_DIM) * HEAD_DIM**-0.5).to(dtype)
    k = (randn(B, T, HEADS, HEAD_DIM) * HEAD_DIM**-0.5).to(dtype)
    v = randn(B, T, HEADS, HEAD_DIM).to(dtype)
    gk = F.logsigmoid(randn(B, T, HEADS, HEAD_DIM) + 3.0)  # float32 log-gates, mostly near 1
    gv = F.logsigmoid(randn(B, T, HEADS, HEAD_DIM) + 3.0)
    for x in (q, k, v, gk, gv):
        x.requires_grad_()
    return q, k, v, gk, gv


def _fwd_and_fwdbwd(
    run: Callable[[], torch.Tensor], leaves, warmup: int, reps: int
) -> tuple[Timing | str, Timing | str]:
    """(forward ms, forward+backward ms) of run(), whose output is differentiated w.r.t. leaves."""

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        o = run()
        torch.autograd.grad(o, leaves, grad_outputs=torch.ones_like(o))

    return _try(lambda: time_ms(forward, "cuda", warmup, reps)), _try(
        lambda: time_ms(forward_backward, "cuda", warmup, reps)
    )


def _fla_ops():
    """fla's fused_recurrent_gla and chunk_gla, wrapped to take [B, T, H, D], or None if not installed."""
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except Exception:
        return None
    layout = {}
    if (
        "head_first" in inspect.signature(fused_recurrent_gla).parameters
    ):  # older fla: [B, H, T, D] by default
        layout = {"head_first": False}

    def recurrent(q, k, v, gk, gv):
        return fused_recurrent_gla(q, k, v, gk=gk, gv=gv, scale=1.0, **layout)[0]

    def chunk(q, k, v, gk, gv):
        return chunk_gla(q, k, v, g=gk, scale=1.0, **layout)[0]

    return recurrent, chunk


def _ratios(numerators, denominators, digits: int) -> str:
    """'a/b x, ...' of (fwd, fwd+bwd) timings; n/a where either did not run."""
    return ", ".join(
        f"{a.median_ms / b.median_ms:.{digits}f}x"
        if isinstance(a, Timing) and isinstance(b, Timing)
        else "n/a"
        for a, b in zip(numerators, denominators, strict=True)
    )


def _bench_seq_len(T: int, dtype, warmup: int, reps: int, with_torch: bool, fla) -> dict:
    """One row of the training table: {op name: (fwd ms, fwd+bwd ms)} at sequence length T."""
    from dfw_kernels import decay_fast_weights
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = max(1, TOKENS_PER_BATCH // T)
    q, k, v, gk, gv = leaves = _inputs(B, T, dtype)

    def sdpa():
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

    ops = {"dfw cuda": (lambda: decay_fast_weights(q, k, v, gk, gv, kernel="cuda")[0], leaves)}
    ops["dfw triton"] = (lambda: decay_fast_weights(q, k, v, gk, gv, kernel="triton")[0], leaves)
    if with_torch:
        ops["torch chunked"] = (
            lambda: decay_fast_weights(q, k, v, gk, gv, chunk_size=64, kernel="torch")[0],
            leaves,
        )
    ops["sdpa"] = (sdpa, (q, k, v))
    if fla is not None:
        ops["fla recurrent"] = (lambda: fla[0](q, k, v, gk, gv), leaves)
        ops["fla chunk"] = (lambda: fla[1](q, k, v, gk, gv), (q, k, v, gk))
    row = {"T": T, "B": B}
    for name, (run, wrt) in ops.items():
        row[name] = _fwd_and_fwdbwd(run, wrt, warmup, reps)
    return row


def _cell(x: Timing | str) -> Timing | str:
    return "n/a" if isinstance(x, str) and x.startswith("error") else x


def bench_training(seq_lens, dtype, warmup, reps, with_torch: bool) -> Table:
    fla = _fla_ops()
    rows = []
    for T in seq_lens:
        rows.append(_bench_seq_len(T, dtype, warmup, reps, with_torch, fla))
        torch.cuda.empty_cache()
    names = [n for n in rows[0] if n not in ("T", "B")]
    ratio = "fla recurrent / dfw (fwd, fwd+bwd)"
    triton_ratio = "dfw triton / sdpa (fwd, fwd+bwd)"
    columns = ["T", "B"] + [f"{n} {part}" for n in names for part in ("fwd", "fwd+bwd")]
    table = Table(
        f"Training: H={HEADS}, D={HEAD_DIM}, {TOKENS_PER_BATCH} tokens per batch, {dtype}, "
        f"ms (median ±IQR/2 of {reps}, CUDA events)",
        columns + ([ratio] if fla is not None else []) + [triton_ratio],
    )
    errors = set()
    for row in rows:
        cells = {"T": row["T"], "B": row["B"]}
        for n in names:
            for part, x in zip(("fwd", "fwd+bwd"), row[n], strict=True):
                cells[f"{n} {part}"] = _cell(x)
                if isinstance(x, str) and x.startswith("error"):
                    errors.add(x)
        if fla is not None:
            cells[ratio] = _ratios(row["fla recurrent"], row["dfw cuda"], digits=1)
        cells[triton_ratio] = _ratios(row["dfw triton"], row["sdpa"], digits=2)
        table.add(**cells)
    if fla is None:
        table.notes.append(
            "(fla not installed: pip install -e '.[fla]' for the fused_recurrent_gla and chunk_gla rows)"
        )
    table.notes.append("fla chunk = chunk_gla with the key-side gate only (it takes no value-side gate).")
    table.notes += [f"n/a: {note}" for note in sorted(errors)]
    table.print()
    return table


def _bench_decode_batch(B: int, dtype, warmup: int, reps: int, fla) -> dict:
    from dfw_kernels import decay_fast_weights_step

    q, k, v, gk, gv = (x.detach()[:, 0] for x in _inputs(B, 1, dtype))  # (B, H, D): one token
    state = torch.zeros(B, HEADS, HEAD_DIM, HEAD_DIM, device="cuda")
    step = lambda kernel: decay_fast_weights_step(q, k, v, gk, gv, state, kernel=kernel)
    row = {"B": B}
    row["dfw cuda"] = _try(lambda: time_ms(lambda: step("cuda"), "cuda", warmup, reps))
    row["torch"] = _try(lambda: time_ms(lambda: step("torch"), "cuda", warmup, reps))
    if fla is not None:
        from fla.ops.gla import fused_recurrent_gla

        q1, k1, v1, gk1, gv1 = (x.unsqueeze(1) for x in (q, k, v, gk, gv))  # (B, 1, H, D)
        fla_step = lambda: fused_recurrent_gla(
            q1, k1, v1, gk=gk1, gv=gv1, scale=1.0, initial_state=state, output_final_state=True
        )
        row["fla recurrent"] = _try(lambda: time_ms(fla_step, "cuda", warmup, reps))
    return row


def bench_decode(batches, dtype, warmup, reps) -> Table:
    fla = _fla_ops()
    rows = [_bench_decode_batch(B, dtype, warmup, reps, fla) for B in batches]
    table = Table(
        f"Decode step: one token, H={HEADS}, D={HEAD_DIM}, float32 state, {dtype} inputs, "
        f"ms (median ±IQR/2 of {reps}, CUDA events)",
        list(rows[0]),
    )
    for row in rows:
        table.add(**{n: _cell(x) for n, x in row.items()})
    table.print()
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfw.bench kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) PyTorch chunked reference")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m dfw.bench kernel needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    tables = [
        bench_training(args.seq_lens, dtype, args.warmup, args.reps, with_torch=not args.no_torch),
        bench_decode(args.decode_batches, dtype, args.warmup, args.reps),
    ]
    write_json(args.json, "kernel", "cuda", tables)
    return 0
