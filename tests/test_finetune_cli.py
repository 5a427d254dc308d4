"""``express-finetune`` with bad input, as a new user would try it: a one-line message and exit code 2 (the traceback
with --debug), nothing left behind, an existing output refused without --overwrite; and every file a run writes is
readable by others as the user's umask allows."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from finetune.run import cli


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_logging():
    torch.set_num_threads(1)
    yield
    # the CLI (and transformers) log to the stderr of their first call, which pytest captures per test and closes
    logging.getLogger().handlers.clear()
    from transformers.utils import logging as hf_logging

    hf_logging._reset_library_root_logger()


def _adata(n_cells: int = 120, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    types = np.array(["T", "B", "NK"])[rng.integers(0, 3, n_cells)]
    rate = rng.gamma(1.0, 2.0, size=(3, n_genes))[np.searchsorted(["B", "NK", "T"], types)]
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obs["cell_type"] = types
    adata.obs["donor"] = np.where(np.arange(n_cells) < n_cells * 3 // 4, "d1", "d2")
    adata.obsm["protein_counts"] = pd.DataFrame(rng.poisson(5, size=(n_cells, 4)), index=adata.obs_names,
                                                columns=[f"p{i}" for i in range(4)])
    return adata


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    _adata().write_h5ad(path)
    return path


def _run(data: Path, out: Path, *extra: str) -> int:
    return cli(["--task", "cell-type", "--encoder", "mlp", "--data", str(data), "--split_key", "donor",
                "--test_values", "d2", "--label_key", "cell_type", "--output_dir", str(out), "--epochs", "2",
                "--n_top_genes", "20", "--no_plots", "--mll_samples", "5", *extra])


def _write(tmp_path: Path, adata: ad.AnnData, name: str = "bad.h5ad") -> Path:
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _expect_bad_input(capsys, code: int, out: Path, message: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("express-finetune: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(tmp_path, good, capsys):
    out = tmp_path / "out"
    adata = _adata()
    _expect_bad_input(capsys, _run(good, out, "--label_key", "celltype"), out, "'celltype' is not an obs column")
    logged = adata.copy()
    logged.X = sp.csr_matrix(np.log1p(logged.X.toarray()))
    _expect_bad_input(capsys, _run(_write(tmp_path, logged), out), out, "does not hold raw counts")
    negative = adata.copy()
    negative.X = sp.csr_matrix(-negative.X.toarray())
    _expect_bad_input(capsys, _run(_write(tmp_path, negative), out), out, "does not hold raw counts")
    code = cli(["--task", "adt", "--encoder", "mlp", "--data", str(_write(tmp_path, adata[:, :].copy(), "p.h5ad")),
                "--split_key", "donor", "--test_values", "d2", "--output_dir", str(out),
                "--protein_obsm_key", "adt", "--epochs", "1", "--no_plots"])
    _expect_bad_input(capsys, code, out, "obsm['adt'] is absent")
    _expect_bad_input(capsys, _run(good, out, "--model", str(tmp_path)), out, "MLP encoder has no pretrained")
    code = _run(good, out, "--model", str(tmp_path), "--encoder", "transformer")
    _expect_bad_input(capsys, code, out, "is not a model folder")
    _expect_bad_input(capsys, _run(good, out, "--n_latent", "0", "--task", "vae"), out, "n_latent must be >= 1")
    single = adata.copy()
    single.obs["cell_type"] = "T"
    _expect_bad_input(capsys, _run(_write(tmp_path, single), out), out, "a single class")
    _expect_bad_input(capsys, _run(good, out, "--test_values", "d9"), out, "no cells with value")
    _expect_bad_input(capsys, _run(good, out, "--epochs", "1", "--label_key"), out, "")  # usage error
    tiny = adata.copy()
    tiny.obs["donor"] = ["d1"] * 3 + ["d2"] * (adata.n_obs - 3)  # three training cells
    _expect_bad_input(capsys, _run(_write(tmp_path, tiny), out), out, "only 3 training cells")


def test_genes_disjoint_from_a_pretrained_models_vocabulary(tmp_path, good, capsys):
    from modeling import ExpressConfig, ExpressForMaskedModeling
    from tokenizer import fit_statistics

    other = _adata()
    other.var_names = [f"ENSG{i:05d}" for i in range(other.n_vars)]
    vocab = fit_statistics([other], None, progress=False)
    model = ExpressForMaskedModeling(ExpressConfig.from_vocab(vocab, hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=16))
    model.save_pretrained(tmp_path / "pretrained")
    vocab.save(tmp_path / "pretrained")
    out = tmp_path / "out"
    code = _run(good, out, "--model", str(tmp_path / "pretrained"), "--encoder", "transformer")
    _expect_bad_input(capsys, code, out, "none of its 40 genes is in the vocabulary")
    with pytest.raises(Exception, match="none of its 40 genes"):  # --debug: the real exception, with its traceback
        _run(good, out, "--model", str(tmp_path / "pretrained"), "--encoder", "transformer", "--debug")


def test_existing_output_is_refused_without_overwrite(tmp_path, good, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("precious")
    assert _run(good, notes) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert _run(good, notes, "--overwrite") == 2 and "not an express output" in capsys.readouterr().err
    assert (notes / "thesis.txt").read_text() == "precious" and sorted(os.listdir(notes)) == ["thesis.txt"]
    out = tmp_path / "run"
    assert _run(good, out) == 0
    assert _run(good, out) == 2 and "--overwrite" in capsys.readouterr().err
    before = (out / "metrics.json").stat().st_mtime_ns
    assert _run(good, out, "--overwrite", "--seed", "1") == 0
    assert (out / "metrics.json").stat().st_mtime_ns != before


def test_outputs_are_readable_under_the_users_umask(tmp_path, good):
    """Files are created with the mode any other file of the user gets (0644 under umask 022), not the private 0600
    of temporary files."""
    from tokenizer.cli import main as tokenize_cli

    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert _run(good, out) == 0
        assert tokenize_cli(["fit", str(good), "--out", str(tmp_path / "stats"), "--quiet"]) == 0
        assert tokenize_cli(["tokenize", str(good), "--stats", str(tmp_path / "stats"), "--out",
                             str(tmp_path / "tokens"), "--quiet"]) == 0
    finally:
        os.umask(previous)
    files = [p for root in (out, tmp_path / "stats", tmp_path / "tokens") for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"metrics.json", "args.json", "model.safetensors", "config.json", "predictions.csv", "history.json",
            "vocab.json", "gene_stats.parquet", "stats.json", "manifest.json", "sketch.npz"} <= names
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(mode == 0o644 for mode in modes.values()), {k: oct(v) for k, v in modes.items() if v != 0o644}
    folders = [p for root in (out, tmp_path / "stats", tmp_path / "tokens") for p in [root, *root.rglob("*")]
               if p.is_dir()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in folders)
