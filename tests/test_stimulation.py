"""Stimulation response (finetune/benchmark/stimulation.py): the metrics and shifts against hand computations, the
decoder read-out against the decoder's own numbers, the labelling classifier and the folds on synthetic cells, the
suite task, and the one-minute run on the real Kang data."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import shared_path

from finetune.benchmark import stimulation as S

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------
def test_r2_and_pearson_match_hand_computations():
    # truth (1, 2, 3): mean 2, SS_tot = 1 + 0 + 1 = 2; prediction (1, 2, 4): SS_res = 1 -> R^2 = 1 - 1/2
    assert S.r2_score([1, 2, 4], [1, 2, 3]) == pytest.approx(0.5)
    assert S.r2_score([3, 2, 1], [1, 2, 3]) == pytest.approx(1 - 8 / 2)  # anti-correlated: far below zero
    assert math.isnan(S.r2_score([1, 2, 3], [2, 2, 2]))
    # a = (1, 2, 3) -> (-1, 0, 1); b = (2, 4, 7) -> (-7/3, -1/3, 8/3): sum ab = 5, |a|^2 = 2, |b|^2 = 114/9
    assert S.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert math.isnan(S.pearson([0, 0, 0], [1, 2, 3]))


def test_response_genes_and_metrics_by_hand():
    control = np.array([0.0, 1.0, 2.0, 3.0])
    stim = np.array([1.0, 1.0, 0.0, 3.5])  # |change| = (1, 0, 2, 0.5)
    assert S.response_genes(control, stim, 2).tolist() == [2, 0]
    assert S.response_genes(np.zeros(3), np.array([1.0, -1.0, 0.5]), 2).tolist() == [0, 1]  # a tie: lower first
    predicted = np.array([0.5, 1.0, 1.0, 3.0])
    got = S.response_metrics(predicted, control, stim, np.array([2, 0]))
    # all genes: truth mean 1.375, SS_tot = 0.140625 + 0.140625 + 1.890625 + 4.515625 = 6.6875;
    # SS_res = 0.25 + 0 + 1 + 0.25 = 1.5
    assert got["r2_all"] == pytest.approx(1 - 1.5 / 6.6875)
    # top genes 2, 0: truth (0, 1), prediction (1, 0.5): SS_tot = 0.5, SS_res = 1 + 0.25
    assert got["r2_top100"] == pytest.approx(1 - 1.25 / 0.5)
    # predicted change (0.5, 0, -1, 0) against the true change (1, 0, -2, 0.5)
    assert got["pearson_delta"] == pytest.approx(S.pearson([0.5, 0, -1, 0], [1, 0, -2, 0.5]))
    assert got["pearson_delta_top100"] == pytest.approx(1.0)  # (-1, 0.5) vs (-2, 1): proportional
    assert got["r2_pearson_all"] == pytest.approx(S.pearson(predicted, stim) ** 2)
    assert math.isnan(S.response_metrics(control, control, stim, np.array([2, 0]))["pearson_delta"])


def test_balanced_shift_weighs_every_type_alike():
    values = np.array([[0.0], [2.0], [3.0], [10.0], [10.0], [10.0], [16.0], [16.0], [5.0]])
    types = np.array(["A", "A", "A", "B", "B", "B", "B", "B", "C"])
    stimulated = np.array([0, 0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    # A: 3 - mean(0, 2) = 2; B: mean(10, 16, 16) - mean(10, 10) = 4; C has no stimulated cell. Balanced: (2 + 4) / 2
    # = 3 (pooled, B's cells would weigh more: mean(3, 10, 16, 16) - mean(0, 2, 10, 10) = 5.75)
    shift, used = S.balanced_shift(values, types, stimulated, min_cells=1)
    assert shift.tolist() == [3.0] and used == ["A", "B"]
    shift, used = S.balanced_shift(values, types, stimulated, min_cells=2)  # A has one stimulated cell
    assert shift.tolist() == [4.0] and used == ["B"]
    with pytest.raises(ValueError, match="no type"):
        S.balanced_shift(values, types, stimulated, min_cells=5)


def test_mean_log_normalized_by_hand():
    counts = np.array([[1.0, 3.0], [0.0, 2.0]])
    got = S.mean_log_normalized(counts, np.array([4.0, 8.0]))
    expected = [(math.log1p(2500) + 0.0) / 2, (math.log1p(7500) + math.log1p(2500)) / 2]
    np.testing.assert_allclose(got, expected)
    # a leading samples dimension is averaged too
    np.testing.assert_allclose(S.mean_log_normalized(np.stack([counts, counts]), np.array([4.0, 8.0])), expected)


def _tiny_vae(n_genes: int = 2):
    from modeling import ExpressForVAE, ExpressVAEConfig

    torch.manual_seed(0)
    config = ExpressVAEConfig(encoder="mlp", gene_panel=[f"G{i}" for i in range(n_genes)], n_latent=3,
                              mlp_hidden_size=8, decoder_hidden_size=4)
    return ExpressForVAE(config).eval()


def test_decoding_reads_the_decoders_mean_and_samples_around_it():
    vae = _tiny_vae()
    with torch.no_grad():  # softmax(f(z)) = (1/4, 3/4) whatever z is
        vae.vae.decoder.mean.weight.zero_()
        vae.vae.decoder.mean.bias.copy_(torch.log(torch.tensor([1.0, 3.0])))
        vae.vae.decoder.log_theta.fill_(12.0)  # theta ~ 1.6e5: counts are nearly Poisson
    z = np.random.default_rng(0).normal(size=(2, 3))
    # decoder genes hold 4 of the cell's 8 counts: means (1, 3), normalised by the whole library of 8
    mean = S.decode_log_normalized(vae, z, np.array([4.0, 4.0]), np.array([8.0, 8.0]), mode="mean")
    np.testing.assert_allclose(mean, [math.log1p(1 / 8 * 1e4), math.log1p(3 / 8 * 1e4)], rtol=1e-6)
    sampled = S.decode_log_normalized(vae, z, np.array([4.0, 4.0]), np.array([8.0, 8.0]), n_samples=20000, seed=1)
    # E log1p(1250 X) for X ~ Poisson(1): sum_k e^-1 / k! log1p(1250 k)
    expected = sum(math.exp(-1) / math.factorial(k) * math.log1p(1250 * k) for k in range(30))
    assert sampled[0] == pytest.approx(expected, rel=0.01)
    assert sampled[0] < mean[0]  # zeros pull the mean of the log below the log of the mean
    again = S.decode_log_normalized(vae, z, np.array([4.0, 4.0]), np.array([8.0, 8.0]), n_samples=20000, seed=1)
    np.testing.assert_array_equal(sampled, again)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic ctrl / stim cells
# ---------------------------------------------------------------------------------------------------------------------
N_GENES = 60
TYPES = ("A", "B", "C")
IFN = list(range(50, 56))  # the shared "interferon" genes: x6 in every stimulated cell


def synthetic(n_ctrl: int = 30, n_stim: int = 20, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Three types with their own marker genes (0-9, 10-19, 20-29); stimulation multiplies genes 50-55 by 6 in
    every type (type C also loses half of its markers' expression). Stimulated cells are 'unlabelled'; the second
    value holds their true types."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for condition, n in (("ctrl", n_ctrl), ("stim", n_stim)):
        for k, t in enumerate(TYPES):
            rate = np.full(N_GENES, 1.0)
            rate[10 * k:10 * k + 10] = 12.0
            if condition == "stim":
                rate[IFN] *= 6.0
                if t == "C":
                    rate[20:30] *= 0.5
            rows.append(rng.poisson(rate * rng.uniform(0.7, 1.3, (n, 1))))
            obs += [{"cell_type": t if condition == "ctrl" else "unlabelled", "condition": condition, "truth": t}] * n
    obs = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    adata = ad.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    adata.var["gene_symbol"] = adata.var_names
    return adata, obs["truth"].to_numpy()


def test_labelling_leaves_out_the_shared_response_and_finds_the_types():
    adata, truth = synthetic()
    assignment = S.assign_cell_types(adata, exclude_shifted=6, folds=3)
    stim = adata.obs["condition"].to_numpy() == "stim"
    assert (assignment.labels[stim] == truth[stim]).all()
    assert (assignment.labels[~stim] == truth[~stim]).all()  # the control cells keep their labels
    report = assignment.report
    assert report["n_genes"] == N_GENES - 6  # the six interferon genes shift most and are left out
    assert report["cv_accuracy"] == 1.0 and report["cv_macro_f1"] == 1.0
    assert report["proportions"]["A"] == {"control": 1 / 3, "stimulated": 1 / 3, "n_control": 30, "n_stimulated": 20}
    assert report["total_variation"] == pytest.approx(0.0)


def test_a_fold_holds_out_the_types_stimulated_cells_and_the_additive_shift_is_by_hand():
    adata, truth = synthetic()
    adata.obs["cell_type"] = np.where(adata.obs["condition"] == "ctrl", truth, "unlabelled")
    cells = S.prepare(adata, S.Assignment(truth.astype(str), {}))
    assert S.eligible_types(cells, 20) == ["A", "B", "C"] and S.eligible_types(cells, 21) == []
    fold = S.make_fold(cells, "A", n_top_genes=2000)
    held = (truth == "A") & (adata.obs["condition"] == "stim").to_numpy()
    assert set(fold.train.obs_names) == set(adata.obs_names[~held])
    assert set(fold.stimulated.obs_names) == set(adata.obs_names[held]) and fold.control.n_obs == 30
    assert fold.genes == list(adata.var_names)  # 60 genes < 2000: every gene
    counts = adata.X.toarray()
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(fold.stim_mean, lognorm[held].mean(0), rtol=1e-5)
    ctrl = adata.obs["condition"].to_numpy() == "ctrl"
    np.testing.assert_allclose(fold.control_mean, lognorm[ctrl & (truth == "A")].mean(0), rtol=1e-5)
    assert set(fold.top[:6].tolist()) == set(IFN)  # the shared response dominates A's change
    # additive: A's control mean + the mean of B's and C's stimulated - control differences
    shifts = [lognorm[~ctrl & (truth == t)].mean(0) - lognorm[ctrl & (truth == t)].mean(0) for t in ("B", "C")]
    np.testing.assert_allclose(S.predict_additive_shift(fold), fold.control_mean + np.mean(shifts, axis=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(S.predict_no_change(fold), fold.control_mean)


def test_latent_arithmetic_adds_the_balanced_latent_shift(monkeypatch):
    """The decoded latents are the held-out control cells' posterior means plus the balanced shift of the
    training types' posterior means."""
    from finetune import api

    adata, truth = synthetic()
    cells = S.prepare(adata, S.Assignment(truth.astype(str), {}))
    fold = S.make_fold(cells, "A")
    vae = S.train_fold_vae(fold, S.VAEArm("mlp", epochs=1), seed=0)
    assert list(vae.config.gene_panel) == fold.genes and vae.config.prior == "normal"
    calls = []

    def record(vae_, z, panel, library, *, mode, **kwargs):
        calls.append({"z": z, "panel": panel, "library": library, "mode": mode})
        return np.zeros(len(fold.genes)) if mode == "sample" else np.full(len(fold.genes), 0.5)

    monkeypatch.setattr(S, "decode_log_normalized", record)
    predictions, info = S.latent_arithmetic(fold, vae, min_cells=10)
    z_train = api.outputs(fold.train, vae)["embedding"]
    types, stim = fold.train.obs[S.TYPE_KEY].to_numpy(), fold.train.obs["stimulated"].to_numpy()
    shift = np.mean([z_train[(types == t) & stim].mean(0) - z_train[(types == t) & ~stim].mean(0)
                     for t in ("B", "C")], axis=0)
    first = calls[0]  # the held-out type's control cells come first
    np.testing.assert_allclose(first["z"], api.outputs(fold.control, vae)["embedding"] + shift, rtol=1e-5, atol=1e-6)
    library = np.asarray(fold.control.X.sum(1)).ravel()
    np.testing.assert_allclose(first["library"], library)
    np.testing.assert_allclose(first["panel"], library)  # every gene is decoded here
    assert set(predictions) == {"sample", "mean"} and info["shift_types"] == ["B", "C"]
    # validation on the training types: B predicted with C's shift alone, then C with B's
    b_control = (types == "B") & ~stim
    c_shift = z_train[(types == "C") & stim].mean(0) - z_train[(types == "C") & ~stim].mean(0)
    np.testing.assert_allclose(calls[2]["z"], z_train[b_control] + c_shift, rtol=1e-5, atol=1e-6)
    assert [c["mode"] for c in calls] == ["sample", "mean"] * 3
    scores = info["validation_r2_top100"]
    assert info["chosen"] == max(scores, key=scores.get)


