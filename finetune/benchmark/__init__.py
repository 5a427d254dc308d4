"""The benchmark suite behind ``scripts/benchmark.py``: the real datasets and their splits, the methods compared, the
tasks, and the report."""
