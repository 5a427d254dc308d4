"""``express-perturb``: the perturbations of a cell's tokens, the cosine shifts they cause (checked against the model
run by hand), the permutation statistics (against a hand computation), determinism, the Geneformer path, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_embed import (
    save_express_model,
    save_geneformer_model,
    toy_adata,
    write_geneformer_dicts,
)

from finetune.embed import cell_rows, load_encoder
from finetune.perturb import (
    OVEREXPRESS_FACTOR,
    cli,
    cosine_shifts,
    null_candidates,
    permutation_p_value,
    perturb_cells,
    perturb_tokens,
    perturbation_statistics,
)
from tokenizer import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, EOS = 2, 3
# <cls>, five ranked genes (values descending), two sampled zeros
IDS = np.array([CLS, 10, 11, 12, 13, 14, 20, 21])
VALUES = np.array([0, 5.0, 4.0, 3.0, 2.0, 1.0, 0, 0], dtype=np.float32)
ZERO = np.array([0, 0, 0, 0, 0, 0, 1, 1])


def _perturb(token, mode, ids=IDS, values=VALUES, zero=ZERO, quantile=0.25):
    return perturb_tokens(ids, values, zero, token, mode, n_special=4, quantile=quantile)


def test_delete_removes_the_gene_whether_detected_or_a_sampled_zero():
    ids, values, zero = _perturb(12, "delete")
    assert 12 not in ids and ids.tolist() == [CLS, 10, 11, 13, 14, 20, 21]
    assert values.tolist() == [0, 5, 4, 2, 1, 0, 0] and zero.tolist() == [0, 0, 0, 0, 0, 1, 1]
    ids, _, zero = _perturb(20, "delete")
    assert ids.tolist() == [CLS, 10, 11, 12, 13, 14, 21] and zero.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert _perturb(99, "delete") is None and _perturb(CLS, "delete") is None


def test_overexpress_moves_the_gene_first_above_the_maximum():
    ids, values, zero = _perturb(13, "overexpress")
    assert ids.tolist() == [CLS, 13, 10, 11, 12, 14, 20, 21]
    assert values[1] == OVEREXPRESS_FACTOR * 5.0 > values[2:].max() and values[2:6].tolist() == [5, 4, 3, 1]
    ids, values, zero = _perturb(21, "overexpress")  # a sampled zero becomes the top detected gene
    assert ids.tolist() == [CLS, 21, 10, 11, 12, 13, 14, 20]
    assert zero.tolist() == [0, 0, 0, 0, 0, 0, 0, 1] and values[1] == 10.0
    assert _perturb(10, "overexpress") is None  # already first


def test_inhibit_and_activate_shift_the_rank_by_a_quantile():
    # 5 ranked genes: quantile 0.25 -> round(1.25) = 1 position; 0.5 -> round(2.5) = 3 (half up)
    ids, values, _ = _perturb(11, "inhibit")
    assert ids.tolist() == [CLS, 10, 12, 11, 13, 14, 20, 21] and values[3] == pytest.approx((3 + 2) / 2)
    ids, values, _ = _perturb(13, "activate", quantile=0.5)
    assert ids.tolist() == [CLS, 13, 10, 11, 12, 14, 20, 21] and values[1] == 5.0  # a neighbour's value at the top
    ids, values, _ = _perturb(13, "inhibit", quantile=0.5)
    assert ids.tolist() == [CLS, 10, 11, 12, 14, 13, 20, 21] and values[5] == 1.0
    assert _perturb(14, "inhibit") is None and _perturb(10, "activate") is None  # cannot move further
    assert _perturb(20, "inhibit") is None  # a sampled zero has no rank
    # Geneformer V2: <cls> ranked... <eos>, no zeros; <eos> stays last
    gf = np.array([CLS, 10, 11, 12, 13, 14, 15, 16, 17, EOS])
    ids, _, _ = perturb_tokens(gf, np.zeros(10), np.zeros(10), 16, "activate", n_special=4)
    assert ids.tolist() == [CLS, 10, 11, 12, 13, 16, 14, 15, 17, EOS]  # 8 ranked: 2 positions up


def test_null_candidates_are_nearby_ranks_of_the_same_cell():
    assert null_candidates(IDS, ZERO, 12, "delete", n_special=4, window=1).tolist() == [11, 13]
    assert null_candidates(IDS, ZERO, 12, "delete", n_special=4, window=5, exclude=[10]).tolist() == [11, 13, 14]
    assert null_candidates(IDS, ZERO, 20, "delete", n_special=4, window=1).tolist() == [21]  # zeros for a zero
    assert null_candidates(IDS, ZERO, 11, "overexpress", n_special=4, window=1).tolist() == [12]  # 10 is first
    assert null_candidates(IDS, ZERO, 13, "inhibit", n_special=4, window=1).tolist() == [12]  # 14 is last


def test_permutation_statistics_match_a_hand_computation():
    shifts = pd.DataFrame({"perturbation": ["A", "A", "B", "C"], "cell_id": ["c1", "c2", "c1", "c1"],
                           "cosine_shift": [0.5, 0.4, 0.05, 0.3]})
    null = pd.DataFrame({"perturbation": ["A", "A", "A", "A", "B", "B"], "cell_id": ["c1", "c1", "c2", "c2", "c1",
                                                                                    "c1"],
                         "cosine_shift": [0.1, 0.2, 0.1, 0.6, 0.1, 0.2]})
    stats = perturbation_statistics(shifts, null, perturbations=["A", "B", "C", "D"]).set_index("perturbation")
    # A: strata {0.5, 0.1, 0.2} x {0.4, 0.1, 0.6}; observed sum 0.9; of the 9 sums, those >= 0.9:
    # 0.5 + 0.4 (the observed one) and 0.5 + 0.6 -> 2 / 9 (0.2 + 0.6 = 0.8 falls short)
    assert stats.loc["A", "n_cells"] == 2 and stats.loc["A", "mean_shift"] == pytest.approx(0.45)
    assert stats.loc["A", "p_value"] == pytest.approx(2 / 9)
    assert stats.loc["A", "null_mean_shift"] == pytest.approx(0.25)
    assert stats.loc["B", "p_value"] == pytest.approx(1.0)  # {0.05, 0.1, 0.2}: all three >= 0.05
    assert np.isnan(stats.loc["C", "p_value"]) and np.isnan(stats.loc["C", "fdr"])  # no null genes
    assert stats.loc["D", "n_cells"] == 0 and np.isnan(stats.loc["D", "mean_shift"])  # changed no cell
    # Benjamini-Hochberg over A and B: sorted p (2/9, 1) -> (2/9 * 2/1, 1 * 2/2)
    assert stats.loc["A", "fdr"] == pytest.approx(4 / 9) and stats.loc["B", "fdr"] == pytest.approx(1.0)
    assert list(stats.index) == ["A", "C", "B", "D"]  # largest mean shift first
    # Monte Carlo when the combinations are many: close to the exact value, and seeded
    rng = np.random.default_rng(0)
    strata = [np.concatenate([[o], rng.uniform(0, 1, 4)]) for o in rng.uniform(0.3, 1, 8)]  # 5^8 combinations
    observed = np.array([s[0] for s in strata])
    exact = permutation_p_value(observed, strata, rng=rng, exact_limit=10**6)
    approx = permutation_p_value(observed, strata, rng=np.random.default_rng(1), exact_limit=100)
    assert approx == permutation_p_value(observed, strata, rng=np.random.default_rng(1), exact_limit=100)
    assert abs(approx - exact) < 0.02


@pytest.fixture(scope="module")
def express_dir(tmp_path_factory):
    return save_express_model(tmp_path_factory.mktemp("express_model"), toy_adata(), pooling="mean", top_k=12,
                              n_zeros=4)


def _gene_in_some_cells(rows, encoder):
    """A gene detected in several but not all cells (so some cells are left unchanged)."""
    counts = pd.Series([t for r in rows for t, z in zip(r["input_ids"], r["is_zero"]) if t >= 4 and not z])
    counts = counts.value_counts()
    token = int(counts[(counts > 3) & (counts < len(rows) - 3)].index[0])
    return token, encoder.vocab.id_to_token(token)


def test_shifts_are_the_models_own_and_unchanged_cells_shift_zero(express_dir):
    adata = toy_adata(20)
    encoder = load_encoder(express_dir, device="cpu")
    rows = cell_rows(encoder.tokenize(adata))
    token, gene = _gene_in_some_cells(rows, encoder)
    result = perturb_cells(adata, encoder, genes=[gene], mode="delete", n_null=3, progress=False)
    holding = [i for i, r in enumerate(rows) if token in r["input_ids"]]
    assert sorted(result.shifts["cell_id"]) == sorted(adata.obs_names[holding])  # only the changed cells
    # by hand: the cell without the gene's token, through the same encoder
    deleted = [dict(zip(("input_ids", "values", "is_zero"), _drop(rows[i], token))) for i in holding]
    by_hand = cosine_shifts(encoder, [rows[i] for i in holding], deleted)
    got = result.shifts.set_index("cell_id").loc[adata.obs_names[holding], "cosine_shift"].to_numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-4, atol=1e-7)
    assert (got > 1e-6).all()
    # an unperturbed input does not move
    assert np.abs(cosine_shifts(encoder, rows[:5], [dict(r) for r in rows[:5]])).max() < 1e-6
    # every cell's nulls: other genes of the same cell
    null = result.null_shifts
    assert set(null["cell_id"]) <= set(result.shifts["cell_id"]) and (null["null_gene"] != gene).all()
    assert null.groupby("cell_id").size().max() <= 3
    stats = result.stats.iloc[0]
    assert stats["perturbation"] == gene and stats["n_cells"] == len(holding)
    assert stats["mean_shift"] == pytest.approx(got.mean()) and 0 < stats["p_value"] <= 1


def _drop(row, token):
    keep = row["input_ids"] != token
    return row["input_ids"][keep], row["values"][keep], row["is_zero"][keep]


def test_overexpression_scan_is_deterministic_under_a_seed(express_dir):
    adata = toy_adata(12)
    kwargs = {"scan": True, "mode": "overexpress", "n_null": 4, "max_cells": 5, "progress": False, "gene_shifts": True}
    first = perturb_cells(adata, express_dir, seed=3, device="cpu", **kwargs)
    again = perturb_cells(adata, express_dir, seed=3, device="cpu", batch_size=7, **kwargs)
    pd.testing.assert_frame_equal(first.stats, again.stats, rtol=1e-5)
    pd.testing.assert_frame_equal(first.null_shifts, again.null_shifts, rtol=1e-5)
    assert first.shifts["cell_id"].nunique() == 5
    encoder = load_encoder(express_dir, device="cpu")
    rows = {c: r for c, r in zip(encoder.tokenize(adata).dataset["cell_id"], cell_rows(encoder.tokenize(adata)))}
    ranked = sum(int(((r["input_ids"] >= 4) & (r["is_zero"] == 0)).sum()) - 1 for c, r in rows.items()
                 if c in set(first.shifts["cell_id"]))
    assert len(first.shifts) == ranked  # every ranked gene of each cell but the first (already first)
    # scan nulls are other scanned genes of the same cells: every null shift is also an observed shift
    observed = set(zip(first.shifts["cell_id"], first.shifts["perturbation"]))
    assert set(zip(first.null_shifts["cell_id"], first.null_shifts["null_gene"])) <= observed
    assert {"perturbation", "gene", "n_cells", "mean_shift"} <= set(first.gene_shifts.columns)
    assert (first.gene_shifts["gene"] != first.gene_shifts["perturbation"]).all()
    other = perturb_cells(adata, express_dir, seed=4, device="cpu", **kwargs)
    assert not other.null_shifts.equals(first.null_shifts)  # another seed, other cells and null genes


def test_geneformer_perturbation_is_a_plain_bert_forward(tmp_path):
    from transformers import BertForMaskedLM

    dicts = write_geneformer_dicts(tmp_path / "dicts")
    model_dir = save_geneformer_model(tmp_path / "model", dicts)
    adata = toy_adata(16)
    encoder = load_encoder(model_dir, geneformer_dicts=dicts, device="cpu")
    rows = cell_rows(encoder.tokenize(adata))
    token, gene = _gene_in_some_cells(rows, encoder)
    symbol = encoder.vocab.gene_symbols[token - 4]  # genes may be given by symbol
    result = perturb_cells(adata, encoder, genes=[symbol], mode="inhibit", n_null=2, progress=False)
    reference = BertForMaskedLM.from_pretrained(model_dir).eval()

    def embed(ids):  # Geneformer's default: mean of the second-to-last layer over the genes between <cls>, <eos>
        with torch.no_grad():
            hidden = reference(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        return hidden[-2][0, 1:-1].mean(0)

    assert result.stats["perturbation"].tolist() == [gene]
    checked = 0
    for cell_id, row in zip(encoder.tokenize(adata).dataset["cell_id"], rows):
        ids = row["input_ids"].tolist()
        if token not in ids:
            continue
        n = len(ids) - 2
        k = ids.index(token) - 1
        moved = [t for t in ids[1:-1] if t != token]
        moved.insert(min(k + max(1, int(np.floor(0.25 * n + 0.5))), n - 1), token)
        if moved == ids[1:-1]:
            assert cell_id not in set(result.shifts["cell_id"])
            continue
        a, b = embed(ids).double(), embed([CLS, *moved, EOS]).double()
        expected = 1 - torch.nn.functional.cosine_similarity(a, b, dim=0)
        got = result.shifts.set_index("cell_id").loc[cell_id, "cosine_shift"]
        assert got == pytest.approx(float(expected), rel=1e-3, abs=1e-8)
        checked += 1
    assert checked >= 3


def test_cli_writes_the_results_folder_atomically(express_dir, tmp_path, capsys):
    adata = toy_adata(16)
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "results"
    args = [str(express_dir), str(source), "--genes", "G1,SYM2", "--mode", "delete", "--out", str(out),
            "--n_null", "3", "--device", "cpu", "--no_progress"]
    assert cli(args) == 0
    assert {"shifts.parquet", "stats.csv", "null_shifts.parquet", "top_shifts.png", "manifest.json"} <= \
        {p.name for p in out.iterdir()}
    stats = pd.read_csv(out / "stats.csv")
    assert list(stats.columns[:5]) == ["perturbation", "n_cells", "mean_shift", "p_value", "fdr"]
    assert sorted(stats["perturbation"]) == ["G1", "G2"]  # SYM2 is G2's symbol
    shifts = pd.read_parquet(out / "shifts.parquet")
    assert list(shifts.columns) == ["cell_id", "perturbation", "cosine_shift"]
    assert shifts.groupby("perturbation").size().to_dict() == stats.set_index("perturbation")["n_cells"].to_dict()
    assert json.loads((out / "manifest.json").read_text())["mode"] == "delete"
    before = (out / "stats.csv").read_bytes()
    capsys.readouterr()
    for argv, message in [
        (args, "already exists"),  # a non-empty results folder without --overwrite
        ([*args[:3], "NOTAGENE", *args[4:], "--overwrite"], "'NOTAGENE'"),
        ([*args, "--scan"], "either --genes"),
        ([str(express_dir), str(source), "--genes", "G1", "--out", str(tmp_path / "x")], "--mode"),
        ([str(express_dir), str(tmp_path / "nope.h5ad"), "--genes", "G1", "--mode", "delete", "--out",
          str(tmp_path / "x")], "nope.h5ad"),
    ]:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("express-perturb: error:") and message in err[-1], err
    assert (out / "stats.csv").read_bytes() == before and not (tmp_path / "x").exists()
    assert cli([*args, "--mode", "activate", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["mode"] == "activate"
    (tmp_path / "empty").mkdir()  # an existing empty folder is taken
    assert cli([*args[:7], str(tmp_path / "empty"), *args[8:], "--no_plots"]) == 0
    assert (tmp_path / "empty" / "stats.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "empty", "results"]


def test_api_rejects_bad_requests(express_dir):
    adata = toy_adata(8)
    with pytest.raises(InputError, match="not both or neither"):
        perturb_cells(adata, express_dir, mode="delete", device="cpu")
    with pytest.raises(InputError, match="mode must be"):
        perturb_cells(adata, express_dir, genes="G1", mode="knockout", device="cpu")
    with pytest.raises(InputError, match="quantile"):
        perturb_cells(adata, express_dir, genes="G1", mode="inhibit", quantile=0.0, device="cpu")


def test_console_scripts_and_the_script_form(tmp_path):
    """`express-embed` / `express-perturb` are installed; --help exits 0, a bad flag 2 with one line."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO_ROOT

    embed = [str(Path(sys.executable).with_name("express-embed")), "--help"]
    done = subprocess.run(embed, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--gene_embeddings" in done.stdout, done.stderr[-2000:]
    perturb = [sys.executable, str(REPO_ROOT / "finetune" / "perturb.py"), "m", "x.h5ad", "--mode", "zap"]
    done = subprocess.run(perturb, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("express-perturb: error:")
    assert "Traceback" not in done.stderr
