"""express's Geneformer mode against Geneformer's own ``TranscriptomeTokenizer``: seconds, cells/s, peak RSS, ids.

For each corpus size a synthetic h5ad (``tokenizer/synthetic.py``, as ``scripts/bench_tokenizer.py`` uses: 20,000
genes, ~8% detected) is generated once and cached in ``--data_dir``, then copied once into the form Geneformer reads:
synthetic gene ``i`` gets the ``i``-th gene of the dictionary's token order as ``var['ensembl_id']``, and
``obs['n_counts']`` holds each cell's total count. Both tokenizers then run on that same file in fresh processes, one
after the other, each starting with the file in the page cache:

- ``express``: ``express-tokenize tokenize FILE --geneformer_dicts DICTS --model_input_size 4096 --gene_id_key
  ensembl_id --total_counts_key n_counts --obs_keys cell_type,donor`` with each of ``--workers`` (default 1 and 2);
- ``geneformer``: ``TranscriptomeTokenizer(model_input_size=4096, special_token=True, collapse_gene_ids=True,
  custom_attr_name_dict={cell_type, donor}).tokenize_data(DIR, ...)`` in the interpreter ``--geneformer_python``
  (default ``$EXPRESS_GENEFORMER_PYTHON`` or ``/work/envs/helical/bin/python``, where PyPI's ``helical`` provides
  it), through a small driver written to a temporary folder with the dictionaries converted from the JSON files to
  the pickles it opens (express itself never reads a pickle). Without that interpreter this arm is skipped, with a
  note.

``seconds`` is the whole process as a user waits for it (interpreter start, imports, tokenizing, writing, exit);
``call s`` the tokenize call alone (imports excluded; express's as its manifest records it); ``CPU s`` the process's
CPU time (user + system, with its children's). Peak RSS is the larger of the largest sum of resident memory over the
process tree, sampled every 50 ms, and the largest high-water mark (``VmHWM``) of one of its processes (both
tokenizers run as one process here: express's workers are threads).
``x GF`` is Geneformer's seconds over this row's, for whole processes and for calls (the larger the better);
``RSS / GF`` this row's peak RSS over Geneformer's. Every express run's ``input_ids`` are compared with Geneformer's,
cell by cell: ``identical`` cells, cells that differ ``by ties`` only (the same normalised value at every position:
Geneformer ranks with numpy's unstable quicksort, so genes with equal values come in arbitrary order, express puts
the smaller token id first) and cells that differ ``otherwise`` (which would be a bug). Targets (issue 19): express
with 2 workers >= 10x Geneformer's cells/s at 50,000 cells, peak RSS <= 1/10 of Geneformer's and flat in the number
of cells, ids identical up to ties.

    python scripts/bench_geneformer_tokenizer.py --sizes 20000,50000 --out bench_geneformer_tokenizer.json
    python scripts/bench_geneformer_tokenizer.py --sizes 5000 --repeats 1 --geneformer_python none  # express only
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pyarrow as pa
from bench_tokenizer import median_row, tree_rss, warm_page_cache

from tokenizer.synthetic import synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXPRESS_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_DICTS = SHARED / "geneformer" / "gc95M"
DEFAULT_GENEFORMER_PYTHON = os.environ.get("EXPRESS_GENEFORMER_PYTHON", "/work/envs/helical/bin/python")
DICTIONARIES = ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict")
OBS_KEYS = ("cell_type", "donor")
TARGET_SPEEDUP, TARGET_RSS_SHARE = 10.0, 0.1

# Geneformer's tokenizer, as its documentation shows it (helical's copy: V2 is chosen by the input size, the special
# tokens and the gc95M dictionaries). Written to a temporary folder and run by the other interpreter.
GENEFORMER_DRIVER = """
import json, sys, time
start = time.perf_counter()
from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer
imported = time.perf_counter()
data_dir, out_dir, prefix, dicts, model_input_size = sys.argv[1:6]
tokenizer = TranscriptomeTokenizer(
    custom_attr_name_dict={{k: k for k in {obs_keys!r}}}, nproc=1, chunk_size=512,
    model_input_size=int(model_input_size), special_token=True, collapse_gene_ids=True,
    gene_median_file=f"{{dicts}}/gene_median_dictionary.pkl", token_dictionary_file=f"{{dicts}}/token_dictionary.pkl",
    gene_mapping_file=f"{{dicts}}/ensembl_mapping_dict.pkl",
)
tokenizer.tokenize_data(data_dir, out_dir, prefix, file_format="h5ad")
print(json.dumps({{"import_s": imported - start, "call_s": time.perf_counter() - imported}}))
"""


# --- inputs -----------------------------------------------------------------------------------------------------------
def dictionary_genes(dicts: Path) -> list[str]:
    """The dictionary's genes in token order (special tokens left out)."""
    tokens = json.loads((dicts / "token_dictionary.json").read_text())
    return [g for g, _ in sorted(tokens.items(), key=lambda kv: kv[1]) if not g.startswith("<")]


