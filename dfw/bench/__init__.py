"""Benchmarks: `python -m dfw.bench {kernel,attention,decode}`."""
