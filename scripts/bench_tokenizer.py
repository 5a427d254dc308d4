"""Tokenizer benchmark: cells/s and peak RSS of ``fit`` and ``tokenize`` against the I/O floor.

For each corpus size a synthetic h5ad (``scripts/make_synthetic.py``: 20,000 genes, ~8% detected) is generated once
and cached. Every stage then runs in its own fresh process, one after the other on the same file, which is read through once
just before each stage so that every stage starts with it in the page cache:

- ``read``: the I/O floor: read every row of the file in chunks of ``--chunk_size`` cells and do nothing else
  (one process);
- ``fit``: ``express-tokenize fit`` with ``--num_workers`` workers;
- ``tokenize``: ``express-tokenize tokenize`` (top_k 256, 50 zeros) with ``--num_workers`` workers;
- ``tokenize+counts`` (with ``--keep_counts``): the same, also storing every cell's counts.

cells/s is measured inside each process from just before the API call to its return (interpreter start-up and
imports excluded; worker start-up included); ``wall_s`` is the whole process; ``cpu_s`` the CPU time of the process
and its workers (useful on a shared machine, where wall-clock times depend on the other load). Peak RSS is the
largest sum of resident memory over the process and all its children, sampled every 50 ms (shared pages of forked
workers are counted once per process, so this overstates real memory use). Targets (issue 2): fit and tokenize >= 0.5x the floor's cells/s
with 2 workers; peak RSS at the large size <= 1.2x the small one.

    python scripts/bench_tokenizer.py --sizes 50000,200000 --num_workers 2 --out bench_tokenizer.json
    python scripts/bench_tokenizer.py --sizes 20000 --stages read,fit   # quick look
    python scripts/bench_tokenizer.py --sizes 50000 --compression gzip  # gzip-compressed h5ad, as real files often are
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

STAGE_CODE = {
    "read": "from tokenizer.io import read_floor; read_floor({path!r}, chunk_size={chunk_size})",
    "fit": "from tokenizer.cli import main; assert main(['fit', {path!r}, '--out', {stats!r}, '--num_workers', "
           "'{workers}', '--chunk_size', '{chunk_size}', '--overwrite', '--quiet']) == 0",
    "tokenize": "from tokenizer.cli import main; assert main(['tokenize', {path!r}, '--stats', {stats!r}, '--out', "
                "{tokens!r}, '--num_workers', '{workers}', '--chunk_size', '{chunk_size}', '--obs_keys', "
                "'cell_type,donor', '--overwrite', '--quiet']) == 0",
    "tokenize+counts": "from tokenizer.cli import main; assert main(['tokenize', {path!r}, '--stats', {stats!r}, "
                       "'--out', {tokens!r}, '--num_workers', '{workers}', '--chunk_size', '{chunk_size}', "
                       "'--obs_keys', 'cell_type,donor', '--keep_counts', '--overwrite', '--quiet']) == 0",
}
WRAPPER = """
import json, resource, time
import tokenizer.cli, tokenizer.io  # imports are not part of the measurement
def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
start, cpu_start = time.perf_counter(), cpu()
{code}
print(json.dumps({{"seconds": time.perf_counter() - start, "cpu_s": cpu() - cpu_start}}))
"""


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def warm_page_cache(path: Path) -> None:
    """Read the whole file once, so that every stage starts from a page-cached file (the kernel may have evicted
    it since the last stage; a stage that reads from disk would measure the disk, not the tokenizer)."""
    with open(path, "rb", buffering=0) as f:
        while f.readinto(_BUFFER):
            pass


_BUFFER = bytearray(16 << 20)


def run_stage(code: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    handle = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(handle))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stage failed ({proc.returncode}):\n{err[-3000:]}")
    inner = json.loads(out.strip().splitlines()[-1])
    return {"seconds": inner["seconds"], "cpu_s": inner["cpu_s"], "wall_s": wall, "peak_rss_mib": peak / 2**20}


def ensure_corpus(data_dir: Path, n_cells: int, n_genes: int, seed: int, compression: str | None) -> Path:
    suffix = f"_{compression}" if compression else ""
    path = data_dir / f"synthetic_{n_cells}x{n_genes}_s{seed}{suffix}.h5ad"
    if not path.is_file():
        print(f"generating {path} ...", flush=True)
        extra = ["--compression", compression] if compression else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), "--out", str(path),
                        "--n_cells", str(n_cells), "--n_genes", str(n_genes), "--seed", str(seed), "--quiet",
                        *extra], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,200000", help="corpus sizes in cells, comma-separated")
    parser.add_argument("--n_genes", type=int, default=20_000)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=2048)
    parser.add_argument("--stages", default="read,fit,tokenize", help=f"any of {','.join(STAGE_CODE)}")
    parser.add_argument("--data_dir", default="/tmp/express_bench", help="where corpora and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default=None, choices=[None, "gzip", "lzf"],
                        help="HDF5 compression of the synthetic files (default none, as anndata writes by default; "
                             "real-world h5ad files are often gzip-compressed)")
    parser.add_argument("--out", default="bench_tokenizer.json", help="JSON results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGE_CODE)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    if any(s.startswith("tokenize") for s in stages) and "fit" not in stages:
        stages.insert(0, "fit")  # tokenize needs the statistics
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_cells in sizes:
        path = ensure_corpus(data_dir, n_cells, args.n_genes, args.seed, args.compression)
        work = data_dir / f"run_{n_cells}{'_' + args.compression if args.compression else ''}"
        for stage in stages:
            code = STAGE_CODE[stage].format(path=str(path), stats=str(work / "stats"), tokens=str(work / "tokens"),
                                            workers=args.num_workers, chunk_size=args.chunk_size)
            warm_page_cache(path)
            result = run_stage(WRAPPER.format(code=code))
            workers = 1 if stage == "read" else args.num_workers
            row = {"cells": n_cells, "stage": stage, "workers": workers, "compression": args.compression, **result,
                   "cells_per_s": n_cells / result["seconds"]}
            rows.append(row)
            print(f"{n_cells:>8,} {stage:<16} {result['seconds']:8.2f} s {row['cells_per_s']:>10,.0f} cells/s "
                  f"cpu {result['cpu_s']:7.2f} s  peak RSS {result['peak_rss_mib']:8.0f} MiB  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        shutil.rmtree(work / "tokens", ignore_errors=True)
    for row in rows:
        floor = next(r for r in rows if r["cells"] == row["cells"] and r["stage"] == "read")["cells_per_s"] \
            if "read" in stages else float("nan")
        row["ratio_to_read"] = row["cells_per_s"] / floor
    print()
    header = "| cells | stage | workers | seconds | cells/s | x read floor | CPU s | peak RSS (MiB) |"
    print(header)
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['stage']} | {r['workers']} | {r['seconds']:.2f} | {r['cells_per_s']:,.0f} | "
              f"{r['ratio_to_read']:.2f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,.0f} |")
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print()
        for stage in stages:
            a = next(r for r in rows if r["cells"] == small and r["stage"] == stage)["peak_rss_mib"]
            b = next(r for r in rows if r["cells"] == large and r["stage"] == stage)["peak_rss_mib"]
            print(f"peak RSS {stage}: {large:,} cells / {small:,} cells = {b / a:.2f}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit, "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
