"""Training options of the cell-type head: class-balanced loss weights, label smoothing, input-gene dropout."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.api import TrainSettings, class_weights
from modeling import ExpressConfig, ExpressForCellClassification
from modeling.modeling_heads import MLPCellEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_weights_balanced_and_sqrt_by_hand():
    labels = np.array([0, 0, 0, 1, -100, 0, 1, 3])  # class 2 absent, one unlabelled cell
    w = torch.tensor(class_weights(labels, 4, "balanced"))
    # 7 labelled cells, 3 classes present: n / (C * n_c)
    np.testing.assert_allclose(w.numpy(), [7 / (3 * 4), 7 / (3 * 2), 0.0, 7 / (3 * 1)], rtol=1e-6)
    # balanced weights make every present class weigh the same in total
    counts = np.array([4, 2, 0, 1])
    np.testing.assert_allclose((w.numpy() * counts)[counts > 0], 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(class_weights(labels, 4, "sqrt"), np.sqrt(w.numpy()), rtol=1e-6)
    assert class_weights(labels, 4, "none") is None
    with pytest.raises(ValueError, match="class_weighting"):
        class_weights(labels, 4, "inverse")


def test_settings_reject_bad_options():
    with pytest.raises(ValueError, match="class_weighting must be one of"):
        TrainSettings(class_weighting="inverse")
    with pytest.raises(ValueError, match="label_smoothing"):
        ExpressConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="unknown field"):
        ExpressConfig(input_dropuot=0.1)  # a misspelt head setting is an error, not silently dropped


def _tiny_classifier(**head):
    genes = [f"g{i}" for i in range(6)]
    config = ExpressConfig(encoder="mlp", gene_panel=genes, mlp_hidden_size=8, mlp_layers=1,
                           id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}, **head)
    return ExpressForCellClassification(config).eval()


def _inputs(log_counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """MLP-encoder inputs whose log-normalisation gives ``log_counts`` (library 1e4: log1p(x))."""
    return {"gene_counts": torch.expm1(log_counts), "total_counts": torch.full((log_counts.shape[0],), 1e4)}


def test_weighted_and_smoothed_loss_match_a_manual_cross_entropy():
    torch.manual_seed(0)
    weights = torch.tensor([0.5, 2.0, 1.0])
    model = _tiny_classifier(class_weights=weights.tolist(), label_smoothing=0.2)
    x = torch.rand(5, 6)
    labels = torch.tensor([0, 2, 2, -100, 1])
    out = model(**_inputs(x), labels=labels)
    logp = torch.log_softmax(out.logits.float(), -1)
    keep = labels >= 0
    y = labels[keep]
    # torch's convention: smoothed target (1 - eps) one-hot + eps / C; each cell's terms weighted by the class
    # weights, normalised by the summed weights of the cells' true classes
    target = F.one_hot(y, 3).float() * 0.8 + 0.2 / 3
    per_cell = -(target * logp[keep] * weights).sum(-1)
    expected = per_cell.sum() / weights[y].sum()
    torch.testing.assert_close(out.loss, expected)
    # without options: the plain mean cross-entropy over labelled cells
    plain_model = _tiny_classifier()
    plain_model.load_state_dict(model.state_dict())
    plain = plain_model(**_inputs(x), labels=labels).loss
    torch.testing.assert_close(plain, F.nll_loss(logp[keep], y))
    assert not torch.allclose(out.loss, plain)


def test_input_dropout_only_in_training_and_saved_with_the_head(tmp_path):
    torch.manual_seed(0)
    encoder = MLPCellEncoder(50, n_hidden=16, n_layers=1, dropout=0.0, input_dropout=0.5)
    x = torch.rand(4, 50) + 0.5
    inputs = _inputs(x)
    encoder.eval()
    torch.testing.assert_close(encoder(**inputs), encoder.net(x))  # identity at evaluation
    encoder.train()
    a, b = encoder(**inputs), encoder(**inputs)
    assert not torch.allclose(a, b)  # fresh gene masks each call
    model = _tiny_classifier(input_dropout=0.25)
    assert model.express.input_dropout.p == 0.25
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["input_dropout"] == 0.25
    again = ExpressForCellClassification.from_pretrained(tmp_path)
    assert again.express.input_dropout.p == 0.25
    assert isinstance(MLPCellEncoder(3, n_hidden=4, n_layers=1).input_dropout, torch.nn.Identity)


def test_balanced_weights_raise_recall_of_a_rare_class():
    """On a 95:5 two-class problem with overlapping classes, the balanced loss moves the decision boundary towards
    the common class: the rare class's recall rises (training cells only, fixed seeds)."""
    import anndata as ad
    import scipy.sparse as sp

    from finetune import api

    rng = np.random.default_rng(0)
    n, genes = 1000, 20
    y = np.where(rng.random(n) < 0.05, "rare", "common")
    rate = np.full((n, genes), 3.0)
    rate[y == "rare", :4] *= 1.8  # a weak marker: the classes overlap
    counts = rng.poisson(rate).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"g{i}" for i in range(genes)]
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obs["cell_type"] = y
    recall = {}
    for method in ("none", "balanced"):
        model = api.fit_cell_types(adata, encoder="mlp", label_key="cell_type", n_top_genes=None, epochs=15,
                                   class_weighting=method, validation_fraction=0.0, seed=0,
                                   head={"mlp_hidden_size": 16, "mlp_layers": 1})
        pred = api.predict_cell_types(adata.copy(), model).astype(str).to_numpy()
        recall[method] = float((pred[y == "rare"] == "rare").mean())
    assert recall["none"] < 0.3 and recall["balanced"] > 0.5, recall  # measured: 0.00 and 0.76
