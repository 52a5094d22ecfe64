"""`python -m dfw.bench {kernel,attention,decode,train,transfer} [args]`: run one benchmark's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("kernel", "attention", "decode", "train", "transfer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m dfw.bench {{{','.join(BENCHMARKS)}}} [args]", file=sys.stderr)
        return 2
    return importlib.import_module(f"dfw.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
