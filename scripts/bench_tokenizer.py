"""Tokenizer benchmark: cells/s and peak RSS of ``fit`` and ``tokenize`` against the I/O floor.

For each corpus size a synthetic h5ad (``scripts/make_synthetic.py``: 20,000 genes, ~8% detected) is generated once
and cached. Every stage then runs in its own fresh process, one after the other on the same file, which is read
through once just before each stage so that every stage starts with it in the page cache (``--cache warm``, the
default), or dropped from the page cache before each stage (``--cache cold``: every stage reads it from the disk,
as a run over a corpus read once does):

- ``read``: the I/O floor: read every row of the file in chunks of ``--chunk_size`` cells and do nothing else
  (one process);
- ``fit``: ``express-tokenize fit`` with ``--num_workers`` workers;
- ``tokenize``: ``express-tokenize tokenize`` (top_k 256, 50 zeros) with ``--num_workers`` workers;
- ``tokenize+counts`` (with ``--keep_counts``): the same, also storing every cell's counts;
- ``write``: the output floor: write as many bytes as the last tokenize stage wrote to a file beside it, in 16 MiB
  blocks, and do nothing else (one process). Tokenizing cannot be faster than writing its output.

Every stage runs ``--repeats`` times in rotation and the table shows the median run. With ``--baseline`` (another
checkout, e.g. the previous release), its fit and tokenize run in the same rotation, just before this checkout's:
the side-by-side rows show what a change gained on a machine whose speed drifts between runs. (The first run of a
checkout compiles its kernels into its numba cache; the median of three runs leaves that run out.) With two sizes, a
second table gives the marginal rate: the extra cells of the large size over its extra seconds, i.e. the rate of a
corpus so large that the fixed costs of a run (starting workers, loading compiled kernels, deriving the hierarchy,
writing the statistics) no longer count.

cells/s is measured inside each process from just before the API call to its return (interpreter start-up and
imports excluded; worker start-up included); ``wall_s`` is the whole process; ``cpu_s`` the CPU time of the process
and its workers (useful on a shared machine, where wall-clock times depend on the other load). Peak RSS is the
largest sum of resident memory over the process and all its children, sampled every 50 ms (shared pages of forked
workers are counted once per process, so this overstates real memory use). Targets (issue 2): fit and tokenize
>= 0.5x the floor's cells/s with 2 workers; peak RSS at the large size <= 1.2x the small one.

    python scripts/bench_tokenizer.py --sizes 50000,200000 --num_workers 2 --out bench_tokenizer.json
    python scripts/bench_tokenizer.py --sizes 20000 --stages read,fit --repeats 1  # quick look
    python scripts/bench_tokenizer.py --sizes 50000 --compression gzip  # gzip-compressed h5ad, as real files often are
    python scripts/bench_tokenizer.py --sizes 200000 --cache cold  # the input read from the disk by every stage
    git worktree add /tmp/base 3bd5634 && python scripts/bench_tokenizer.py --sizes 200000 --baseline /tmp/base
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

from tokenizer.synthetic import synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]

STAGE_CODE = {
    "read": "from tokenizer.io import read_floor; read_floor({path!r}, chunk_size={chunk_size})",
    "fit": "from tokenizer.cli import main; assert main(['fit', {path!r}, '--out', {stats!r}, '--num_workers', "
           "'{workers}', '--chunk_size', '{chunk_size}', '--overwrite', '--quiet']) == 0",
    "tokenize": "from tokenizer.cli import main; assert main(['tokenize', {path!r}, '--stats', {stats!r}, '--out', "
                "{tokens!r}, '--num_workers', '{workers}', '--chunk_size', '{chunk_size}', '--obs_keys', "
                "'cell_type,donor', '--overwrite', '--quiet']) == 0",
    "write": "from tokenizer.io import write_floor; write_floor({target!r}, {n_bytes})",
    "tokenize+counts": "from tokenizer.cli import main; assert main(['tokenize', {path!r}, '--stats', {stats!r}, "
                       "'--out', {tokens!r}, '--num_workers', '{workers}', '--chunk_size', '{chunk_size}', "
                       "'--obs_keys', 'cell_type,donor', '--keep_counts', '--overwrite', '--quiet']) == 0",
}
BASELINE_STAGES = ("fit", "tokenize", "tokenize+counts")  # the stages that run the tokenizer (and use workers)
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


def evict_page_cache(path: Path) -> None:
    """Drop the file's pages from the page cache (``posix_fadvise(DONTNEED)``; no root needed), so that the next
    stage reads it from the disk. Only clean pages can be dropped: the file is flushed first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_stage(code: str, tree: Path = ROOT) -> dict:
    """Run one stage's code in a fresh interpreter that imports the tokenizer from ``tree`` (a checkout)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tree)
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


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def median_row(runs: list[dict]) -> dict:
    """The run with the median time (with its own CPU time), every run's seconds, and the peak RSS of all runs."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["all_seconds"] = [r["seconds"] for r in runs]
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,200000", help="corpus sizes in cells, comma-separated")
    parser.add_argument("--n_genes", type=int, default=20_000)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=2048)
    parser.add_argument("--stages", default="read,fit,tokenize,write", help=f"any of {','.join(STAGE_CODE)}")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every stage, in rotation; the table shows the median run (default 3)")
    parser.add_argument("--data_dir", default="/tmp/express_bench", help="where corpora and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default=None, choices=[None, "gzip", "lzf"],
                        help="HDF5 compression of the synthetic files (default none, as anndata writes by default; "
                             "real-world h5ad files are often gzip-compressed)")
    parser.add_argument("--cache", default="warm", choices=["warm", "cold"],
                        help="start every stage with the input in the page cache (warm, default) or dropped from it "
                             "(cold: read from the disk)")
    parser.add_argument("--baseline", default=None,
                        help="another checkout of express (e.g. `git worktree add /tmp/base <commit>`): its fit and "
                             "tokenize run too, in rotation with this checkout's, as rows marked '@baseline'")
    parser.add_argument("--out", default="bench_tokenizer.json", help="JSON results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGE_CODE)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    if any(s.startswith("tokenize") for s in stages) and "fit" not in stages:
        stages.insert(0, "fit")  # tokenize needs the statistics
    if "write" in stages and not any(s.startswith("tokenize") for s in stages):
        parser.error("the write stage writes as many bytes as tokenize did: run it with a tokenize stage")
    if "write" in stages:  # after the tokenize stages, whose output size it needs
        stages = [s for s in stages if s != "write"] + ["write"]
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None:
        if not (baseline / "tokenizer" / "cli.py").is_file():
            parser.error(f"--baseline {baseline} is not a checkout of express (no tokenizer/cli.py)")
        # each fit / tokenize stage is preceded by the baseline's
        stages = [t for s in stages for t in ([f"{s}@baseline", s] if s in BASELINE_STAGES else [s])]
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_cells in sizes:
        path = synthetic_corpus(data_dir, n_cells, args.n_genes, seed=args.seed, compression=args.compression)
        work = data_dir / f"run_{n_cells}{'_' + args.compression if args.compression else ''}"
        runs: dict[str, list[dict]] = {stage: [] for stage in stages}
        output_bytes = 0
        for repeat in range(args.repeats):
            for stage in stages:
                name, _, of_baseline = stage.partition("@")
                stats = work / ("stats_baseline" if of_baseline else "stats")
                code = STAGE_CODE[name].format(path=str(path), stats=str(stats), tokens=str(work / "tokens"),
                                               workers=args.num_workers,
                                               chunk_size=args.chunk_size, target=str(work / "write_floor.bin"),
                                               n_bytes=output_bytes)
                if stage != "write":
                    (warm_page_cache if args.cache == "warm" else evict_page_cache)(path)
                if name.startswith("tokenize"):  # --overwrite would remove the last run's output inside the timing
                    shutil.rmtree(work / "tokens", ignore_errors=True)
                result = run_stage(WRAPPER.format(code=code), baseline if of_baseline else ROOT)
                if name == "write":
                    (work / "write_floor.bin").unlink()
                if name.startswith("tokenize") and not of_baseline:
                    output_bytes = dir_bytes(work / "tokens")
                    result["output_bytes"] = output_bytes
                runs[stage].append(result)
                print(f"{n_cells:>8,} {stage:<16} run {repeat + 1}/{args.repeats} {result['seconds']:8.2f} s "
                      f"{n_cells / result['seconds']:>10,.0f} cells/s  cpu {result['cpu_s']:7.2f} s  peak RSS "
                      f"{result['peak_rss_mib']:8.0f} MiB  (load {os.getloadavg()[0]:.1f})", flush=True)
        for stage in stages:
            workers = args.num_workers if stage.partition("@")[0] in BASELINE_STAGES else 1
            row = {"cells": n_cells, "stage": stage, "workers": workers, "compression": args.compression,
                   "cache": args.cache,
                   **median_row(runs[stage])}
            row["cells_per_s"] = n_cells / row["seconds"]
            rows.append(row)
        shutil.rmtree(work / "tokens", ignore_errors=True)
    by_key = {(r["cells"], r["stage"]): r for r in rows}
    for row in rows:
        floor = by_key[(row["cells"], "read")]["cells_per_s"] if "read" in stages else float("nan")
        row["ratio_to_read"] = row["cells_per_s"] / floor
    print()
    print(f"median of {args.repeats} runs per stage, input {args.cache} in the page cache at the start of each")
    print("| cells | stage | workers | seconds | cells/s | x read floor | CPU s | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['stage']} | {r['workers']} | {r['seconds']:.2f} | {r['cells_per_s']:,.0f} | "
              f"{r['ratio_to_read']:.2f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:,.0f} |")
    marginal = []
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print()
        for stage in stages:
            a, b = by_key[(small, stage)], by_key[(large, stage)]
            print(f"peak RSS {stage}: {large:,} cells / {small:,} cells = {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}")
        # the cost of the extra cells alone: what a corpus much larger than both sizes runs at (fixed costs such as
        # starting workers, loading compiled kernels and deriving the hierarchy are paid once per run)
        print()
        print(f"marginal rate, the {large - small:,} cells between the two sizes")
        print("| stage | extra seconds | cells/s | x read floor |")
        print("|---|---:|---:|---:|")
        for stage in stages:
            extra = by_key[(large, stage)]["seconds"] - by_key[(small, stage)]["seconds"]
            # None: the large size was not slower (sizes too close for this machine's noise)
            marginal.append({"stage": stage, "extra_seconds": extra,
                             "cells_per_s": (large - small) / extra if extra > 0 else None})
        floor = next((m["cells_per_s"] for m in marginal if m["stage"] == "read"), None)
        for m in marginal:
            m["ratio_to_read"] = m["cells_per_s"] / floor if m["cells_per_s"] and floor else None
            rate = f"{m['cells_per_s']:,.0f}" if m["cells_per_s"] else "n/a"
            ratio = f"{m['ratio_to_read']:.2f}" if m["ratio_to_read"] else "n/a"
            print(f"| {m['stage']} | {m['extra_seconds']:.2f} | {rate} | {ratio} |")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    base_commit = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() if baseline else None
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit, "baseline": str(baseline) if baseline else None, "baseline_commit": base_commit,
            "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "repeats": args.repeats, "cache": args.cache}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "marginal": marginal}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