def test_the_transformer_arm_starts_from_a_pretrained_model(tmp_path):
    import dataclasses

    from test_embed import save_express_model

    from tokenizer import InputError

    adata, truth = synthetic()
    model_dir = save_express_model(tmp_path / "model", adata[adata.obs["condition"] == "ctrl"].copy(), top_k=16)
    cells = S.prepare(adata, S.Assignment(truth.astype(str), {}))
    fold = S.make_fold(cells, "A")
    assert fold.gene_ids("gene_symbol") == fold.genes  # the synthetic ids are the names
    cells.var["other_id"] = [f"ID{j % 50}" for j in range(N_GENES)]  # not one id per gene
    with pytest.raises(InputError, match="own id"):
        S.make_fold(cells, "A").gene_ids("other_id")
    settings = dataclasses.replace(S.QUICK, arms=("express_vae_transformer",))
    result = S.run_fold(cells, "A", 0, settings, pretrained=str(model_dir), gene_id_key="gene_symbol")
    assert set(result) == {"express_vae_transformer", "_fold"}
    assert np.isfinite(result["express_vae_transformer"]["r2_all"])
    vae = S.train_fold_vae(fold, S.VAEArm("transformer", 1, model=str(model_dir), gene_id_key="gene_symbol"), seed=0)
    assert vae.pretrained_encoder and vae.config.hidden_size == 32  # the saved model's encoder, not a new one


