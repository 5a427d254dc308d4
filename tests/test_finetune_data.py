"""AnnData -> model inputs: normalisations by hand, gene alignment, labels, splits, command-line parsing."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from finetune.data import (
    UNLABELLED,
    FinetuneDataError,
    align_genes,
    fit_protein_reference,
    log_normalize,
    normalize_proteins,
    split_adata,
)
from finetune.run import FinetuneArgs
from pretrain.args import parse_args
from pretrain.data import encode_labels, label_categories
from tokenizer import InputError


def test_protein_normalisations_by_hand():
    x = np.array([[0, 3, 10], [5, 0, 1], [2, 2, 2]], dtype=float)
    ref = fit_protein_reference(x, "clr")
    np.testing.assert_allclose(ref, np.log1p(x).mean(0))
    # per-protein CLR (muon prot.pp.clr, axis 0): log1p(x / exp(mean over cells of log1p(x)))
    expect = np.log1p(x / np.exp(np.log1p(x).mean(0, keepdims=True)))
    np.testing.assert_allclose(normalize_proteins(x, "clr", ref), expect)
    # per-cell CLR (Seurat margin 2)
    expect_cell = np.log1p(x / np.exp(np.log1p(x).mean(1, keepdims=True)))
    np.testing.assert_allclose(normalize_proteins(x, "clr_cell"), expect_cell)
    np.testing.assert_allclose(normalize_proteins(x, "log1p_cpt"), np.log1p(x / x.sum(1, keepdims=True) * 1e3))
    # a stack of sampled count matrices (S, cells, proteins) normalises sample by sample
    stack = np.stack([x, 2 * x])
    np.testing.assert_allclose(normalize_proteins(stack, "clr", ref)[1], normalize_proteins(2 * x, "clr", ref))
    with pytest.raises(ValueError, match="reference"):
        normalize_proteins(x, "clr")
    with pytest.raises(ValueError, match="protein_norm"):
        normalize_proteins(x, "zscore")


def test_log_normalize_and_align_genes():
    counts = sp.csr_matrix(np.array([[1, 0, 3], [0, 4, 0]], dtype=np.float32))
    out = log_normalize(counts)  # each cell's library is its row sum: 4 and 4
    np.testing.assert_allclose(out.toarray(), np.log1p(counts.toarray() / np.array([[4.0], [4.0]]) * 1e4), rtol=1e-6)
    aligned = align_genes(counts, np.array(["a", "b", "c"]), ["c", "zz", "a"])
    np.testing.assert_array_equal(aligned.toarray(), [[3, 0, 1], [0, 0, 0]])
    with pytest.raises(FinetuneDataError, match="gene_id_key"):
        align_genes(counts, np.array(["a", "b", "c"]), ["x", "y"])


def test_labels_and_unlabelled_markers():
    values = ["B", "T", None, "unknown", "NK", float("nan"), "T"]
    assert label_categories(values, unlabelled=["unknown"]) == ["B", "NK", "T"]
    codes = encode_labels(values, ["B", "T"], unlabelled=["unknown"])
    np.testing.assert_array_equal(codes, [0, 1, UNLABELLED, UNLABELLED, UNLABELLED, UNLABELLED, 1])


def test_split_by_obs_column():
    a = ad.AnnData(X=sp.csr_matrix(np.ones((4, 2), dtype=np.float32)),
                   obs=pd.DataFrame({"donor": ["1", "2", "3", "2"]}, index=[f"c{i}" for i in range(4)]))
    train, test = split_adata(a, "donor", ["2"])
    assert list(train.obs_names) == ["c0", "c2"] and list(test.obs_names) == ["c1", "c3"]
    with pytest.raises(FinetuneDataError, match="nothing left"):
        split_adata(a, "donor", ["1", "2", "3"])
    with pytest.raises(FinetuneDataError, match="not an obs column"):
        split_adata(a, "batch", ["x"])


def test_command_line_and_config_file(tmp_path):
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"task": "vae", "data": "a.h5ad", "output_dir": "out", "epochs": 7,
                                  "objective": "iwae", "n_samples": 5}))
    args = parse_args(FinetuneArgs, ["--config", str(config), "--epochs", "3", "--covariance", "full"])
    assert (args.task, args.data, args.epochs, args.n_samples, args.covariance) == ("vae", "a.h5ad", 3, 5, "full")
    with pytest.raises(InputError, match="--data"):
        parse_args(FinetuneArgs, ["--task", "vae", "--output_dir", "o"])
    with pytest.raises(InputError, match="n_samples"):
        parse_args(FinetuneArgs, ["--task", "vae", "--data", "a", "--output_dir", "o", "--objective", "iwae"])
    with pytest.raises(SystemExit):
        parse_args(FinetuneArgs, ["--task", "segmentation", "--data", "a", "--output_dir", "o"])


def test_wide_path_flag_leaves_the_default_to_the_library():
    """No flag: the head config does not set it or its penalty (cell types on the transformer then have an
    L1-penalised wide path, see finetune.api); ``--wide_path false`` turns it off, a bare ``--wide_path`` on,
    ``auto`` chooses; ``--wide_l1`` sets the penalty; the VAE heads never take them."""
    base = ["--task", "cell-type", "--data", "a", "--output_dir", "o", "--label_key", "cell_type"]
    assert "wide_path" not in parse_args(FinetuneArgs, base).head()
    assert parse_args(FinetuneArgs, [*base, "--wide_path", "false"]).head()["wide_path"] is False
    assert parse_args(FinetuneArgs, [*base, "--wide_path"]).head()["wide_path"] is True
    assert parse_args(FinetuneArgs, [*base, "--wide_path", "auto"]).head()["wide_path"] == "auto"
    assert "wide_l1" not in parse_args(FinetuneArgs, base).head()
    assert parse_args(FinetuneArgs, [*base, "--wide_l1", "0"]).head()["wide_l1"] == 0.0
    vae = ["--task", "vae", "--data", "a", "--output_dir", "o", "--wide_path"]
    assert "wide_path" not in parse_args(FinetuneArgs, vae).head()
