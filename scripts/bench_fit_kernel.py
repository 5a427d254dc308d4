"""Where fit's time per stored count goes: the read, the value check and the accumulation kernel, step by step.

``scripts/bench_tokenizer.py`` times whole runs of ``express-tokenize fit`` against the read floor. This script takes
the run apart. It reads the first ``--cells`` rows of a synthetic corpus (the same file ``bench_tokenizer.py``
generates and caches) in blocks of ``--chunk_size`` cells and times, per stored count, each step ``fit`` does on a
block, and some variants that do less:

- ``read``: read the block from the (page-cached) file into reused buffers, as fit does (the read floor's work);
- ``scan``: check the block's values and sum its library sizes (``tokenizer.io.scan_counts``);
- ``accumulate``: the fitting kernel (``tokenizer.sketch.accumulate_rows``), histogram and projection sketch, with
  ``--sketch_dim`` coordinates as ``fit`` uses;
- ``accumulate, histogram only``: the same kernel without the projection sketch (``sketch_dim`` 0);
- ``accumulate, one library size``: histogram only, every cell given the same library size, so that all cells fill
  the same few histogram rows (what per-cell rows cost is the difference to the line above);
- ``count per gene``: one increment of a per-gene counter per stored count, the least any per-gene statistic costs.

Each step runs ``--repeats`` times in rotation on the same blocks (held in memory, except for ``read``); the table
shows the median (and the fastest) run in ns per stored count and as a multiple of ``read``. Then the same runs in
``--processes`` forked processes at once (default 2, as fit's two workers, which share the caches and the memory
bus), each step started by all of them together; that column is each process's own time per count. The last line
is the budget the speed target leaves: ``fit`` at >= 0.5x the read floor's cells/s with 2 workers, each doing half
the counts, may spend at most 2 x 2 = 4 times one process's ``read`` per stored count in each worker, fixed costs
(loading kernels, starting workers, the hierarchy, writing the statistics) not counted.

    python scripts/bench_fit_kernel.py --n_cells 50000 --cells 20480 --out bench_fit_kernel.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

import numba
import numpy as np

from tokenizer.io import H5adSource, scan_counts
from tokenizer.sketch import _LOG_TABLE, QuantileSketch, _projection_base, accumulate_rows, profile_table
from tokenizer.stats import _Tables
from tokenizer.synthetic import synthetic_corpus


@numba.njit(nogil=True)
def count_per_gene(indices: np.ndarray, counters: np.ndarray) -> None:
    for j in range(indices.shape[0]):
        counters[indices[j]] += 1


class Kernel:
    """The fitting kernel's tables, as one fit worker holds them (fit's own :class:`~tokenizer.stats._Tables`),
    and a call over one block."""

    def __init__(self, n_genes: int, dim: int, relative_accuracy: float):
        self.sketch = QuantileSketch(n_genes, relative_accuracy)
        self.tables = _Tables(self.sketch.n_buckets, n_genes, dim, shared=False)
        self.top = np.zeros(self.tables.low.shape, np.uint8)
        self.sign_sum = np.zeros(dim, np.int64)
        self.profile = profile_table(self.sketch)
        self.base = _projection_base(0)
        self.col_map = np.arange(n_genes, dtype=np.int64)
        self.no_donors = np.zeros((0, n_genes), dtype=bool)

    def __call__(self, block: tuple) -> int:
        start, indptr, indices, data, totals = block
        n = len(indptr) - 1
        touched = np.array([self.sketch.n_buckets, -1, self.sketch.n_buckets, -1, 0], np.int64)
        keys = np.arange(start, start + n, dtype=np.uint64)  # cell identities (the projection's hash input)
        used, _ = accumulate_rows(indptr, indices, data, self.col_map, totals, keys, np.full(n, -1, np.int64), 1e4,
                                  self.sketch.inv_log_gamma, self.sketch.offset, self.tables.low, self.tables.mid,
                                  self.top, self.tables.proj, self.base, self.no_donors, self.sign_sum, self.profile,
                                  _LOG_TABLE, touched)
        return used


def measure(args: argparse.Namespace, path: Path, barrier=None) -> tuple[dict[str, list[float]], int, int]:
    """ns per stored count of every step, ``args.repeats`` runs each in rotation, and the numbers of rows and
    stored counts timed. With a ``barrier`` (processes running this at once), all start each step together."""
    source = H5adSource(path)
    n_rows = min(args.cells, source.n_obs)
    bounds = [(a, min(a + args.chunk_size, n_rows)) for a in range(0, n_rows, args.chunk_size)]
    blocks = []
    for a, b in bounds:
        raw = source.read_rows(a, b)
        totals = scan_counts(raw.indptr, raw.indices, raw.data, source.n_vars, False)[0]
        blocks.append((a, raw.indptr, np.array(raw.indices), np.array(raw.data), totals))
    n_counts = sum(len(block[2]) for block in blocks)
    one_size = [(a, ip, ind, dat, np.where(t > 0, np.median(t[t > 0]), 0.0)) for a, ip, ind, dat, t in blocks]
    full = Kernel(source.n_vars, args.sketch_dim, args.relative_accuracy)
    histogram = Kernel(source.n_vars, 0, args.relative_accuracy)
    counters = np.zeros(source.n_vars, dtype=np.int64)

    def read() -> None:
        for a, b in bounds:
            source.read_rows(a, b, reuse=True)

    steps = {
        "read": read,
        "scan": lambda: [scan_counts(ip, ind, dat, source.n_vars, False) for _, ip, ind, dat, _ in blocks],
        "accumulate": lambda: [full(block) for block in blocks],
        "accumulate, histogram only": lambda: [histogram(block) for block in blocks],
        "accumulate, one library size": lambda: [histogram(block) for block in one_size],
        "count per gene": lambda: [count_per_gene(block[2], counters) for block in blocks],
    }
    for step in steps.values():  # compile / load every kernel, fill the tables' pages once
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            if barrier is not None:
                barrier.wait()
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) / n_counts * 1e9)
    source.close()
    return times, n_rows, n_counts


def _measure_in_child(args, path, barrier, results) -> None:
    results.put(measure(args, path, barrier)[0])


def measure_at_once(args: argparse.Namespace, path: Path, n_processes: int) -> dict[str, list[float]]:
    """:func:`measure` in ``n_processes`` forked processes at once (as fit's workers run); every process's runs."""
    context = mp.get_context("fork")
    barrier, results = context.Barrier(n_processes), context.Queue()
    children = [context.Process(target=_measure_in_child, args=(args, path, barrier, results))
                for _ in range(n_processes)]
    for child in children:
        child.start()
    parts = [results.get() for _ in children]
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a measuring process failed (exit code {child.exitcode})")
    return {name: [t for part in parts for t in part[name]] for name in parts[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_cells", type=int, default=50_000, help="size of the synthetic corpus (default 50,000)")
    parser.add_argument("--n_genes", type=int, default=20_000)
    parser.add_argument("--cells", type=int, default=20_480, help="rows timed, from the first (default 20,480)")
    parser.add_argument("--chunk_size", type=int, default=2048, help="cells per block, as fit's default")
    parser.add_argument("--sketch_dim", type=int, default=128, help="projection sketch size, as fit's default")
    parser.add_argument("--relative_accuracy", type=float, default=0.005, help="median sketch accuracy (fit's default)")
    parser.add_argument("--processes", type=int, default=2,
                        help="also time every step in this many processes at once (default 2, as fit's 2 workers; "
                             "1: one process only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data_dir", default="/tmp/express_bench", help="where the corpus is cached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_fit_kernel.json", help="JSON results")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = synthetic_corpus(data_dir, args.n_cells, args.n_genes, seed=args.seed)

    times, n_rows, n_counts = measure(args, path)
    together = measure_at_once(args, path, args.processes) if args.processes > 1 else None
    read_ns = float(np.median(times["read"]))
    rows = []
    for name, v in times.items():
        row = {"step": name, "ns_per_count": float(np.median(v)), "min_ns_per_count": float(min(v)),
               "ratio_to_read": float(np.median(v)) / read_ns, "all_ns_per_count": v}
        if together is not None:
            row["ns_per_count_at_once"] = float(np.median(together[name]))
            row["all_ns_per_count_at_once"] = together[name]
        rows.append(row)
    print(f"{n_rows:,} cells of {path.name}, {n_counts:,} stored counts, blocks of {args.chunk_size} cells, "
          f"median of {args.repeats} runs")
    at_once = f" {args.processes} processes at once, each |" if together is not None else ""
    print(f"| step | ns per stored count | fastest run | x read |{at_once}")
    print("|---|---:|---:|---:|" + ("---:|" if together is not None else ""))
    for r in rows:
        extra = f" {r['ns_per_count_at_once']:.2f} |" if together is not None else ""
        print(f"| {r['step']} | {r['ns_per_count']:.2f} | {r['min_ns_per_count']:.2f} | {r['ratio_to_read']:.1f} |"
              f"{extra}")
    key = "ns_per_count_at_once" if together is not None else "ns_per_count"
    by_step = {r["step"]: r[key] for r in rows}
    work = by_step["read"] + by_step["scan"] + by_step["accumulate"]
    budget = 4 * read_ns
    who = f"each of {args.processes} processes at once" if together is not None else "one process"
    print(f"fit's work per stored count (read + scan + accumulate, {who}): {work:.2f} ns; the speed target's budget "
          f"with 2 workers: 4 x read = {budget:.2f} ns ({work / budget:.1f}x over)")
    payload = {"rows": rows, "work_ns_per_count": work, "budget_ns_per_count": budget,
               "meta": {"file": str(path), "cells": n_rows, "stored_counts": n_counts, "chunk_size": args.chunk_size,
                        "sketch_dim": args.sketch_dim, "relative_accuracy": args.relative_accuracy,
                        "processes": args.processes, "repeats": args.repeats, "machine": platform.platform(),
                        "python": platform.python_version()}}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