def geneformer_input(raw: Path, dicts: Path, out_dir: Path) -> Path:
    """A copy of a synthetic h5ad in the form Geneformer reads (``var['ensembl_id']`` from the dictionary,
    ``obs['n_counts']``), alone in ``out_dir`` (Geneformer tokenizes every h5ad of a folder); made once."""
    import anndata as ad

    path = out_dir / raw.name
    if path.is_file():
        return path
    genes = dictionary_genes(dicts)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{raw.name}.tmp"
    shutil.copyfile(raw, tmp)
    with h5py.File(tmp, "r+") as f:
        var, obs = ad.io.read_elem(f["var"]), ad.io.read_elem(f["obs"])
        if len(var) > len(genes):
            raise SystemExit(f"--n_genes {len(var)} exceeds the {len(genes)} genes of {dicts}")
        var["synthetic_id"] = var["ensembl_id"].to_numpy()
        var["ensembl_id"] = genes[: len(var)]
        indptr, data = f["X/indptr"][:], f["X/data"]
        n_counts = np.zeros(len(obs))
        for a in range(0, len(obs), 8192):  # in row blocks: the matrix is never held whole
            b = min(a + 8192, len(obs))
            values = data[indptr[a]:indptr[b]].astype(np.float64)
            sums = np.concatenate([[0.0], np.cumsum(values)])
            n_counts[a:b] = sums[indptr[a + 1:b + 1] - indptr[a]] - sums[indptr[a:b] - indptr[a]]
        obs["n_counts"] = n_counts
        del f["var"], f["obs"]
        ad.io.write_elem(f, "var", var)
        ad.io.write_elem(f, "obs", obs)
    tmp.rename(path)
    return path


def write_pickles(dicts: Path, out: Path) -> None:
    """Geneformer's tokenizer opens its dictionaries as pickles: convert the JSON files (for that process only)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in DICTIONARIES:
        with open(out / f"{name}.pkl", "wb") as f:
            pickle.dump(json.loads((dicts / f"{name}.json").read_text()), f)


# --- running ----------------------------------------------------------------------------------------------------------
def tree_peak_rss(process: psutil.Process) -> int:
    """The largest peak RSS (``VmHWM``: the high-water mark since exec) of any process in the tree."""
    peak = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = max(peak, next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0))
        except OSError:
            pass
    return peak


def run_process(cmd: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """Run ``cmd`` (output to ``log``): the whole process's wall time, its CPU time (with its children's), and its
    peak memory: the largest sum of RSS over the process tree sampled every 50 ms, or the largest high-water mark of
    one of its processes, if larger."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        handle = psutil.Process(proc.pid)
        peak = 0
        while True:
            try:
                peak = max(peak, tree_rss(handle), tree_peak_rss(handle))
            except psutil.NoSuchProcess:
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with its resource usage
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return {"seconds": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak / 2**20}


def base_env(tmp: Path) -> dict:
    # one thread per process for numpy's BLAS; Hugging Face caches (if any) go to the temporary folder
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf"), "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets")}


