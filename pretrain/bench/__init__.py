"""Benchmarks: `pretrain bench kernels` (kernels.py)."""
