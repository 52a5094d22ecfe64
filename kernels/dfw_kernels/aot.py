"""Ahead-of-time compiles of the Triton kernels for a CUDA target, on any machine (no GPU needed).

`python -m dfw_kernels aot` compiles the kernels of one scan (triton_chunk.py) the way `triton_scan`
launches them at the GPT-2 training shape (B = 16, T = 1,024, H = 12; contiguous inputs, so pointers
16-byte aligned and sizes divisible by 16 are specialised as a launch would), with `triton.compile`
and a `GPUTarget`, and reports what the compiler's resource report (ptxas -v) says per kernel:
registers per thread, stack frame, spill stores and loads (> 0: registers spill to local memory),
shared memory. The forward variant is the forward pass (`out`, `out_pre`, the final states); the
reverse one is the backward's adjoint scans (`out`, the gate-gradient epilogue, the final state).

Needs Triton outside its interpreter (TRITON_INTERPRET unset): the command unsets nothing itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import triton_chunk

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GPT2_TRAINING_SHAPE = {"B": 16, "T": 1024, "H": 12}


@dataclass(frozen=True)
class Pointer:
    """A tensor argument: its Triton element type (bf16, fp32, ...)."""

    dtype: str


@dataclass
class KernelReport:
    kernel: str
    dtype: str
    state_size: int
    head_size: int
    direction: str  # forward | reverse
    variant: str  # VARIANTS
    arch: int
    num_warps: int
    num_stages: int
    registers: int  # per thread; -1 if the report could not be read
    stack_bytes: int  # stack frame per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int
    compile_seconds: float

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _ptxas_report(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from ptxas -v output; -1 where absent."""
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack, stores, loads = (int(x) for x in frame.groups()) if frame else (-1, -1, -1)
    return (int(registers.group(1)) if registers else -1), stack, stores, loads


def _ptxas_path() -> str | None:
    """The ptxas Triton compiles with (its bundled one), else one on PATH."""
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # older Triton without knobs.nvidia.ptxas
        return shutil.which("ptxas")


