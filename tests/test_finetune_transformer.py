"""Fine-tuning with the transformer encoder: loading a pretraining checkpoint (weights, vocabulary, freezing) and
tiny end-to-end runs of every task on real data, each beating its trivial baseline on held-out cells."""

import numpy as np
import pytest
import torch

from finetune import api
from finetune.run import FinetuneArgs, main
from modeling import ExpressConfig, ExpressForMaskedModeling
from test_finetune_mlp import _poisson_null, cite, cite_path  # noqa: F401  (shared fixtures)

pytestmark = [pytest.mark.shared_data, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cite):
    """A (randomly initialised) pretraining checkpoint as the pretraining run writes it: weights + vocabulary."""
    from tokenizer.stats import fit_statistics

    vocab = fit_statistics([cite[0]], None, progress=False)
    torch.manual_seed(0)
    model = ExpressForMaskedModeling(ExpressConfig.from_vocab(vocab, max_position_embeddings=320, **TINY))
    model.set_gene_statistics(vocab.token_zero_fraction, vocab.token_group_ids)
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    vocab.save(path)
    return path, model


def test_pretrained_encoder_loads_with_its_vocabulary_and_freezes(checkpoint, cite):
    path, pretrained = checkpoint
    cells = cite[0][:64].copy()
    net = api.prepare_model("cell-type", cells, model=path, encoder="transformer", label_key="cell_type",
                            freeze_layers=1)
    for name, value in pretrained.express.state_dict().items():
        torch.testing.assert_close(net.express.state_dict()[name], value, msg=name)
    from tokenizer import GeneVocab

    assert net.vocab.fingerprint() == GeneVocab.load(path).fingerprint()
    table = api.cells_for(cells, net, label_key="cell_type")
    assert len(table) == 64 and table["input_ids"][0][0] == net.vocab.cls_id
    assert not any(p.requires_grad for p in net.express.embeddings.parameters())
    assert not any(p.requires_grad for p in net.express.layers[0].parameters())
    assert all(p.requires_grad for p in net.express.layers[1].parameters())
    # freezing everything: training moves the classifier only
    frozen = api.prepare_model("cell-type", cells, model=path, encoder="transformer", label_key="cell_type",
                               freeze_layers=-1)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    api.fit(frozen, api.cells_for(cells, frozen, label_key="cell_type"), api.TrainSettings(epochs=1, batch_size=16))
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("express."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    with pytest.raises(ValueError, match="no pretrained weights"):
        api.prepare_model("cell-type", cite[0], model=path, encoder="mlp", label_key="cell_type")


def _task_keys(task: str) -> dict:
    """What ``prepare_model`` and ``cells_for`` read for a cell-type or protein task on the CITE-seq fixture."""
    return {"label_key": "cell_type"} if task == "cell-type" else {"protein_obsm_key": "protein_counts"}


def test_a_pretrained_encoder_fine_tunes_at_a_third_of_the_heads_rate(checkpoint, cite, monkeypatch):
    """The default ``encoder_lr``: ``lr / 3`` for a pretrained encoder under a classifier, ``lr / 10`` under the
    protein regression head, ``lr`` for one from random weights; an explicit value wins."""
    import pretrain.loop

    path, _ = checkpoint
    cells = cite[0][:64].copy()
    seen = []

    class Stop(Exception):
        pass

    def capture(model, loader, accelerator, loop, evaluate=None):
        seen.append((model.pretrained_encoder, loop.learning_rate, loop.encoder_learning_rate))
        raise Stop

    monkeypatch.setattr(pretrain.loop, "train", capture)
    runs = (("cell-type", path, {}), ("cell-type", "none", {}), ("cell-type", path, {"encoder_lr": 5e-4}),
            ("adt", path, {}), ("adt", "none", {}))
    for task, source, settings in runs:
        keys = _task_keys(task)
        net = api.prepare_model(task, cells, model=source, encoder="transformer",
                                transformer=None if source == path else TINY, **keys)
        with pytest.raises(Stop):
            api.fit(net, api.cells_for(cells, net, **keys), api.TrainSettings(lr=3e-3, epochs=1, batch_size=16,
                                                                              **settings))
    assert seen == [(True, 3e-3, pytest.approx(1e-3)), (False, 3e-3, 3e-3), (True, 3e-3, 5e-4),
                    (True, 3e-3, pytest.approx(3e-4)), (False, 3e-3, 3e-3)]


def test_cell_type_classifiers_on_the_transformer_have_an_l1_penalised_wide_path_by_default(checkpoint, cite):
    """The transformer's cell-type classifier is built with a linear model of the log-normalised HVGs beside it,
    with an L1 penalty on its weights, unless the head config says otherwise (``False``, or ``"auto"`` for training
    to keep or drop it); the MLP encoder and the protein regressor have none unless asked."""
    path, _ = checkpoint
    cells = cite[0][:64].copy()

    def wide(task, **kw):
        keys = _task_keys(task)
        net = api.prepare_model(task, cells, n_top_genes=50, **keys, **kw)
        return net.config.wide_path, len(net.config.gene_panel or []), net.choose_wide_path, net

    flag, panel, choose, net = wide("cell-type", model=path)
    assert (flag, panel, choose) == (True, 50, False)
    assert net.config.wide_l1 == api.WIDE_L1 > 0  # penalised, as the L1 logistic-regression baseline
    # the collator feeds the wide path its panel counts (the head raises without them)
    assert api.outputs(cells[:8], net)["logits"].shape == (8, net.config.num_labels)
    assert wide("cell-type", model=path, head={"wide_path": "auto"})[:3] == (True, 50, True)
    assert wide("cell-type", model=path, head={"wide_path": False})[:3] == (False, 0, False)
    assert wide("cell-type", model="none", encoder="mlp")[::2] == (False, False)
    assert wide("adt", model=path)[:3] == (False, 0, False)
    assert wide("adt", model=path, head={"wide_path": "auto"})[:3] == (True, 50, True)
    assert wide("adt", model=path, head={"wide_path": "auto"})[-1].config.wide_l1 == 0.0
    assert wide("cell-type", model=path, head={"wide_l1": 0.0})[-1].config.wide_l1 == 0.0


def test_the_wide_path_is_kept_or_dropped_by_the_validation_cells(checkpoint, cite, tmp_path, monkeypatch):
    """``wide_path="auto"`` trains with and without the path, from the same start, and keeps the run whose
    validation cells score better (the path on a tie). Dropped, the model is the transformer alone: no path and no
    panel, saved, reloaded and predicting as one."""
    path, _ = checkpoint
    cells = cite[0][:120].copy()
    settings = api.TrainSettings(epochs=1, min_steps=4, batch_size=32, seed=0)
    net = api.prepare_model("cell-type", cells, model=path, label_key="cell_type", n_top_genes=50,
                            head={"wide_path": "auto"})
    start = {k: v.clone() for k, v in net.state_dict().items()}
    history = api.fit(net, api.cells_for(cells, net, label_key="cell_type"), settings, progress=False)
    scores = history[-1]["candidates"]
    assert history[-1]["wide_path"] is (scores["with"] >= scores["without"])
    assert net.config.wide_path is history[-1]["wide_path"] and (net.wide is not None) is net.config.wide_path

    import pretrain.loop

    real_train, starts = pretrain.loop.train, []

    def recording_train(model, *args, **kwargs):
        starts.append(({k: v.clone() for k, v in model.state_dict().items()}, model.wide is not None))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(pretrain.loop, "train", recording_train)

    def choose(on: bool):
        """A model whose validation scores are made to favour the path (on) or the transformer alone."""
        starts.clear()
        net = api.prepare_model("cell-type", cells, model=path, label_key="cell_type", n_top_genes=50,
                                head={"wide_path": "auto"})
        net.load_state_dict(start)
        runs = iter([0.5, 0.4 if on else 0.6])  # the run with the path scores 0.5, the one without 0.4 or 0.6
        monkeypatch.setattr(api, "_best_score", lambda history: next(runs))
        api.fit(net, api.cells_for(cells, net, label_key="cell_type"), settings, progress=False)
        return net

    kept = choose(True)
    assert kept.config.wide_path is True and len(kept.config.gene_panel) == 50
    assert not torch.equal(kept.wide.weight, start["wide.weight"])  # the path was trained
    dropped = choose(False)
    # two runs, the first with the path, the second without, both from the same weights
    assert [with_path for _, with_path in starts] == [True, False]
    for state, _ in starts:
        assert all(torch.equal(value, start[name]) for name, value in state.items())
    assert set(start) - set(starts[1][0]) == {"wide.weight", "wide.bias"}
    assert dropped.wide is None and dropped.config.wide_path is False and dropped.config.gene_panel == []
    assert "wide.weight" not in dropped.state_dict()
    api.save_model(dropped, tmp_path / "alone")
    reloaded = api.load_model(tmp_path / "alone")
    assert reloaded.wide is None and reloaded.config.gene_panel == []
    np.testing.assert_allclose(api.outputs(cells[:16], reloaded)["logits"], api.outputs(cells[:16], dropped)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_pretrained_models_tokenization_is_the_default(checkpoint, cite, tmp_path):
    """New cells are tokenized as the pretraining corpus was (tokenization.json beside the weights), unless the
    caller says otherwise; a folder without the file falls back to the tokenizer's defaults."""
    import shutil

    from tokenizer import TokenizationSpec

    path, _ = checkpoint
    folder = tmp_path / "pretrained"
    shutil.copytree(path, folder)
    TokenizationSpec(top_k=20, n_zeros=3, seed=5).save(folder)
    cells = cite[0][:32].copy()

    def longest(net):
        return max(len(ids) for ids in api.cells_for(cells, net)["input_ids"])

    net = api.prepare_model("cell-type", cells, model=folder, encoder="transformer", label_key="cell_type")
    assert (net.tokenization.top_k, net.tokenization.n_zeros, net.tokenization.seed) == (20, 3, 5)
    assert longest(net) == 1 + 20 + 3  # <cls>, the top 20 detected genes, 3 sampled zeros
    net = api.prepare_model("cell-type", cells, model=folder, encoder="transformer", label_key="cell_type",
                            tokenization={"n_zeros": 0})
    assert (net.tokenization.top_k, net.tokenization.n_zeros) == (20, 0) and longest(net) == 21
    net = api.prepare_model("cell-type", cells, model=path, encoder="transformer", label_key="cell_type")
    assert net.tokenization.same_encoding(TokenizationSpec()) and longest(net) > 1 + 20 + 3
    # the fine-tuned model keeps the spec it was trained with
    api.save_model(net, tmp_path / "tuned")
    assert api.load_model(tmp_path / "tuned").tokenization.same_encoding(net.tokenization)


def _args(tmp_path, path, **kw):
    base = dict(data=path, output_dir=str(tmp_path / "out"), encoder="transformer", split_key="batch",
                test_values="s1d2", plots=False, mll_samples=10, tokenization='{"top_k": 128, "n_zeros": 16}',
                n_top_genes=500, seed=0,
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, lr=2e-3)
    base.update(kw)
    return FinetuneArgs(**base)


def test_cell_type_from_pretrained_checkpoint_beats_majority(tmp_path, checkpoint, cite_path):
    path, _ = checkpoint
    m = main(_args(tmp_path, cite_path, task="cell-type", model=str(path), label_key="cell_type", epochs=25,
                   encoder_lr=2e-3))
    assert m["accuracy"] > m["majority_accuracy"] + 0.03
    assert m["macro_f1"] > m["majority_macro_f1"] + 0.02
    reloaded = api.load_model(tmp_path / "out" / "model")
    assert reloaded.vocab is not None and reloaded.config.encoder == "transformer"


def test_vae_and_adt_with_transformer_from_scratch(tmp_path, cite_path, cite):
    vae = main(_args(tmp_path / "vae", cite_path, task="vae", batch_key="batch", epochs=6, n_latent=8,
                     likelihood="zinb"))
    assert np.isfinite(vae["marginal_log_likelihood"])
    model = api.load_model(tmp_path / "vae" / "out" / "model")
    assert vae["marginal_log_likelihood"] > _poisson_null(cite[0], cite[1], model.config.gene_panel)
    adt = main(_args(tmp_path / "adt", cite_path, task="adt", protein_obsm_key="protein_counts", epochs=15, lr=5e-3))
    assert adt["rmse"] < adt["mean_protein_rmse"] - 0.03
    assert adt["pearson_per_protein"] > 0.15  # the mean-per-protein baseline scores 0
    assert adt["pearson_per_cell"] > adt["mean_protein_pearson_per_cell"] + 0.05
