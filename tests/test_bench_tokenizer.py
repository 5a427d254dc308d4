"""The tokenizer benchmark runs end to end on tiny corpora, with a baseline checkout and the write floor (the real
numbers come from running it by hand), here with the input dropped from the page cache before every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py

from tokenizer.io import write_floor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_tokenizer.py"


def test_write_floor_writes_exactly_the_bytes_asked_for(tmp_path):
    target = tmp_path / "floor.bin"
    assert write_floor(target, 5_000_001, block=1 << 20) == 5_000_001
    assert target.stat().st_size == 5_000_001


def test_bench_tokenizer_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "300,600", "--n_genes", "400", "--repeats", "1", "--chunk_size", "128",
         "--data_dir", str(tmp_path / "data"), "--baseline", str(ROOT), "--cache", "cold", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    stages = ["read", "fit@baseline", "fit", "tokenize@baseline", "tokenize", "write"]
    assert [(r["cells"], r["stage"]) for r in payload["rows"]] == [(n, s) for n in (300, 600) for s in stages]
    rows = {(r["cells"], r["stage"]): r for r in payload["rows"]}
    for n in (300, 600):
        assert rows[(n, "read")]["ratio_to_read"] == 1.0
        assert rows[(n, "fit")]["workers"] == 2 and rows[(n, "write")]["workers"] == 1
        # the write floor writes what this checkout's tokenize wrote, which grows with the corpus
        assert rows[(n, "tokenize")]["output_bytes"] > 0 and "output_bytes" not in rows[(n, "tokenize@baseline")]
        assert all(r["seconds"] > 0 and r["cells_per_s"] == n / r["seconds"] for (m, _), r in rows.items() if m == n)
    assert rows[(600, "tokenize")]["output_bytes"] > rows[(300, "tokenize")]["output_bytes"]
    assert [m["stage"] for m in payload["marginal"]] == stages
    assert payload["meta"]["baseline"] == str(ROOT) and payload["meta"]["repeats"] == 1
    # every stage started with the input dropped from the page cache, and the table says so
    assert payload["meta"]["cache"] == "cold" and {r["cache"] for r in payload["rows"]} == {"cold"}
    assert "input cold in the page cache at the start of each" in result.stdout
    assert "| 600 | tokenize@baseline | 2 |" in result.stdout and "marginal rate, the 300 cells" in result.stdout


def test_bench_fit_kernel_smoke(tmp_path):
    out = tmp_path / "kernel.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_fit_kernel.py"), "--n_cells", "300", "--n_genes", "400",
         "--cells", "250", "--chunk_size", "64", "--repeats", "2", "--data_dir", str(tmp_path / "data"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    steps = ["read", "scan", "accumulate", "accumulate, histogram only", "accumulate, one library size",
             "count per gene"]
    assert [r["step"] for r in payload["rows"]] == steps
    # the stored counts it divides by are those of the first 250 rows of the file
    with h5py.File(tmp_path / "data" / "synthetic_300x400_s0.h5ad") as f:
        assert payload["meta"]["stored_counts"] == int(f["X"]["indptr"][250]) > 0
    rows = {r["step"]: r for r in payload["rows"]}
    assert all(len(r["all_ns_per_count"]) == 2 and r["min_ns_per_count"] <= r["ns_per_count"] for r in rows.values())
    # and again in two processes at once (the default), each with its own runs
    assert payload["meta"]["processes"] == 2
    assert all(len(r["all_ns_per_count_at_once"]) == 4 and r["ns_per_count_at_once"] > 0 for r in rows.values())
    assert rows["read"]["ratio_to_read"] == 1.0 and all(r["ns_per_count"] > 0 for r in rows.values())
    assert payload["budget_ns_per_count"] == 4 * rows["read"]["ns_per_count"]
    work = sum(rows[s]["ns_per_count_at_once"] for s in ("read", "scan", "accumulate"))
    assert payload["work_ns_per_count"] == work
    assert "| accumulate, one library size |" in result.stdout and "each of 2 processes at once" in result.stdout
