"""`python -m dfw_kernels`: build the CUDA extension ahead of time (into DFW_KERNELS_BUILD_DIR if set)."""

from __future__ import annotations

import sys
import time

import torch

from . import cuda


def main() -> int:
    reason = cuda.unavailable_reason() if torch.cuda.is_available() else None
    if reason is not None:
        print(f"dfw_kernels: the CUDA kernel cannot run here: {reason}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        extension = cuda.load_extension(verbose=True)
    except cuda.KernelUnavailable as error:
        print(f"dfw_kernels: {error}", file=sys.stderr)
        return 1
    print(f"dfw_kernels: CUDA extension ready in {time.perf_counter() - start:.1f} s: {extension.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
