"""`python -m dfw_kernels COMMAND`: the kernels' ahead-of-time tools.

    python -m dfw_kernels build        build the CUDA extension now (into DFW_KERNELS_BUILD_DIR if set)
    python -m dfw_kernels aot          compile the Triton kernels for a GPU target without a GPU, and
                                       print registers, stack frame, spills and shared memory per kernel
    python -m dfw_kernels aot --arch 80 --dtype bfloat16 float32 --size 64 128 --json out.json
    python -m dfw_kernels aot --size 64 --variant full training no-gates   the kernels' other branches

`aot` exits 1 when a kernel spills at a size given to --fail-on-spill (the CI test passes 64).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VARIANTS = ("full", "training", "no-gates")  # aot.VARIANTS (not imported here: it imports Triton)


def build(args: argparse.Namespace) -> int:
    from . import cuda

    reason = cuda.unavailable_reason() if torch.cuda.is_available() else None
    if reason is not None:
        print(f"dfw_kernels: the CUDA kernel cannot run here: {reason}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        extension = cuda.load_extension(verbose=args.verbose)
    except cuda.KernelUnavailable as error:
        print(f"dfw_kernels: {error}", file=sys.stderr)
        return 1
    print(f"dfw_kernels: CUDA extension ready in {time.perf_counter() - start:.1f} s: {extension.__file__}")
    return 0


def aot(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "error: ahead-of-time compiles need Triton outside its interpreter: unset TRITON_INTERPRET",
            file=sys.stderr,
        )
        return 2
    from . import triton_chunk

    if triton_chunk.triton is None:
        print("error: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    from .aot import compile_scan, markdown_table

    reports = []
    for dtype in args.dtype:
        for size in args.size:
            for direction, variant in itertools.product(args.direction, args.variant):
                scan = compile_scan(args.arch, DTYPES[dtype], size, size, direction == "reverse", variant)
                for report in scan:  # progress on stderr; the table at the end on stdout
                    print(json.dumps(asdict(report)), file=sys.stderr, flush=True)
                reports += scan
    print(
        f"Triton {triton_chunk.triton.__version__}, sm_{args.arch}, the GPT-2 training shape "
        f"(B=16, T=1024, H=12), state_size = head_size = size:"
    )
    print(markdown_table(reports))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    spilling = [r for r in reports if r.spills and r.state_size in args.fail_on_spill]
    for r in spilling:
        print(
            f"error: the {r.direction} {r.kernel} kernel spills at {r.dtype}, size {r.state_size}: "
            f"{r.spill_stores} B stored, {r.spill_loads} B loaded per thread",
            file=sys.stderr,
        )
    unread = [r for r in reports if r.registers < 0]
    if unread:
        print(f"error: no ptxas report for {len(unread)} kernels", file=sys.stderr)
    return 1 if spilling or unread else 0


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m dfw_kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="build the CUDA extension ahead of time")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    p.set_defaults(run=build)
    p = commands.add_parser(
        "aot", help="compile the Triton kernels for a GPU target and report registers/spills"
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bfloat16"])
    p.add_argument("--size", nargs="+", type=int, default=[64, 128], help="state_size = head_size values")
    p.add_argument("--direction", nargs="+", choices=["forward", "reverse"], default=["forward", "reverse"])
    p.add_argument(
        "--variant",
        nargs="+",
        choices=VARIANTS,
        default=["full"],
        help="full: initial and final states, both gates; training: no states; no-gates: neither",
    )
    p.add_argument(
        "--fail-on-spill",
        nargs="*",
        type=int,
        default=[],
        metavar="SIZE",
        help="exit 1 if a kernel spills at one of these sizes",
    )
    p.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    p.set_defaults(run=aot)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
