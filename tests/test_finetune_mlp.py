"""End-to-end fine-tuning with the MLP encoder on real data: every task beats its trivial baseline on held-out cells.

CITE-seq: train on donor s1d1, test on s1d2 (obs 'batch'). Cell lines: hold out one CEL-seq2 plate.
"""

import json

import anndata as ad
import numpy as np
import pytest
import torch

from finetune import api
from finetune.data import split_adata
from finetune.run import FinetuneArgs, main

pytestmark = [pytest.mark.shared_data, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def cite_path():
    from conftest import shared_path

    return str(shared_path("bmmc_cite_600.h5ad"))


@pytest.fixture(scope="module")
def cite(cite_path):
    return split_adata(ad.read_h5ad(cite_path), "batch", ["s1d2"])


def _args(tmp_path, path, **kw):
    base = dict(data=path, output_dir=str(tmp_path / "out"), encoder="mlp", split_key="batch", test_values="s1d2",
                epochs=20, n_top_genes=1000, plots=False, mll_samples=20, seed=0)
    base.update(kw)
    return FinetuneArgs(**base)


def test_cell_type_mlp_on_cite_beats_majority_and_reloads(tmp_path, cite_path, cite):
    metrics = main(_args(tmp_path, cite_path, task="cell-type", label_key="cell_type", batch_key="batch",
                         plots=True))
    assert metrics["accuracy"] > metrics["majority_accuracy"] + 0.1
    assert metrics["macro_f1"] > metrics["majority_macro_f1"] + 0.1
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"]
    for name in ("umap.png", "confusion_matrix.png", "predictions.csv", "history.json", "model/config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    # the saved model reloads and predicts what the run predicted
    model = api.load_model(tmp_path / "out" / "model")
    test = cite[1].copy()
    api.predict_cell_types(test, model)
    saved = np.loadtxt(tmp_path / "out" / "predictions.csv", delimiter=",", skiprows=1, dtype=str, usecols=1)
    assert (test.obs["express_cell_type"].astype(str).to_numpy() == saved).all()
    assert test.obsm["express_cell_type_probabilities"].shape == (test.n_obs, model.config.num_labels)
    np.testing.assert_allclose(test.obsm["express_cell_type_probabilities"].to_numpy().sum(1), 1.0, rtol=1e-5)


def test_cell_type_mlp_on_cell_lines_held_out_batch(tmp_path):
    from conftest import shared_path

    metrics = main(_args(tmp_path, str(shared_path("cellbench_lung_1408.h5ad")), task="cell-type",
                         label_key="cell_type", test_values="sc_celseq2_5cl_p3", n_top_genes=800, epochs=15))
    assert metrics["accuracy"] > metrics["majority_accuracy"] + 0.3
    assert metrics["macro_f1"] > metrics["majority_macro_f1"] + 0.3


def _poisson_null(train, test, genes):
    """log-likelihood of held-out counts under Poisson(library * pooled training proportions): no latent at all."""
    from finetune.data import align_genes, counts_matrix, gene_names

    def counts(a):
        return align_genes(counts_matrix(a), gene_names(a), genes).toarray()

    p = counts(train).sum(0) + 0.5
    p /= p.sum()
    x = counts(test)
    rate = x.sum(1, keepdims=True) * p
    return float(torch.distributions.Poisson(torch.from_numpy(rate)).log_prob(torch.from_numpy(x)).sum(1).mean())


def test_vae_mlp_on_cite_semi_supervised_iwae(tmp_path, cite_path, cite):
    metrics = main(_args(tmp_path, cite_path, task="vae", label_key="cell_type", batch_key="batch",
                         objective="iwae", n_samples=4, epochs=25, dispersion="gene-batch", covariance="full"))
    assert metrics["accuracy"] > metrics["majority_accuracy"] + 0.1
    assert metrics["macro_f1"] > metrics["majority_macro_f1"] + 0.05
    model = api.load_model(tmp_path / "out" / "model")
    null = _poisson_null(cite[0], cite[1], model.config.gene_panel)
    assert np.isfinite(metrics["marginal_log_likelihood"])
    assert metrics["marginal_log_likelihood"] > null
    assert metrics["embedding"]["knn_accuracy"] > 0.4


def test_adt_regression_and_nb_heads_beat_mean_protein(tmp_path, cite_path):
    for head, epochs in (("regression", 30), ("nb", 30)):
        m = main(_args(tmp_path / head, cite_path, task="adt", protein_obsm_key="protein_counts", protein_head=head,
                       epochs=epochs, lr=3e-3 if head == "nb" else 1e-3))
        assert m["rmse"] < m["mean_protein_rmse"], (head, m)
        assert m["pearson_per_cell"] > m["mean_protein_pearson_per_cell"] + 0.1, (head, m)
        assert m["pearson_per_protein"] > 0.3, (head, m)  # the mean-per-protein baseline scores 0 here


def test_unlabelled_cells_labels_never_enter_training(cite):
    """Cells marked unlabelled keep their (wrong, scrambled) labels in obs; training must not see them."""
    train = cite[0][:120].copy()
    rng = np.random.default_rng(0)
    train.obs["labelled"] = rng.random(train.n_obs) < 0.5
    scrambled = train.copy()
    hidden = ~scrambled.obs["labelled"].to_numpy()
    values = scrambled.obs["cell_type"].astype(str).to_numpy().copy()
    values[hidden] = rng.permutation(["never seen type"] * 3 + list(values[hidden]))[: hidden.sum()]
    scrambled.obs["cell_type"] = values
    models = []
    for data in (train, scrambled):
        models.append(api.train_vae(data, encoder="mlp", label_key="cell_type", labelled_key="labelled",
                                    n_top_genes=200, epochs=3, batch_size=32, seed=3))
    assert models[0].config.id2label == models[1].config.id2label  # classes come from labelled cells only
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # and the labels do matter where cells are labelled
    flipped = train.copy()
    keep = flipped.obs["labelled"].to_numpy()
    vals = flipped.obs["cell_type"].astype(str).to_numpy().copy()
    vals[keep] = np.roll(vals[keep], 1)
    flipped.obs["cell_type"] = vals
    other = api.train_vae(flipped, encoder="mlp", label_key="cell_type", labelled_key="labelled", n_top_genes=200,
                          epochs=3, batch_size=32, seed=3)
    assert not torch.equal(other.vae.prior.means, models[0].vae.prior.means)


def test_normal_prior_reads_no_labels(cite):
    """A label column beside prior="normal" is not an error and changes nothing: the normal prior reads no labels."""
    train = cite[0][:120].copy()
    kw = dict(encoder="mlp", prior="normal", n_top_genes=200, epochs=2, min_steps=0, batch_size=32, seed=1)
    with_labels = api.train_vae(train, label_key="cell_type", **kw)
    without = api.train_vae(train, **kw)
    assert with_labels.config.prior == "normal"
    for (name, a), (_, b) in zip(with_labels.state_dict().items(), without.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_python_api_writes_results_back(tmp_path, cite):
    train, test = cite[0].copy(), cite[1].copy()
    vae = api.train_vae(train, encoder="mlp", batch_key="batch", n_top_genes=300, epochs=3, head={"n_latent": 8})
    with pytest.raises(TypeError, match="head="):
        api.train_vae(train, encoder="mlp", epochs=1, n_latent=8)
    emb = api.embed(test, vae, key_added="X_vae")
    assert test.obsm["X_vae"].shape == (test.n_obs, 8) and emb is test.obsm["X_vae"]
    mll = api.marginal_log_likelihood(test, vae, n_samples=10, batch_key="batch")
    assert mll.shape == (test.n_obs,) and np.all(np.isfinite(mll))
    assert "express_marginal_ll" in test.obs
    with pytest.raises(ValueError, match="does not classify"):
        api.predict_cell_types(test, vae)
    adt = api.fit_proteins(train, encoder="mlp", n_top_genes=300, epochs=3)
    frame = api.predict_proteins(test, adt, key_added="adt_pred")
    assert list(test.obsm["adt_pred"].columns) == list(train.obsm["protein_counts"].columns)
    assert frame.shape == (test.n_obs, 134)
    api.save_model(adt, tmp_path / "adt")
    again = api.load_model(tmp_path / "adt")
    np.testing.assert_allclose(api.predict_proteins(test, again).to_numpy(), frame.to_numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label_key"):
        api.prepare_model("cell-type", train, encoder="mlp")


def test_bad_input_gets_clear_errors(tmp_path, cite_path, cite):
    train = cite[0].copy()
    train.X = train.X.astype(np.float32) * 0.5  # not counts
    with pytest.raises(ValueError, match="raw counts"):
        api.fit_cell_types(train, encoder="mlp", label_key="cell_type", epochs=1)
    with pytest.raises(ValueError, match="no cells with value"):
        main(_args(tmp_path, cite_path, task="cell-type", label_key="cell_type", test_values="s9d9"))
    with pytest.raises(ValueError, match="--protein_obsm_key"):
        _args(tmp_path, cite_path, task="adt")


def test_run_under_accelerate_launch_with_two_processes(tmp_path, cite_path):
    """Real 2-process data parallelism on CPU (gloo): both ranks train, the main one evaluates and writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(repo / "finetune" / "run.py"), "--task", "cell-type", "--encoder", "mlp", "--data", cite_path,
           "--split_key", "batch", "--test_values", "s1d2", "--label_key", "cell_type", "--output_dir",
           str(tmp_path / "ddp"), "--epochs", "4", "--no_plots", "--num_threads", "1", "--n_top_genes", "300"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["accuracy"] > metrics["majority_accuracy"]


def test_hierarchy_hyperprior_from_an_obs_column(cite):
    train = cite[0].copy()
    # coarse level: the first word of each BMMC type ("CD4+", "CD8+", "NK", "Naive", ...)
    train.obs["lineage"] = train.obs["cell_type"].astype(str).str.split(" ").str[0]
    vae = api.train_vae(train, encoder="mlp", label_key="cell_type", hierarchy_key="lineage", n_top_genes=200,
                        epochs=2)
    names = [vae.config.id2label[i] for i in range(len(vae.config.id2label))]
    parents = vae.config.label_parents
    coarse = sorted(train.obs["lineage"].unique())
    assert [coarse[p] for p in parents] == [n.split(" ")[0] for n in names]
    assert vae.vae.prior.parent_means.shape == (len(coarse), vae.config.n_latent)
    train.obs.loc[train.obs_names[0], "lineage"] = "somewhere else"  # one type now has two parents
    with pytest.raises(ValueError, match="several parents"):
        api.train_vae(train, encoder="mlp", label_key="cell_type", hierarchy_key="lineage", epochs=1)
