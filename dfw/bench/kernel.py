"""`python -m dfw.bench kernel`: the DFW recurrence kernels at GPT-2-small shapes, on one GPU.

Shapes (fixed, named): H = 12 heads of D = 64, 16,384 tokens per batch (B = 16384 / T), T in
{512, 1024, 2048, 4096, 8192}, bfloat16 q, k, v and float32 log-gates on both sides. For each T it
times, in this process, forward and forward+backward (medians over --reps after --warmup runs, CUDA
events):
  dfw cuda       this project's fused recurrent kernel (dfw_kernels, kernel="cuda")
  dfw triton     this project's chunked tensor-core kernel (kernel="triton", triton_chunk.py)
  torch chunked  the PyTorch chunkwise reference (chunk 64), the fallback
  sdpa           torch SDPA, causal, FlashAttention backend: softmax attention, the floor to aim at
  fla recurrent  fla's fused_recurrent_gla(q, k, v, gk, gv, scale=1.0): the same two-sided recurrence
  fla chunk      fla's chunk_gla(q, k, v, g=gk, scale=1.0): key-side gate only (it has no value gate)
(the fla rows need the optional extra: pip install -e '.[fla]'). Then the decode step (one token, the
state updated in place) against batch size. Targets on an H200 are in kernels/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

TOKENS_PER_BATCH = 16_384
HEADS, HEAD_DIM = 12, 64
SEQ_LENS = (512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 8, 32, 128, 512)


def median_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall time of fn() on the GPU, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _try(fn: Callable[[], float]) -> float | str:
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
) -> tuple[float | str, float | str]:
    """(forward ms, forward+backward ms) of run(), whose output is differentiated w.r.t. leaves."""

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        o = run()
        torch.autograd.grad(o, leaves, grad_outputs=torch.ones_like(o))

    return _try(lambda: median_ms(forward, warmup, reps)), _try(
        lambda: median_ms(forward_backward, warmup, reps)
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


def _ratios(numerators, denominators) -> str:
    """'a/b x, ...' for (fwd, fwd+bwd) pairs; n/a where either is not a time."""
    return ", ".join(
        f"{a / b:5.2f}x" if isinstance(a, float) and isinstance(b, float) else "  n/a"
        for a, b in zip(numerators, denominators, strict=True)
    )


def _fmt(x: float | str) -> str:
    return f"{x:8.2f}" if isinstance(x, float) else f"{'n/a' if x.startswith('error') else x:>8}"


def _bench_seq_len(T: int, dtype, warmup: int, reps: int, with_torch: bool, fla) -> dict:
    """One row of the training table: {op name: (fwd ms, fwd+bwd ms)} at sequence length T."""
    from dfw_kernels import chunk_decay_fast_weights, decay_fast_weights
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
        ops["torch chunked"] = (lambda: chunk_decay_fast_weights(q, k, v, gk, gv, chunk_size=64)[0], leaves)
    ops["sdpa"] = (sdpa, (q, k, v))
    if fla is not None:
        ops["fla recurrent"] = (lambda: fla[0](q, k, v, gk, gv), leaves)
        ops["fla chunk"] = (lambda: fla[1](q, k, v, gk, gv), (q, k, v, gk))
    row = {"T": T, "B": B}
    for name, (run, wrt) in ops.items():
        row[name] = _fwd_and_fwdbwd(run, wrt, warmup, reps)
    return row


def bench_training(seq_lens, dtype, warmup, reps, with_torch: bool) -> list[dict]:
    fla = _fla_ops()
    rows = []
    for T in seq_lens:
        rows.append(_bench_seq_len(T, dtype, warmup, reps, with_torch, fla))
        torch.cuda.empty_cache()
    notes = {x for row in rows for t in row.values() if isinstance(t, tuple) for x in t if isinstance(x, str)}
    notes = {x for x in notes if x.startswith("error")}

    names = [n for n in rows[0] if n not in ("T", "B")]
    header = f"{'T':>5} {'B':>3} | " + " | ".join(f"{n + ' fwd':>17} {'fwd+bwd':>8}" for n in names)
    ratio_name = "fla recurrent" if fla is not None else None
    if ratio_name:
        header += " | fla recurrent / dfw (fwd, fwd+bwd)"
    header += " | dfw triton / sdpa (fwd, fwd+bwd)"
    print(
        f"\nTraining: H={HEADS}, D={HEAD_DIM}, {TOKENS_PER_BATCH} tokens per batch, {dtype}, ms (median of {reps})"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['T']:>5} {row['B']:>3} | " + " | ".join(
            f"{_fmt(row[n][0]):>17} {_fmt(row[n][1])}" for n in names
        )
        if ratio_name:
            line += " | " + _ratios(row[ratio_name], row["dfw cuda"])
        print(line + " | " + _ratios(row["dfw triton"], row["sdpa"]))
    if fla is None:
        print("(fla not installed: pip install -e '.[fla]' for the fused_recurrent_gla and chunk_gla rows)")
    print("fla chunk = chunk_gla with the key-side gate only (it takes no value-side gate).")
    for note in sorted(notes):
        print(f"n/a: {note}")
    return rows


def _bench_decode_batch(B: int, dtype, warmup: int, reps: int, fla) -> dict:
    from dfw_kernels import decay_fast_weights_step

    q, k, v, gk, gv = (x.detach()[:, 0] for x in _inputs(B, 1, dtype))  # (B, H, D): one token
    state = torch.zeros(B, HEADS, HEAD_DIM, HEAD_DIM, device="cuda")
    step = lambda kernel: decay_fast_weights_step(q, k, v, gk, gv, state, kernel=kernel)
    row = {"B": B}
    row["dfw cuda"] = _try(lambda: median_ms(lambda: step("cuda"), warmup, reps))
    row["torch"] = _try(lambda: median_ms(lambda: step("torch"), warmup, reps))
    if fla is not None:
        from fla.ops.gla import fused_recurrent_gla

        q1, k1, v1, gk1, gv1 = (x.unsqueeze(1) for x in (q, k, v, gk, gv))  # (B, 1, H, D)
        fla_step = lambda: fused_recurrent_gla(
            q1, k1, v1, gk=gk1, gv=gv1, scale=1.0, initial_state=state, output_final_state=True
        )
        row["fla recurrent"] = _try(lambda: median_ms(fla_step, warmup, reps))
    return row


def bench_decode(batches, dtype, warmup, reps) -> list[dict]:
    fla = _fla_ops()
    rows = [_bench_decode_batch(B, dtype, warmup, reps, fla) for B in batches]
    names = [n for n in rows[0] if n != "B"]
    print(
        f"\nDecode step: one token, H={HEADS}, D={HEAD_DIM}, float32 state, {dtype} inputs, ms (median of {reps})"
    )
    header = f"{'B':>5} | " + " | ".join(f"{n:>13}" for n in names)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['B']:>5} | " + " | ".join(f"{_fmt(row[n]):>13}" for n in names))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfw.bench kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) PyTorch chunked reference")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m dfw.bench kernel needs an NVIDIA GPU (torch.cuda.is_available() is False)")
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bench_training(args.seq_lens, dtype, args.warmup, args.reps, with_torch=not args.no_torch)
    bench_decode(args.decode_batches, dtype, args.warmup, args.reps)
    return 0