def run_express(path: Path, out: Path, dicts: Path, workers: int, args, env: dict) -> dict:
    """``express-tokenize tokenize`` as a user runs it (``python -m tokenizer.cli``); the call's time is the one its
    manifest records (from the start of ``tokenize_files`` to its output written)."""
    argv = ["tokenize", str(path), "--geneformer_dicts", str(dicts), "--model_input_size", str(args.model_input_size),
            "--gene_id_key", "ensembl_id", "--total_counts_key", "n_counts", "--obs_keys", ",".join(OBS_KEYS),
            "--out", str(out), "--num_workers", str(workers), "--quiet"]
    if args.chunk_size is not None:
        argv += ["--chunk_size", str(args.chunk_size)]
    result = run_process([sys.executable, "-m", "tokenizer.cli", *argv], {**env, "PYTHONPATH": str(ROOT)}, ROOT,
                         out.parent / f"{out.name}.log")
    return {**result, "call_s": json.loads((out / "manifest.json").read_text())["run"]["seconds"]}


def run_geneformer(python: str, driver: Path, path: Path, out: Path, pickles: Path, args, env: dict) -> dict:
    cmd = [python, str(driver), str(path.parent), str(out), "gf", str(pickles), str(args.model_input_size)]
    log = out.parent / f"{out.name}.log"
    result = run_process(cmd, env, out.parent, log)
    return {**result, **json.loads(log.read_text().strip().splitlines()[-1])}  # the driver's last line: its timings


