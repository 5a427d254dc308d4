"""The fine-tuning recipe for small labelled sets: a floor on optimizer steps, validation on held-out donors, model
selection by macro-F1 / Pearson, class weighting chosen on the validation cells, and binomial thinning."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from finetune import api
from finetune.api import TrainSettings
from finetune.data import collator_for, measured_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["B", "T", "NK", "rare"]


def toy_adata(n_cells: int = 160, n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """Poisson counts with eight marker genes per cell type, four donors, one rare type (5% of the cells)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(TYPES), n_cells, p=[0.35, 0.35, 0.25, 0.05])
    rate = np.full((n_cells, n_genes), 0.5)
    for t in range(len(TYPES)):
        rate[labels == t, 8 * t:8 * t + 8] = 8.0
    counts = rng.poisson(rate * rng.uniform(0.5, 2.0, (n_cells, 1)))
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)),
                       obs=pd.DataFrame({"cell_type": np.array(TYPES)[labels],
                                         "donor": [f"d{i % 4}" for i in range(n_cells)]},
                                        index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    adata.obsm["protein_counts"] = pd.DataFrame(rng.poisson(5 + 20 * (labels[:, None] == np.arange(3))),
                                                index=adata.obs_names, columns=["CD19", "CD3", "CD56"])
    return adata


def _steps(model) -> list[int]:
    return [h["step"] for h in model.history if "train/loss" in h]


def test_min_steps_is_a_floor_on_the_optimizer_steps():
    adata = toy_adata(80)
    # 80 cells, 10% validation, batch 32 -> 3 steps per epoch: one epoch is 3 steps without a floor, the floor makes
    # it 20, and the default floor 500
    assert api.TrainSettings().min_steps == 500
    kw = dict(encoder="mlp", n_top_genes=None, epochs=1, batch_size=32, seed=0, validation_key=None)
    short = api.fit_cell_types(adata, lr=1e-2, min_steps=0, **kw)
    floored = api.fit_cell_types(adata, lr=1e-2, min_steps=20, **kw)
    assert max(_steps(short)) == 3
    assert max(_steps(floored)) == 20
    capped = api.fit_cell_types(adata, min_steps=20, max_steps=7, **kw)
    assert max(_steps(capped)) == 7  # max_steps wins over both


def test_validation_on_held_out_donors_and_selection_by_macro_f1(monkeypatch):
    import pretrain.data

    adata = toy_adata()
    held = []
    original = pretrain.data.split_cells

    def spy(*args, **kwargs):
        held.append(original(*args, **kwargs)[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain.data, "split_cells", spy)
    model = api.fit_cell_types(adata, encoder="mlp", n_top_genes=None, epochs=15, batch_size=32, lr=1e-2, seed=0,
                               validation_key="donor", validation_fraction=0.25)
    donors = set(adata.obs["donor"].iloc[held[0]])
    # the validation cells are whole donors: every cell of the held-out donor(s), none of the others
    assert donors and donors != set(adata.obs["donor"])
    assert sorted(held[0]) == list(np.flatnonzero(adata.obs["donor"].isin(donors)))
    best = model.history[-1]
    assert best["metric"] == "eval/macro_f1"
    evals = [h for h in model.history if "eval/macro_f1" in h]
    assert best["score"] == max(h["eval/macro_f1"] for h in evals)
    assert best["best_step"] == next(h["step"] for h in evals if h["eval/macro_f1"] == best["score"])
    with pytest.raises(ValueError, match="donour"):
        api.fit_cell_types(adata, encoder="mlp", n_top_genes=None, epochs=1, validation_key="donour")


def test_protein_regression_is_selected_by_per_protein_pearson():
    model = api.fit_proteins(toy_adata(), encoder="mlp", n_top_genes=None, epochs=10, batch_size=32, lr=1e-2, seed=0)
    assert model.history[-1]["metric"] == "eval/pearson_per_protein"
    assert -1.0 <= model.history[-1]["score"] <= 1.0


def test_auto_class_weighting_keeps_the_best_of_the_three_on_validation():
    adata = toy_adata(200)
    model = api.fit_cell_types(adata, encoder="mlp", n_top_genes=None, epochs=6, batch_size=32, lr=1e-2, seed=0,
                               class_weighting="auto", validation_key="donor", validation_fraction=0.25)
    choice = model.history[-1]
    assert set(choice["candidates"]) == {"none", "balanced", "sqrt"}
    assert choice["candidates"][choice["class_weighting"]] == max(choice["candidates"].values())
    if choice["class_weighting"] == "none":
        assert model.config.class_weights is None
    else:
        weights = np.asarray(model.config.class_weights)
        assert weights.shape == (len(TYPES),)
        # the rare type weighs most under either weighting
        assert weights.argmax() == model.config.label2id["rare"]


def test_thinning_retokenizes_kept_counts_on_every_visit():
    adata = toy_adata(20)
    net = api.prepare_model("cell-type", adata, label_key="cell_type", tokenization={"top_k": 12, "n_zeros": 4},
                            transformer=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32))
    config = net.config
    cells = api.cells_for(adata, net, label_key="cell_type", keep_counts=True)
    spec = measured_spec(adata, net.vocab, net.tokenization)
    plain = collator_for(config, net.vocab, cells)
    thinned = collator_for(config, net.vocab, cells, spec=spec, thinning=0.5)
    rows = [dict(cells[i], dataset_index=0, sample_seed=i) for i in range(len(cells))]
    a, b = plain(rows), thinned(rows)
    assert not torch.equal(a["values"], b["values"])
    # each thinned cell keeps a rank encoding: at most top_k + n_zeros + <cls> tokens, gene tokens in falling value
    assert int(b["attention_mask"].sum(1).max()) <= 1 + 12 + 4
    for i in range(len(rows)):
        keep = b["attention_mask"][i].bool() & ~b["is_zero"][i].bool()
        vals = b["values"][i][keep][1:]  # after <cls>
        assert torch.all(vals[:-1] >= vals[1:])
    # the same visit seed gives the same thinned cell; another seed another one
    assert torch.equal(thinned(rows)["values"], b["values"])
    other = thinned([dict(r, sample_seed=r["sample_seed"] + 100) for r in rows])
    assert not torch.equal(other["values"], b["values"])
    with pytest.raises(ValueError, match="thinning must be in"):
        TrainSettings(thinning=1.0)

