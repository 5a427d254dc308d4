"""The fine-tuning benchmark runs on the real CITE-seq split and honours --arms (cheap arms only here; the numbers
in the README come from running it by hand)."""

from __future__ import annotations

import json

from conftest import load_script

bench_finetune = load_script("bench_finetune")


def test_bench_finetune_selected_arms_on_cite(shared, tmp_path):
    data = shared("bmmc_cite_600.h5ad").parent
    out = tmp_path / "bench"
    report = bench_finetune.main(["--datasets", "cite", "--seeds", "0", "--arms", "l1_logistic_regression",
                                  "knn_svd", "express_mlp_encoder", "--mlp_kwargs", '{"epochs": 4, "lr": 0.0}',
                                  "--data_dir", str(data), "--out", str(out)])
    cell = report["results"]["cite/cell-type"]
    adt = report["results"]["cite/adt"]
    # only the requested arms plus the trivial reference
    assert set(cell["per_seed"][0]) == {"majority", "l1_logistic_regression", "express_mlp_encoder"}
    assert set(adt["per_seed"][0]) == {"mean_protein", "knn_svd", "express_mlp_encoder"}
    # --mlp_kwargs reaches the cell-type MLP arm: with a learning rate of 0 its weights never move, so it stays far
    # below logistic regression
    assert cell["summary"]["express_mlp_encoder"]["macro_f1"]["mean"] < \
        cell["summary"]["l1_logistic_regression"]["macro_f1"]["mean"] - 0.1
    assert cell["split"]["test"] == ["s1d2"] and cell["split"]["n_train"] + cell["split"]["n_test"] == 600
    # both beat the trivial reference on the held-out donor
    assert cell["summary"]["l1_logistic_regression"]["macro_f1"]["mean"] > \
        cell["summary"]["majority"]["macro_f1"]["mean"] + 0.1
    assert adt["summary"]["knn_svd"]["pearson_per_protein"]["mean"] > 0.5
    assert adt["summary"]["mean_protein"]["pearson_per_protein"]["mean"] == 0.0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["args"]["arms"] == ["l1_logistic_regression", "knn_svd", "express_mlp_encoder"]
    assert saved["args"]["mlp_kwargs"] == {"epochs": 4, "lr": 0.0}
    assert "| l1_logistic_regression |" in out.with_suffix(".md").read_text()


def test_transformer_arms_differ_only_in_their_starting_weights(tmp_path):
    """With a pretrained model, the arm without pretraining takes its architecture, and both arms get the same
    learning rate for encoder and head and the same tokenization; without one, the budget's architecture is used."""
    from modeling import ExpressConfig

    ExpressConfig(vocab_size=40, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
                  classifier_pooling="mean").save_pretrained(tmp_path)
    budget = bench_finetune.BUDGETS["small"]
    scratch, warm = bench_finetune.transformer_arms(budget, str(tmp_path), 2e-3, {"batch_size": 16})
    assert {k: scratch["transformer"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "classifier_pooling")} == \
        {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96,
         "classifier_pooling": "mean"}
    assert scratch["tokenization"] == warm["tokenization"] == budget["tokenization"]
    assert warm["model"] == str(tmp_path) and warm["encoder_lr"] == 2e-3 and warm["batch_size"] == 16
    assert warm["gene_id_key"] == "gene_symbol" and "model" not in scratch
    scratch, _ = bench_finetune.transformer_arms(budget, None, 2e-3, None)
    assert scratch["transformer"] == budget["transformer"]