def test_summary_mean_and_sd_over_seeds():
    folds = {"A": {0: {"x": {"m": 1.0}, "_fold": {}}, 1: {"x": {"m": 3.0}, "_fold": {}}},
             "B": {0: {"x": {"m": 5.0}}, 1: {"x": {"m": 5.0}}}}
    summary = S.summarize(folds)
    assert summary["A"]["x"]["m"] == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2.0)), "n": 2}
    # mean over types per seed: (1 + 5) / 2 = 3 and (3 + 5) / 2 = 4 -> mean 3.5, sd sqrt(0.5)
    assert summary["mean over types"]["x"]["m"] == {"mean": 3.5, "sd": pytest.approx(math.sqrt(0.5)), "n": 2}
    table = S.format_tables(summary, metrics=("m",), arms=("x",))
    assert "| A | 2.000 ± 1.414 |" in table and "| mean over types | 3.500 ± 0.707 |" in table


def test_suite_task_on_synthetic_cells(tmp_path):
    from finetune.benchmark import suite
    from finetune.benchmark.splits import DATASETS

    task = suite._TASKS["stimulation"]
    assert not task.needs_models and task.primary == "r2_top100"
    adata, _ = synthetic()
    path = tmp_path / "kang_stim.h5ad"
    adata.write_h5ad(path)
    bench = SimpleNamespace(budget=SimpleNamespace(name="quick"), datasets=DATASETS,
                            corpus=SimpleNamespace(files={"kang_stim": path}))
    assert task.datasets(bench) == ["kang_stim"]
    out = task.fn(bench, "kang_stim", 0)
    assert set(out) == {"held out: A", "mean over types", "labelling"}  # QUICK: one held-out type, the largest
    arms = out["held out: A"]
    assert set(arms) == set(S.ARMS)
    for metrics in arms.values():
        assert set(S.METRICS) <= set(metrics) and metrics["seconds"] > 0
    # the shared x6 response is learnt from B and C and transfers to A (C's own marker loss and the Poisson noise of
    # 54 unchanged genes keep the correlation of the changes below 1)
    assert arms["additive_shift"]["pearson_delta"] > 0.7
    assert arms["additive_shift"]["r2_top100"] > arms["no_change"]["r2_top100"]
    assert math.isnan(arms["no_change"]["pearson_delta"])
    assert out["labelling"]["l1_logistic_regression"]["cv_accuracy"] == 1.0
    json.dumps(out)  # the suite writes it as JSON


