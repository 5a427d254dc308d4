"""The express-tokenize CLI: every subcommand through main(argv), exit codes and messages."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest

from tokenizer import GeneVocab
from tokenizer.cli import main
from tokenizer.synthetic import synthetic_adata


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    h5ad = root / "pbmc68k_counts.h5ad"
    assert main(["demo-data", "--out", str(h5ad)]) == 0
    return root, h5ad


def test_quickstart_flow(demo, capsys):
    root, h5ad = demo
    stats, tokens = root / "stats", root / "tokens"
    assert main(["fit", str(h5ad), "--out", str(stats), "--total_counts_key", "n_counts", "--overwrite",
                 "--quiet"]) == 0
    vocab = GeneVocab.load(stats)
    assert vocab.n_genes == 765 and vocab.meta["cells_used"] == 700
    assert main(["tokenize", str(h5ad), "--stats", str(stats), "--out", str(tokens), "--total_counts_key",
                 "n_counts", "--obs_keys", "cell_type", "--keep_counts", "--overwrite", "--quiet"]) == 0
    ds = datasets.load_from_disk(str(tokens))
    assert ds.num_rows == 700 and "cell_type" in ds.column_names and "counts" in ds.column_names
    # library sizes come from obs['n_counts'] (the 765 genes are a subset), not from the row sums
    adata = pd.read_parquet(stats / "gene_stats.parquet")
    assert len(adata) == 765
    capsys.readouterr()
    assert main(["inspect", str(tokens), "--cell", "3", "--n_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "cells: 700" in out and "obs cell_type:" in out and "cell 3:" in out
    first_gene = vocab.gene_ids[ds[3]["input_ids"][1] - vocab.n_special]
    assert f"   1 " in out and first_gene in out and "<cls>" in out and "sampled zeros" in out
    assert main(["inspect", str(stats)]) == 0
    out = capsys.readouterr().out
    assert "765 genes" in out and "relative error <= 0.005" in out


def test_dashed_aliases_workers_and_merge(demo, tmp_path):
    _, h5ad = demo
    for i in range(2):
        assert main(["fit", str(h5ad), "--out", str(tmp_path / f"s{i}"), "--total-counts-key", "n_counts",
                     "--shard", f"{i}/2", "--chunk-size", "128", "--quiet"]) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged"),
                 "--n-groups", "10,3"]) == 0
    assert main(["fit", str(h5ad), "--out", str(tmp_path / "one"), "--total_counts_key", "n_counts",
                 "--n_groups", "10,3", "--num-workers", "2", "--chunk-size", "128", "--quiet"]) == 0
    pd.testing.assert_frame_equal(GeneVocab.load(tmp_path / "merged").to_frame(),
                                  GeneVocab.load(tmp_path / "one").to_frame())
    assert main(["tokenize", str(h5ad), "--stats", str(tmp_path / "one"), "--out", str(tmp_path / "t"),
                 "--top-k", "10", "--n-zeros", "3", "--num-workers", "2", "--quiet"]) == 0
    assert max(datasets.load_from_disk(str(tmp_path / "t"))["length"]) == 14


def test_usage_and_input_errors_exit_2_with_one_line(demo, tmp_path, capsys):
    root, h5ad = demo
    assert main([]) == 2
    assert main(["fit", str(h5ad)]) == 2  # --out missing
    assert "required: --out" in capsys.readouterr().err
    cases = [
        (["fit", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "s")], "input file not found"),
        (["tokenize", str(h5ad), "--out", str(tmp_path / "t")], "needs --stats"),
        (["tokenize", str(h5ad), "--stats", str(tmp_path), "--out", str(tmp_path / "t")], "holds no express vocab"),
        (["fit", str(h5ad), "--out", str(root)], "already exists; pass --overwrite"),
        (["fit", str(h5ad), "--out", str(tmp_path / "s"), "--donor_key", "patient"],
         "obs has no column 'patient'; available columns: bulk_labels, louvain, n_counts, phase, cell_type"),
        (["inspect", str(tmp_path)], "neither a tokenized dataset nor a statistics folder"),
    ]
    for argv, message in cases:
        assert main(argv + ["--quiet"] if argv[0] in ("fit", "tokenize") else argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) <= 2, err  # a one-line error (plus, at most, one warning)


def test_help_lists_examples_and_entry_point_runs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "merge", "tokenize", "inspect", "demo-data"):
        assert command in out
    assert "examples:" in out
    assert main(["tokenize", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--geneformer_dicts" in out and "--num_workers" in out and "--num-workers" in out
    run = subprocess.run([sys.executable, "-m", "tokenizer.cli", "fit", "missing.h5ad", "--out", "x"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "input file not found: missing.h5ad" in run.stderr


def test_unexpected_errors_exit_1(monkeypatch, tmp_path, capsys):
    import tokenizer.stats

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(tokenizer.stats, "fit_statistics", broken)
    assert main(["fit", "x.h5ad", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "unexpected error: ZeroDivisionError: boom (rerun with --debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["fit", "x.h5ad", "--out", str(tmp_path / "s"), "--debug"])


def test_cli_bad_counts_message(tmp_path, capsys):
    adata = synthetic_adata(n_cells=50, n_genes=40, seed=0)
    adata.X = adata.X.astype(np.float32)
    adata.X.data[:] = np.log1p(adata.X.data)  # a log-normalised matrix passed by mistake
    path = tmp_path / "logged.h5ad"
    adata.write_h5ad(path)
    assert main(["fit", str(path), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "non-integer value" in err and "cell 'cell0' (row 0)" in err and "--allow_non_integer" in err
    assert not (tmp_path / "s").exists()
    assert main(["fit", str(path), "--out", str(tmp_path / "s"), "--allow_non_integer", "--quiet"]) == 0
    manifest_free = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert manifest_free["config"]["allow_non_integer"] is True
