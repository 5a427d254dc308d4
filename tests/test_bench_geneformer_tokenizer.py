"""The Geneformer tokenizer benchmark runs end to end on tiny corpora: express's arm always, Geneformer's own
tokenizer only where its separate environment exists (the real numbers come from running the script by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_geneformer_tokenizer.py"
GENEFORMER_PYTHON = Path(os.environ.get("EXPRESS_GENEFORMER_PYTHON", "/work/envs/helical/bin/python"))


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--n_genes", "300", "--repeats", "1", "--data_dir", str(tmp_path / "data"),
         "--dicts", str(shared_path("geneformer/gc95M")), "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_express_arm(tmp_path):
    payload, stdout = run(tmp_path, "--sizes", "200,400", "--geneformer_python", "none")
    assert "note: Geneformer's tokenizer is skipped" in stdout
    rows = payload["rows"]
    assert [(r["cells"], r["tokenizer"], r["workers"]) for r in rows] == [
        (n, "express", w) for n in (200, 400) for w in (1, 2)]
    for r in rows:
        assert r["seconds"] > r["call_s"] > 0 and r["cells_per_s"] == r["cells"] / r["seconds"]
        assert r["call_cells_per_s"] == r["cells"] / r["call_s"] and r["cpu_s"] > 0 and r["peak_rss_mib"] > 50
        assert "speedup" not in r and "ids" not in r  # nothing to compare with
    assert set(payload["checks"]) == {"rss_growth_w1", "rss_growth_w2"}
    assert payload["meta"]["geneformer_python"] is None and payload["meta"]["repeats"] == 1
    assert "| 400 | express | 2 |" in stdout and "peak RSS express, 2 worker(s): 400 cells / 200 cells" in stdout
    # the input Geneformer reads: the dictionary's genes as ensembl_id, n_counts in obs; made once, then reused
    prepared = tmp_path / "data" / "geneformer_synthetic_200x300_s0" / "synthetic_200x300_s0.h5ad"
    import anndata as ad

    adata = ad.read_h5ad(prepared)
    assert adata.var["ensembl_id"].iloc[0].startswith("ENSG") and (adata.obs["n_counts"] == adata.X.sum(1).A1).all()
    assert not list((tmp_path / "data").glob("bench_gf_*"))  # the temporary folder (outputs, pickles) is removed


@pytest.mark.skipif(not GENEFORMER_PYTHON.is_file(),
                    reason=f"needs Geneformer's tokenizer in a separate environment ({GENEFORMER_PYTHON})")
def test_bench_against_geneformer(tmp_path):
    payload, stdout = run(tmp_path, "--sizes", "300", "--workers", "2")
    express, geneformer = payload["rows"]
    assert (express["tokenizer"], geneformer["tokenizer"]) == ("express", "geneformer")
    assert express["speedup"] == geneformer["seconds"] / express["seconds"]
    assert express["rss_share"] == express["peak_rss_mib"] / geneformer["peak_rss_mib"]
    ids = express["ids"]
    # every cell has the same ids as Geneformer's, up to the order of genes with equal values
    assert ids["cells_express"] == ids["cells_geneformer"] == 300 and ids["differ_otherwise"] == 0
    assert ids["identical"] + ids["differ_by_ties"] == 300 and ids["identical"] > 0
    assert set(payload["checks"]) == {"speedup", "rss_share", "ids_differ_otherwise"}
    assert "ids: 0 cells differ other than by ties" in stdout