def test_an_interrupted_run_resumes_from_its_finished_folds(tmp_path, monkeypatch):
    import dataclasses

    adata, _ = synthetic()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    settings = dataclasses.replace(S.QUICK, arms=("no_change", "additive_shift"), max_types=2)
    cache = tmp_path / "cache"
    first = S.run(path, seeds=[0], settings=settings, cache=cache)
    assert first["types"] == ["A", "B"] and len(list(cache.glob("*.json"))) == 2
    calls = []

    def counted(cells, held_out, seed, settings_, **kwargs):
        calls.append((held_out, seed))
        return {"no_change": {"r2_all": 0.0}}

    monkeypatch.setattr(S, "run_fold", counted)
    again = S.run(path, seeds=[0], settings=settings, cache=cache)
    assert calls == [] and again["seconds"]["folds_reused"] == 2
    assert json.dumps(again["folds"], sort_keys=True) == json.dumps(first["folds"], sort_keys=True)  # NaN == NaN
    S.run(path, seeds=[0, 1], settings=settings, cache=cache)  # a new seed: only its folds run
    assert calls == [("A", 1), ("B", 1)]
    S.run(path, seeds=[0], settings=dataclasses.replace(settings, n_response_genes=10), cache=cache)
    assert calls[2:] == [("A", 0), ("B", 0)]  # other settings: nothing is reused


