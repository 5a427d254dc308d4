"""The benchmark suite's parts on small inputs with known answers: the declared ablations exist as library settings,
the held-out cells never reach pretraining, label subsets, summaries and verdicts, and the README block."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pandas as pd
import pytest

from finetune.benchmark import ablations, pretraining, report
from finetune.benchmark.common import label_subset, stratified_subsample
from finetune.benchmark.integration import batch_keys
from finetune.benchmark.splits import DATASETS, held_out_mask, parse_extra
from finetune.benchmark.suite import BUDGETS, Bench


def test_every_pretraining_variant_is_a_pretrain_args_override_of_the_defaults(tmp_path):
    """Each variant sets existing PretrainArgs fields (model_config: existing ExpressConfig fields) to a value other
    than the default, and builds valid arguments with the step budget as the only other change."""
    from modeling import ExpressConfig
    from pretrain.run import PretrainArgs

    fields = {f.name for f in dataclasses.fields(PretrainArgs)}
    config_fields = set(inspect.signature(ExpressConfig.__init__).parameters)
    defaults = PretrainArgs()
    corpus = type("Corpus", (), {"pretraining": [tmp_path / "tokens"]})()
    bench = Bench(out=tmp_path, budget=BUDGETS["full"], datasets=dict(DATASETS), data_dir=tmp_path, seeds=[0],
                  selected=["ablations"], corpus=corpus)
    for variant, change in pretraining.VARIANTS.items():
        assert set(change) <= fields, variant
        if "model_config" in change:
            assert set(change["model_config"]) <= config_fields, variant
        args = pretraining.pretrain_args(bench, variant, seed=3)
        assert args.max_steps == BUDGETS["full"].ablation_steps and args.seed == 3
        changed = {f for f in fields if getattr(args, f) != getattr(defaults, f)}
        budget_and_data = {"dataset", "seed", "output_dir", "overwrite_output_dir", "report_to", "progress_bar",
                           "max_steps", "eval_steps", "save_steps", "save_total_limit"}
        assert changed - budget_and_data == (set() if pretraining.is_default(variant) else set(change)), variant
    default = pretraining.pretrain_args(bench, "default", seed=0)
    assert default.max_steps == BUDGETS["full"].pretrain_steps
    assert default.objectives == defaults.objectives and default.n_zeros == defaults.n_zeros
    # the ablations are compared with the default recipe trained on their own budget
    assert pretraining.ablation_reference(bench) == pretraining.ABLATION_REFERENCE
    assert pretraining.variants(bench)[:2] == ["default", pretraining.ABLATION_REFERENCE]
    # one objective set equal to the default's is recognised as the default, whatever its order
    assert pretraining.is_default("objective_mlm_mcv") == (sorted(defaults.objective_list) == ["mcv", "mlm"])


def test_every_vae_variant_sets_existing_head_fields():
    from modeling import ExpressVAEConfig

    config_fields = set(inspect.signature(ExpressVAEConfig.__init__).parameters)
    for name, change in ablations.VAE_VARIANTS.items():
        assert set(change.get("head", {})) <= config_fields, name
    # each axis has one value equal to the default (that arm is the default itself) and one other
    pairs = [("elbo_k1", "iwae_k8_dreg"), ("prior_normal", "prior_mixture"),
             ("covariance_diagonal", "covariance_full")]
    for a, b in pairs:
        assert ablations.vae_variant_is_default(a) != ablations.vae_variant_is_default(b), (a, b)


def test_finetune_test_cells_are_masked_by_value_in_any_file_with_the_column():
    # Kang's test donors are 1244 and 1256; a control file sharing the donor column loses the same donors
    obs = pd.DataFrame({"donor": ["1015", "1244", "1256", "101", "1244"], "cell_type": list("abcde")})
    np.testing.assert_array_equal(held_out_mask(obs), [False, True, True, False, True])
    # CellBench and CITE-seq splits use a batch column; integers stored as numbers still match
    obs = pd.DataFrame({"batch": ["sc_dropseq", "sc_10x", "s1d2", "s1d1", "sc_celseq2_5cl_p3"]})
    np.testing.assert_array_equal(held_out_mask(obs), [True, False, True, False, True])
    obs = pd.DataFrame({"donor": [1244, 1016]})
    np.testing.assert_array_equal(held_out_mask(obs), [True, False])
    # a file without any split column keeps every cell
    assert not held_out_mask(pd.DataFrame({"cell_type": ["a", "b"]})).any()


def test_label_subsets_keep_every_class_in_proportion():
    labels = np.array(["a"] * 80 + ["b"] * 18 + ["c"] * 2)
    rows = label_subset(labels, 0.1, seed=0)
    counts = pd.Series(labels[rows]).value_counts().to_dict()
    assert counts == {"a": 8, "b": 2, "c": 1}  # rounded shares, at least one cell per class
    assert np.all(np.diff(rows) > 0)
    assert not np.array_equal(rows, label_subset(labels, 0.1, seed=1))  # the seed draws other cells
    np.testing.assert_array_equal(label_subset(labels, 1.0, seed=0), np.arange(100))
    rows = stratified_subsample(labels, 50, seed=0)
    assert pd.Series(labels[rows]).value_counts().to_dict() == {"a": 40, "b": 9, "c": 1}
    np.testing.assert_array_equal(stratified_subsample(labels, None, seed=0), np.arange(100))


def test_extra_data_and_batch_columns():
    data = parse_extra("x/my.h5ad:label=ct,batch=sample,test=sample:s7|s8,proteins=adt")
    assert (data.name, data.label_key, data.batch_key, data.test_key, data.test_values, data.protein_key) == \
        ("my", "ct", "sample", "sample", ("s7", "s8"), "adt")
    with pytest.raises(ValueError, match="unknown key"):
        parse_extra("my.h5ad:colour=red")
    # CellBench: batch and protocol are scored; a donor column that splits the cells as the batch does is not
    obs = pd.DataFrame({"batch": list("aabbcc"), "protocol": list("xxxxyy"), "donor": list("ppqqrr")})
    cellbench = dataclasses.replace(DATASETS["cellbench"], donor_key="donor")
    assert batch_keys(cellbench, obs) == ["batch", "protocol"]


def _unit(task, dataset, seed, results):
    return {"unit": {"task": task, "dataset": dataset, "seed": seed}, "results": results, "seconds": 1.0}


def test_summaries_and_verdicts_on_known_numbers():
    units = {}
    f1 = {"express_pretrained": [0.80, 0.82, 0.84], "l1_logistic_regression": [0.70, 0.71, 0.72],
          "majority": [0.9, 0.9, 0.9], "pca": [0.79, 0.83, 0.85]}
    for seed in range(3):
        units[f"zeroshot/kang/seed{seed}"] = _unit("zeroshot", "kang", seed, {"embeddings": {
            arm: {"macro_f1": values[seed], "seconds": 1.0} for arm, values in f1.items()}})
        units[f"proteins/cite/seed{seed}"] = _unit("proteins", "cite", seed, {"proteins": {
            "express_mlp_encoder": {"rmse": [0.5, 0.6, 0.7][seed]}, "ridge_svd": {"rmse": 0.61}}})
    units["zeroshot/kang/seed9"] = {"unit": {"task": "zeroshot", "dataset": "kang", "seed": 9}, "error": "boom"}
    summary = report.aggregate(units, [0, 1, 2])
    stats = summary["zeroshot"]["kang"]["embeddings"]["express_pretrained"]["macro_f1"]
    assert stats["mean"] == pytest.approx(0.82) and stats["sd"] == pytest.approx(0.02) and stats["n"] == 3
    assert stats["values"] == [0.80, 0.82, 0.84]
    found = {(v["task"], v["setting"]): v for v in report.verdicts(summary, {"zeroshot": "macro_f1"})}
    z = found["zeroshot", "embeddings"]
    # the majority reference is never ranked; PCA leads express by 0.0033, far inside the spread, L1 is last
    assert z["ranking"] == ["pca", "express_pretrained", "l1_logistic_regression"]
    assert (z["winner"]["a"], z["winner"]["b"]) == ("pca", "express_pretrained")
    assert z["winner"]["gap"] == pytest.approx((0.79 + 0.83 + 0.85) / 3 - 0.82) and not z["winner"]["exceeds_spread"]
    assert (z["express_vs_other"]["a"], z["express_vs_other"]["b"]) == ("express_pretrained", "pca")
    assert z["express_vs_other"]["gap"] < 0
    lift = z["lift_over_pca"]["express_pretrained"]["macro_f1"]
    assert lift["gap"] == pytest.approx(0.82 - (0.79 + 0.83 + 0.85) / 3) and not lift["exceeds_spread"]
    p = found["proteins", "proteins"]
    # RMSE: lower is better; 0.6 +- 0.1 against 0.61 +- 0: express ahead by 0.01, within the spread
    assert p["metric"] == "rmse" and not p["higher_is_better"]
    assert p["express_vs_other"]["gap"] == pytest.approx(0.01) and not p["express_vs_other"]["exceeds_spread"]
    # a gap larger than both spreads added exceeds them
    big = report.compare("a", "b", {"a": {"m": {"mean": 1.0, "sd": 0.1}}, "b": {"m": {"mean": 0.7, "sd": 0.1}}},
                         "m")
    assert big["gap"] == pytest.approx(0.3) and big["exceeds_spread"]


def test_readme_block_is_rewritten_from_results_only_between_the_markers(tmp_path):
    results = {
        "command": "python scripts/benchmark.py --out x", "budget": {"name": "full"}, "seeds": [0, 1, 2],
        "machine": "test CPU", "wall_minutes": 100.0, "versions": {"express_commit": "abc1234"},
        "verdicts": [{"task": "proteins", "dataset": "cite", "setting": "proteins", "metric": "pearson_per_protein",
                      "express_vs_other": {"a": "express_mlp_encoder", "a_mean": 0.6432, "a_sd": 0.0012,
                                           "b": "kernel_ridge_svd", "b_mean": 0.6336, "b_sd": 0.0031,
                                           "gap": 0.0096, "exceeds_spread": True}},
                     {"task": "ablations", "dataset": "kang", "setting": "VAE heads", "metric": "m",
                      "express_vs_other": {"a": "x", "a_mean": 1, "a_sd": 0, "b": "y", "b_mean": 0, "b_sd": 0,
                                           "gap": 1, "exceeds_spread": True}}],
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n\n{report.HEADLINE_BEGIN}\nold numbers 0.999\n{report.HEADLINE_END}\n\nafter\n")
    block = report.update_readme(readme, results, report_link="scripts/results/benchmark/report.md")
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# t\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert block in text
    assert "| proteins | cite | proteins | pearson_per_protein | express_mlp_encoder 0.643 ± 0.001 | " \
           "kernel_ridge_svd 0.634 ± 0.003 | +0.010 | yes |" in block
    assert "ablations" not in block  # not a headline task
    assert "(scripts/results/benchmark/report.md)" in block
    # a second rewrite from the same results gives the same file
    report.update_readme(readme, results, report_link="scripts/results/benchmark/report.md")
    assert readme.read_text() == text
    readme.write_text("no markers here")
    with pytest.raises(ValueError, match="results:headline"):
        report.update_readme(readme, results)
    json.dumps(results)  # the block is made from JSON-able results only


def test_the_readme_states_the_full_budget_that_suite_runs():
    from conftest import REPO_ROOT

    text = " ".join((REPO_ROOT / "README.md").read_text().split())
    full = BUDGETS["full"]
    assert f"pretrains the default model for {full.pretrain_steps} steps" in text
    assert f"each ablation for {full.ablation_steps} steps" in text
    assert f"caps each split at {full.train_cells:,} training and {full.test_cells:,} held-out cells" in text
    assert f"fine-tunes the transformer for {full.transformer_steps} optimizer steps" in text
    assert "the stimulation task on its three largest held-out types" in text and full.stimulation_types == 3


def test_datasets_option_keeps_only_those_datasets_units(tmp_path):
    from finetune.benchmark.suite import plan

    corpus = type("Corpus", (), {"pretraining": [tmp_path / "tokens"]})()
    bench = Bench(out=tmp_path, budget=BUDGETS["full"], datasets=dict(DATASETS), data_dir=tmp_path, seeds=[0, 1],
                  selected=["zeroshot", "celltypes"], corpus=corpus, only=["kang"])
    first, rest = plan(bench)
    assert [(u.task, u.dataset, u.seed) for u in first] == [("pretraining", "default", 0), ("pretraining", "default", 1)]
    assert sorted((u.task, u.dataset, u.seed) for u in rest) == [
        ("celltypes", "kang", 0), ("celltypes", "kang", 1), ("zeroshot", "kang", 0), ("zeroshot", "kang", 1)]
    bench.only = None
    assert {u.dataset for u in plan(bench)[1]} == {"kang", "cellbench", "cite", "pbmc68k"}
    from conftest import load_script

    parse = load_script("benchmark").parse
    assert parse(["--out", str(tmp_path), "--datasets", "kang", "cite"]).datasets == ["kang", "cite"]
    with pytest.raises(SystemExit):
        parse(["--out", str(tmp_path), "--datasets"])  # the option needs at least one name


def test_a_cached_unit_is_reused_until_a_budget_field_it_read_changes(tmp_path, monkeypatch):
    """A unit's record keeps the budget fields it read (and the corpus's): changing another field (a fine-tuning
    length for a zero-shot unit) reuses it, changing one it read recomputes it."""
    from finetune.benchmark import suite

    # a worker's thread limits, set in this process, would outlive the test (numba refuses a new thread count)
    monkeypatch.setattr(suite, "_limit_threads", lambda threads, cache=None: None)

    def fake(bench, dataset, seed):
        return {"setting": {"arm": {"metric": bench.budget.eval_cells + seed}}}

    suite.tasks()
    suite._TASKS["fake"] = suite.Task("fake", fake, lambda bench: ["kang"])
    try:
        corpus = type("Corpus", (), {"files": {"kang": tmp_path / "kang.h5ad"}})()
        bench = Bench(out=tmp_path, budget=BUDGETS["full"], datasets=dict(DATASETS), data_dir=tmp_path, seeds=[2],
                      corpus=corpus)
        unit = suite.Unit("fake", "kang", 2)
        result = suite.run_unit(bench, unit)
        assert result["results"]["setting"]["arm"]["metric"] == BUDGETS["full"].eval_cells + 2
        assert set(result["record"]["budget"]) == {"name", "max_cells", "tokens", "eval_cells"}
        assert suite._done(bench, unit)
        bench.budget = dataclasses.replace(BUDGETS["full"], transformer_steps=7, scvi_epochs=1)
        assert suite._done(bench, unit)  # fields the unit never read
        bench.budget = dataclasses.replace(BUDGETS["full"], eval_cells=5)
        assert not suite._done(bench, unit)
        bench.budget = BUDGETS["full"]
        bench.corpus = type("Corpus", (), {"files": {"kang": tmp_path / "other.h5ad"}})()
        assert not suite._done(bench, unit)  # another corpus
    finally:
        del suite._TASKS["fake"]


def test_zero_shot_embeddings_read_cells_as_the_model_was_pretrained(tmp_path):
    """The stored tokens (more genes and zeros than the model was pretrained on) are cut to the model's top_k and
    n_zeros, and a model with a gene panel reads the cells re-encoded through it; the mean pooling is over exactly
    those detected genes."""
    import torch

    from finetune.benchmark.zeroshot import model_embeddings
    from modeling import ExpressConfig, ExpressModel
    from test_pretrain_data import make_tokenized_dataset, make_vocab
    from tokenizer import TokenizationSpec, TokenizedCells

    vocab = make_vocab(40)
    cells = TokenizedCells.load(make_tokenized_dataset(tmp_path / "cells", n_cells=12, vocab=vocab, top_k=12,
                                                       n_zeros=4))
    torch.manual_seed(0)
    model = ExpressModel(ExpressConfig.from_vocab(vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32)).eval()
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append((kwargs["input_ids"], kwargs["is_zero"],
                                                                         kwargs["attention_mask"])),
                                    with_kwargs=True)
    rows = np.arange(12)
    panel = vocab.gene_token_ids[::2]
    counts_ids = cells.dataset["counts_ids"]
    for spec, top_k, n_zeros in ((None, 12, 4), (TokenizationSpec(top_k=5, n_zeros=2), 5, 2),
                                 (TokenizationSpec(top_k=5, n_zeros=2, input_genes=panel), 5, 2)):
        seen.clear()
        pooled = model_embeddings(model, cells, rows, spec=spec)
        assert pooled["cls_mean"].shape == (12, 32)
        ids, zero, mask = (torch.cat([s[i] for s in seen]) for i in range(3))  # one batch of 12 (no padding left)
        genes = (ids >= vocab.n_special) & (mask == 1)
        for i in range(12):
            detected = ids[i][genes[i] & (zero[i] == 0)].numpy()
            available = np.asarray(counts_ids[i]) if spec is None or spec.input_genes is None else \
                np.intersect1d(counts_ids[i], panel)
            assert len(detected) == min(top_k, len(available)) and set(detected) <= set(available.tolist())
            assert (genes[i] & (zero[i] == 1)).sum() == n_zeros
            if spec is not None and spec.input_genes is not None:
                assert set(ids[i][genes[i]].tolist()) <= set(panel.tolist())
    assert not np.allclose(pooled["mean"], model_embeddings(model, cells, rows)["mean"])