def _run_ptxas(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX Triton made (used when Triton's own ptxas log is not available)."""
    ptxas = _ptxas_path()
    if ptxas is None:
        return ""
    suffix = "a" if arch >= 90 else ""  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}{suffix}",
                source,
                "-o",
                os.path.join(folder, "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    return run.stdout + run.stderr


def _compile(fn, args: dict, arch: int, num_warps: int, num_stages: int):
    """triton.compile of JIT function `fn` with these argument values (Pointer, int, bool or constexpr
    value), specialised as a launch specialises them; returns (compiled kernel, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # What a launch knows of an aligned pointer or an int divisible by 16 (no hint on a Triton without it).
    divisible = backend.parse_attr("D") if hasattr(backend, "parse_attr") else None
    signature, constexprs, attrs = {}, {}, {}
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    not_specialised = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    for index, name in enumerate(fn.arg_names):
        value = args[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, Pointer):
            signature[name] = "*" + value.dtype
            if divisible is not None:  # 16-byte aligned, as torch allocates
                attrs[(index,)] = divisible
        elif name in not_specialised:
            signature[name] = "i32"
        elif value == 1:  # a launch makes an int argument of 1 a constant
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and divisible is not None:
                attrs[(index,)] = divisible
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with _fresh_compile(), contextlib.redirect_stdout(log):
        compiled = triton.compile(
            source, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
        )
    return compiled, log.getvalue()


@contextlib.contextmanager
def _fresh_compile():
    """Compile even if Triton's cache has the kernel, and have Triton print the ptxas log."""
    saved = {name: os.environ.get(name) for name in ("TRITON_ALWAYS_COMPILE", "TRITON_DUMP_PTXAS_LOG")}
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# What each variant's scans write: "full" every input and output (initial and final states, both gates);
# "training" what a training step runs (no initial state, no final states); "no-gates" that without gates.
VARIANTS = ("full", "training", "no-gates")


def scan_kernel_arguments(
    dtype: torch.dtype, state_size: int, head_size: int, reverse: bool, variant: str = "full"
) -> dict:
    """{kernel name: (function, argument values, tiles)} for one scan as `triton_scan` launches it at the
    GPT-2 training shape (contiguous [B, T, H, *] inputs), with the outputs the forward or reverse scans
    of the backward ask for in this variant (VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    B, T, H = GPT2_TRAINING_SHAPE.values()
    K, V = state_size, head_size
    t, f32 = Pointer(_TRITON_DTYPES[dtype]), Pointer("fp32")
    full, gated = variant == "full", variant != "no-gates"
    strides: dict[str, int] = {"gk_sb": T * H * K, "gk_st": H * K, "gk_sh": K, "gk_sd": 1}
    strides |= {"gv_sb": T * H * V, "gv_st": H * V, "gv_sh": V, "gv_sd": 1}
    common: dict[str, Any] = dict(
        T=T, H=H, K=K, V=V, REVERSE=reverse, HAS_GK=gated, HAS_GV=gated, C=triton_chunk.CHUNK
    )
    common |= dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", **strides)
    states: dict[str, Any] = dict(k=t, v=t, gk=f32, gv=f32, s0=f32, h=t, final=f32, final_pre=f32, **common)
    states |= dict(HAS_S0=full, WRITE_FINAL=full, WRITE_FINAL_PRE=full and not reverse)
    output: dict[str, Any] = dict(
        q=t, k=t, v=t, gk=f32, gv=f32, h=t, x1=f32, x2=t, out=t, out_pre=f32, gate_grad=f32
    )
    output |= dict(totals=f32, WRITE_OUT=True, WRITE_PRE=not reverse and gated, GATE_GRAD=reverse and gated)
    output |= dict(SUB=triton_chunk.SUBCHUNK, **common)
    tiles = triton_chunk._tiles(K, V, dtype)
    kernels = {
        "states": (triton_chunk._chunk_states_kernel, states, tiles["states"]),
        "output": (triton_chunk._chunk_output_kernel, output, tiles["output"]),
    }
    if reverse and gated:
        prefix: dict[str, Any] = dict(
            gate_grad=f32, totals=f32, r0=f32, T=T, H=H, V=V, REVERSE=True, HAS_R0=full
        )
        kernels["prefix"] = (
            triton_chunk._gate_grad_prefix_kernel,
            {**prefix, "C": triton_chunk.CHUNK},
            tiles["prefix"],
        )
    return kernels


def compile_scan(
    arch: int, dtype: torch.dtype, state_size: int, head_size: int, reverse: bool, variant: str = "full"
) -> list[KernelReport]:
    """Compile every kernel of one scan for compute capability `arch` (80, 90, ...); one report each."""
    if triton_chunk.triton is None:
        raise RuntimeError("Triton is not installed (pip install triton)")
    if triton_chunk.interpreting():
        raise RuntimeError(
            "ahead-of-time compiles need Triton outside its interpreter: unset TRITON_INTERPRET"
        )
    reports = []
    for name, (fn, args, tiles) in scan_kernel_arguments(
        dtype, state_size, head_size, reverse, variant
    ).items():
        tiles = dict(tiles)
        num_warps, num_stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        start = time.perf_counter()
        compiled, log = _compile(fn, {**args, **tiles}, arch, num_warps, num_stages)
        seconds = time.perf_counter() - start
        if "Used" not in log:  # a Triton that does not print its ptxas log
            log = _run_ptxas(compiled.asm["ptx"], arch)
        registers, stack, spill_stores, spill_loads = _ptxas_report(log)
        reports.append(
            KernelReport(
                kernel=name,
                dtype=_TRITON_DTYPES[dtype],
                state_size=state_size,
                head_size=head_size,
                direction="reverse" if reverse else "forward",
                variant=variant,
                arch=arch,
                num_warps=num_warps,
                num_stages=num_stages,
                registers=registers,
                stack_bytes=stack,
                spill_stores=spill_stores,
                spill_loads=spill_loads,
                shared_bytes=compiled.metadata.shared,
                compile_seconds=round(seconds, 1),
            )
        )
    return reports


COLUMNS = (
    "kernel",
    "dtype",
    "state_size",
    "head_size",
    "direction",
    "variant",
    "arch",
    "num_warps",
    "num_stages",
    "registers",
    "stack_bytes",
    "spill_stores",
    "spill_loads",
    "shared_bytes",
    "compile_seconds",
)


def markdown_table(reports: list[KernelReport]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(asdict(r)[c]) for c in COLUMNS) + " |" for r in reports]
    return "\n".join(lines)