# ---------------------------------------------------------------------------------------------------------------------
# The real data, one minute
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.shared_data
def test_quick_run_on_kang(tmp_path, capsys):
    data = shared_path(S.DATA_FILE)
    out = tmp_path / "stim"
    code = S.cli(["--out", str(out), "--quick", "--seeds", "0", "--data", str(data)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "table.md", "stimulation.png", "manifest.json"}
    results = json.loads((out / "results.json").read_text())
    (held_out,) = results["types"]
    assert held_out == "CD4 T cells"  # the largest type
    label = results["labelling"]
    assert label["n_control_labelled"] == 954 and label["n_stimulated"] == 1000 and label["cv_accuracy"] > 0.85
    fold = results["folds"][held_out]["0"]
    assert set(fold) == set(S.ARMS) | {"_fold"}
    # no change scored by hand from the same cells: the held-out type's control mean against its stimulated mean
    adata = ad.read_h5ad(data)
    assignment = S.assign_cell_types(adata, exclude_shifted=S.QUICK.exclude_shifted, folds=S.QUICK.classifier_folds,
                                     n_top_genes=S.QUICK.n_top_genes)
    cells = S.prepare(adata, assignment)
    direct = S.make_fold(cells, held_out, n_top_genes=S.QUICK.n_top_genes)
    by_hand = S.response_metrics(direct.control_mean, direct.control_mean, direct.stim_mean, direct.top)
    assert fold["no_change"]["r2_all"] == pytest.approx(by_hand["r2_all"], rel=1e-6)
    assert fold["_fold"]["n_stimulated"] == direct.stimulated.n_obs
    interferon = {"ISG15", "IFI6", "IFIT1", "IFIT3", "IFITM3", "ISG20", "CXCL10", "MX1", "LY6E"}
    assert interferon & set(fold["_fold"]["top_response_genes"][:3])  # the interferon response leads
    assert "r2_top100" in capsys.readouterr().out
    assert S.cli(["--out", str(out), "--quick", "--seeds", "0", "--data", str(data)]) == 2  # exists