# --- comparing ids ----------------------------------------------------------------------------------------------------
def read_input_ids(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Flat ``input_ids``, per-cell offsets and (when stored) ``cell_id`` of a ``datasets`` folder's Arrow files."""
    state = json.loads((folder / "state.json").read_text())
    tables = []
    for entry in state["_data_files"]:
        with pa.OSFile(str(folder / entry["filename"])) as f:
            tables.append(pa.ipc.open_stream(f).read_all())
    table = pa.concat_tables(tables)
    ids = table.column("input_ids").combine_chunks()
    offsets = np.asarray(ids.offsets, dtype=np.int64)
    flat = np.asarray(ids.values, dtype=np.int32)[offsets[0]:offsets[-1]]
    cell_ids = table.column("cell_id").to_pylist() if "cell_id" in table.column_names else None
    return flat, offsets - offsets[0], cell_ids


def cell_values(path: Path, rows: np.ndarray, dicts: Path) -> list[dict[int, float]]:
    """Geneformer's normalised value of every detected gene of some cells, by token id (to tell ties apart)."""
    tokens = json.loads((dicts / "token_dictionary.json").read_text())
    medians = json.loads((dicts / "gene_median_dictionary.json").read_text())
    genes = dictionary_genes(dicts)
    token_of = np.array([tokens[g] for g in genes])
    median_of = np.array([medians[g] for g in genes])
    out = []
    with h5py.File(path, "r") as f:
        indptr, indices, data = f["X/indptr"], f["X/indices"], f["X/data"]
        n_counts = f["obs/n_counts"]
        for row in rows:
            lo, hi = indptr[row], indptr[row + 1]
            cols, x = indices[lo:hi], data[lo:hi].astype(np.float64)
            value = x / n_counts[row] * 10_000 / median_of[cols]
            out.append(dict(zip(token_of[cols].tolist(), value.tolist())))
    return out


def compare_ids(express_dir: Path, geneformer_dir: Path, path: Path, dicts: Path) -> dict:
    """Per cell: identical ids, ids that differ only where the values are tied, or ids that differ otherwise."""
    ex, ex_offsets, cell_ids = read_input_ids(express_dir)
    gf, gf_offsets, _ = read_input_ids(geneformer_dir)
    with h5py.File(path, "r") as f:
        names = f["obs"][f["obs"].attrs.get("_index", "_index")].asstr()[...]
    row_of = {n: i for i, n in enumerate(names)}
    rows = np.array([row_of[c] for c in cell_ids], dtype=np.int64)  # express leaves out cells without genes
    differ = [k for k, r in enumerate(rows)
              if not np.array_equal(ex[ex_offsets[k]:ex_offsets[k + 1]], gf[gf_offsets[r]:gf_offsets[r + 1]])]
    ties = 0
    for k, v in zip(differ, cell_values(path, rows[differ], dicts)):
        a = ex[ex_offsets[k]:ex_offsets[k + 1]].tolist()
        b = gf[gf_offsets[rows[k]]:gf_offsets[rows[k] + 1]].tolist()
        ties += [v.get(t, -t) for t in a] == [v.get(t, -t) for t in b]  # special tokens compare as themselves
    return {"cells_express": len(rows), "cells_geneformer": len(gf_offsets) - 1, "identical": len(rows) - len(differ),
            "differ_by_ties": ties, "differ_otherwise": len(differ) - ties,
            "left_out_by_express": len(gf_offsets) - 1 - len(rows)}


# --- main -------------------------------------------------------------------------------------------------------------
def geneformer_python(choice: str | None) -> str | None:
    if choice is None:
        return DEFAULT_GENEFORMER_PYTHON if Path(DEFAULT_GENEFORMER_PYTHON).is_file() else None
    return None if choice.lower() == "none" else choice


def _fmt_ratio(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    print("| cells | tokenizer | workers | seconds | call s | CPU s | cells/s | call cells/s | peak RSS (MiB) | x GF | "
          "x GF (call) | RSS / GF | identical | by ties | otherwise |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ids = r.get("ids") or {}
        print(f"| {r['cells']:,} | {r['tokenizer']} | {r['workers']} | {r['seconds']:.2f} | {r['call_s']:.2f} | "
              f"{r['cpu_s']:.1f} | "
              f"{r['cells_per_s']:,.0f} | {r['call_cells_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | "
              f"{_fmt_ratio(r.get('speedup'))} | {_fmt_ratio(r.get('speedup_call'))} | "
              f"{_fmt_ratio(r.get('rss_share'), 3)} | {ids.get('identical', '')} | {ids.get('differ_by_ties', '')} | "
              f"{ids.get('differ_otherwise', '')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,50000", help="corpus sizes in cells, comma-separated")
    parser.add_argument("--n_genes", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2", help="express worker counts, comma-separated (default 1,2)")
    parser.add_argument("--chunk_size", type=int, default=None, help="express's --chunk_size (default: its own)")
    parser.add_argument("--model_input_size", type=int, default=4096, choices=[4096],
                        help="Geneformer V2 (the gc95M dictionaries)")
    parser.add_argument("--dicts", default=str(DEFAULT_DICTS), help="folder of Geneformer's JSON dictionaries")
    parser.add_argument("--geneformer_python", default=None,
                        help="interpreter with Geneformer's TranscriptomeTokenizer (PyPI helical); default "
                             f"{DEFAULT_GENEFORMER_PYTHON} if it exists; 'none' skips Geneformer")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each express setting, in rotation; the table shows the median run")
    parser.add_argument("--geneformer_repeats", type=int, default=1,
                        help="runs of Geneformer per size (about a minute each at 50,000 cells)")
    parser.add_argument("--data_dir", default="/tmp/express_bench", help="where corpora and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_geneformer_tokenizer.json", help="JSON results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    dicts = Path(args.dicts)
    if not (dicts / "token_dictionary.json").is_file():
        parser.error(f"--dicts {dicts} has no token_dictionary.json")
    python = geneformer_python(args.geneformer_python)
    if python is None:
        print("note: Geneformer's tokenizer is skipped (no --geneformer_python, and "
              f"{DEFAULT_GENEFORMER_PYTHON} does not exist): only express runs, and no ratios or id checks",
              flush=True)
    elif not Path(python).is_file():
        parser.error(f"--geneformer_python {python} does not exist")
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gf_", dir=data_dir) as tmp_name:
        tmp = Path(tmp_name)
        env = base_env(tmp)
        driver = tmp / "geneformer_driver.py"
        if python is not None:
            driver.write_text(GENEFORMER_DRIVER.format(obs_keys=list(OBS_KEYS)))
            write_pickles(dicts, tmp / "dicts")
        for n_cells in sizes:
            raw = synthetic_corpus(data_dir, n_cells, args.n_genes, seed=args.seed)
            path = geneformer_input(raw, dicts, data_dir / f"geneformer_{raw.stem}")
            settings = [("express", w) for w in workers] + ([("geneformer", 1)] if python else [])
            runs: dict[tuple, list[dict]] = {s: [] for s in settings}
            gf_out = tmp / f"geneformer_{n_cells}"
            for repeat in range(max(args.repeats, args.geneformer_repeats if python else 0)):
                for name, w in settings:
                    if repeat >= (args.repeats if name == "express" else args.geneformer_repeats):
                        continue
                    warm_page_cache(path)
                    out = tmp / f"express_{n_cells}_w{w}" if name == "express" else gf_out
                    shutil.rmtree(out, ignore_errors=True)
                    if name == "express":
                        result = run_express(path, out, dicts, w, args, env)
                    else:
                        out.mkdir()
                        result = run_geneformer(python, driver, path, out, tmp / "dicts", args, env)
                    runs[(name, w)].append(result)
                    print(f"{n_cells:>8,} {name:<10} {w} worker(s) run {repeat + 1}: {result['seconds']:7.2f} s "
                          f"(call {result['call_s']:6.2f} s)  peak RSS {result['peak_rss_mib']:7.0f} MiB  "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            size_rows = []
            for name, w in settings:
                row = {"cells": n_cells, "tokenizer": name, "workers": w, **median_row(runs[(name, w)])}
                row["call_cells_per_s"] = n_cells / row["call_s"]
                row["cells_per_s"] = n_cells / row["seconds"]
                size_rows.append(row)
            gf = next((r for r in size_rows if r["tokenizer"] == "geneformer"), None)
            for row in size_rows:
                if gf is not None and row is not gf:
                    row["speedup"] = gf["seconds"] / row["seconds"]
                    row["speedup_call"] = gf["call_s"] / row["call_s"]
                    row["rss_share"] = row["peak_rss_mib"] / gf["peak_rss_mib"]
                    row["ids"] = compare_ids(tmp / f"express_{n_cells}_w{row['workers']}", gf_out / "gf.dataset",
                                             path, dicts)
            for name, w in settings:
                shutil.rmtree(tmp / (f"express_{n_cells}_w{w}" if name == "express" else f"geneformer_{n_cells}"),
                              ignore_errors=True)
            rows += size_rows
    print()
    print(f"median of {args.repeats} express runs and {args.geneformer_repeats} Geneformer run(s) per setting; "
          "input in the page cache at the start of each; seconds = the whole process, call s = the tokenize call")
    print_table(rows)
    checks = summarise(rows, sizes, workers)
    for line in checks["lines"]:
        print(line)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                            text=True).stdout.strip()
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit, "geneformer_python": python, "dicts": str(dicts), "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
            "geneformer_repeats": args.geneformer_repeats, "n_genes": args.n_genes}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks["checks"]}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def summarise(rows: list[dict], sizes: list[int], workers: list[int]) -> dict:
    """The targets, checked on the largest size with the most workers; RSS flatness over the sizes."""
    lines, checks = [], {}
    by_key = {(r["cells"], r["tokenizer"], r["workers"]): r for r in rows}
    large, w = max(sizes), max(workers)
    row = by_key[(large, "express", w)]
    if "speedup" in row:
        speed = min(row["speedup"], row["speedup_call"])
        checks["speedup"] = speed
        checks["rss_share"] = row["rss_share"]
        mismatched = sum(r["ids"]["differ_otherwise"] for r in rows if "ids" in r)
        checks["ids_differ_otherwise"] = mismatched
        lines.append(f"speed at {large:,} cells, {w} workers: {speed:.1f}x Geneformer (the smaller of whole process "
                     f"and call; target >= {TARGET_SPEEDUP:g}x): {'met' if speed >= TARGET_SPEEDUP else 'NOT met'}")
        lines.append(f"peak RSS at {large:,} cells, {w} workers: {row['rss_share']:.3f} of Geneformer's (target <= "
                     f"{TARGET_RSS_SHARE:g}): {'met' if row['rss_share'] <= TARGET_RSS_SHARE else 'NOT met'}")
        lines.append(f"ids: {mismatched} cells differ other than by ties over all runs compared")
    if len(sizes) > 1:
        small = min(sizes)
        for v in workers:
            a, b = by_key[(small, "express", v)], by_key[(large, "express", v)]
            ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
            checks[f"rss_growth_w{v}"] = ratio
            lines.append(f"peak RSS express, {v} worker(s): {large:,} cells / {small:,} cells = {ratio:.2f}")
    return {"lines": lines, "checks": checks}


if __name__ == "__main__":
    sys.exit(main())
