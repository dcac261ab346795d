"""Benchmark drivers of fuser_moe (not installed; run from the repository root: `python -m benchmarks.plot`)."""
