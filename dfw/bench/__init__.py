"""Benchmarks: `python -m dfw.bench {kernel,attention,decode,train}`; timing.py is their one timing helper."""
