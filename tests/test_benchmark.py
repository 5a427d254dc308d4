"""The whole benchmark, quick budget, end to end on the real data (so the suite cannot rot): every task and arm runs
over three seeds, the report, the JSON and the figures are written, the README block is generated from the JSON,
and a second call reuses every finished unit."""

from __future__ import annotations

import json
import time

import pytest
from conftest import load_script

benchmark = load_script("benchmark")

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from conftest import shared_path

    data_dir = shared_path("kang2018_pbmc_12261.h5ad").parent
    out = tmp_path_factory.mktemp("bench") / "quick"
    start = time.perf_counter()
    results = benchmark.main(["--out", str(out), "--quick", "--jobs", "2", "--data_dir", str(data_dir)])
    return out, results, time.perf_counter() - start, data_dir


def _arms(results, task, dataset, setting):
    return results["tasks"][task][dataset][setting]


@pytest.mark.slow
@pytest.mark.shared_data
def test_quick_benchmark_runs_every_task_and_arm_over_three_seeds(quick_run):
    from finetune.benchmark.suite import TASK_ORDER, tasks

    out, results, _, _ = quick_run
    assert results["failures"] == {}
    assert set(results["tasks"]) == {"pretraining", *(t for t in TASK_ORDER if t in tasks())}
    assert results["seeds"] == SEEDS and results["budget"]["name"] == "quick"
    for task, datasets in results["tasks"].items():
        for dataset, settings in datasets.items():
            for setting, arms in settings.items():
                for arm, metrics in arms.items():
                    for metric, stats in metrics.items():
                        assert len(stats["values"]) == 3, (task, dataset, setting, arm, metric)
    celltype_arms = {"majority", "l1_logistic_regression", "mlp_sklearn", "express_mlp_encoder", "express_pretrained",
                     "express_random_init", "express_pretrained_default", "express_vae_mlp_encoder", "scanvi"}
    for dataset in ("kang", "cellbench", "cite"):
        for fraction in ("50% labels", "100% labels"):
            arms = _arms(results, "celltypes", dataset, fraction)
            assert set(arms) == celltype_arms
            assert all(arms[a]["macro_f1"]["n"] == 3 for a in arms)
        zeroshot = _arms(results, "zeroshot", dataset, "embeddings")
        assert {"pca", "bag_of_genes", "scvi", "express_pretrained", "express_random_init"} <= set(zeroshot)
        mll = _arms(results, "probabilistic", dataset, "marginal log-likelihood")
        assert set(mll) == {"express_vae_mlp_encoder", "scvi"}
        assert all(mll[a]["marginal_log_likelihood"]["mean"] < 0 for a in mll)  # log p(x) of count data
        heads = _arms(results, "ablations", dataset, "VAE heads")
        assert {"default", "iwae_k8_dreg", "prior_normal", "covariance_full"} <= set(heads)
    proteins = _arms(results, "proteins", "cite", "proteins")
    assert {"mean_protein", "knn_svd", "ridge_svd", "kernel_ridge_svd", "express_mlp_encoder",
            "express_nb_vae_mlp_encoder", "express_pretrained", "express_random_init", "totalvi"} == set(proteins)
    # scib-metrics scores with labels (bio + batch) and without (chemistries: batch metrics only)
    kang = _arms(results, "integration", "kang", "batch = donor")
    assert {"pca", "express_pretrained", "express_random_init", "express_vae_mlp_encoder", "scvi"} == set(kang)
    assert {"total", "bio_conservation", "batch_correction", "kbet", "ilisi", "silhouette_label"} <= set(kang["scvi"])
    assert set(results["tasks"]["integration"]["cellbench"]) == {"batch = batch", "batch = protocol"}
    chemistries = _arms(results, "integration", "chemistries", "batch = batch")["scvi"]
    assert {"ilisi", "kbet", "batch_correction"} <= set(chemistries) and "bio_conservation" not in chemistries
    # every pretraining variant ran on the ablations' budget, beside the default recipe on its own
    from finetune.benchmark import pretraining

    runs = _arms(results, "pretraining", "corpus", "pretraining")
    assert {"objective_mlm", "objective_mcv", "objective_contrastive", "input_random_genes", "input_hvg_panel",
            "no_sampled_zeros", "no_gene_hierarchy", "no_gene_embedding_norm", "no_rank_embedding",
            "no_value_embedding"} <= set(runs)
    assert set(runs) == {"default", "default_ablation_budget",
                         *(v for v in pretraining.VARIANTS if not pretraining.is_default(v))}
    assert all(runs[v]["steps"]["mean"] >= 1 for v in runs)


@pytest.mark.slow
@pytest.mark.shared_data
def test_quick_benchmark_numbers_behave(quick_run):
    """Even at the quick budget, what cannot fail to hold on these data holds."""
    _, results, _, _ = quick_run
    cellbench = _arms(results, "celltypes", "cellbench", "100% labels")
    # five lung-cancer cell lines: logistic regression separates them on held-out batches and protocols
    assert cellbench["l1_logistic_regression"]["macro_f1"]["mean"] > 0.9
    assert cellbench["majority"]["macro_f1"]["mean"] < 0.2
    proteins = _arms(results, "proteins", "cite", "proteins")
    assert proteins["ridge_svd"]["pearson_per_protein"]["mean"] > 0.4
    assert proteins["mean_protein"]["pearson_per_protein"]["mean"] == 0.0  # a constant carries no information
    assert proteins["ridge_svd"]["rmse"]["mean"] < proteins["mean_protein"]["rmse"]["mean"]
    # every verdict names a winner; the zero-shot ones state the lift over PCA
    verdicts = {(v["task"], v["dataset"], v["setting"]): v for v in results["verdicts"]}
    for dataset in ("kang", "cellbench", "cite", "pbmc68k"):
        lift = verdicts["zeroshot", dataset, "embeddings"]["lift_over_pca"]["express_pretrained"]["macro_f1"]
        stats = _arms(results, "zeroshot", dataset, "embeddings")
        assert lift["gap"] == pytest.approx(stats["express_pretrained"]["macro_f1"]["mean"] -
                                            stats["pca"]["macro_f1"]["mean"])
    ablation = verdicts["ablations", "kang", "VAE heads"]
    assert ablation["metric"] == "marginal_log_likelihood" and {c["a"] for c in ablation["vs_default"]} >= \
        {"iwae_k8_dreg", "covariance_full", "prior_normal"}


@pytest.mark.slow
@pytest.mark.shared_data
def test_quick_benchmark_writes_report_figures_and_the_readme_block(quick_run, tmp_path):
    from finetune.benchmark import report

    out, results, _, _ = quick_run
    # the file holds exactly the returned results (compared as text: NaN, e.g. a constant prediction's Pearson, is
    # not equal to itself)
    assert (out / "results.json").read_text() == json.dumps(results, indent=1, default=float)
    text = (out / "report.md").read_text()
    assert "Budget `quick`" in text
    for task in ("pretraining", "zeroshot", "celltypes", "integration", "proteins", "probabilistic", "ablations"):
        assert f"## {task}" in text
    for name in ("zeroshot", "celltypes", "integration", "proteins", "probabilistic", "ablations",
                 *(f"integration_{d}" for d in ("kang", "cellbench", "cite", "chemistries"))):
        figure = out / "figures" / f"{name}.png"
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.HEADLINE_BEGIN}\n{report.HEADLINE_END}\n")
    block = report.update_readme(readme, results)
    cell = next(v for v in results["verdicts"] if (v["task"], v["dataset"], v["setting"]) ==
                ("celltypes", "cellbench", "100% labels"))["express_vs_other"]
    assert f"| celltypes | cellbench | 100% labels | macro_f1 | {cell['a']} {cell['a_mean']:.3f} ± " in block
    assert "quick" in block  # a quick run's block says its numbers are no evidence


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_second_run_reuses_every_finished_unit(quick_run):
    out, results, first_seconds, data_dir = quick_run
    units = sorted((out / "units").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in units}
    start = time.perf_counter()
    again = benchmark.main(["--out", str(out), "--quick", "--jobs", "2", "--data_dir", str(data_dir)])
    assert time.perf_counter() - start < first_seconds / 4
    assert {p: p.stat().st_mtime_ns for p in units} == stamps  # nothing recomputed
    assert json.dumps(again["tasks"]) == json.dumps(results["tasks"])


@pytest.mark.slow
@pytest.mark.shared_data
def test_report_only_runs_nothing_and_names_what_is_missing(quick_run, tmp_path):
    """``--report_only --datasets kang``: the report holds kang's finished units only, a missing unit is named, not
    run. (In the run's own folder: a unit's record names the corpus files, so a copied folder would match nothing.)"""
    out, results, _, data_dir = quick_run
    unit = out / "units" / "zeroshot" / "kang" / "seed2.json"
    aside = tmp_path / "seed2.json"
    unit.replace(aside)
    try:
        partial = benchmark.main(["--out", str(out), "--quick", "--report_only", "--tasks", "zeroshot", "--datasets",
                                  "kang", "--data_dir", str(data_dir)])
        assert not unit.exists()  # nothing was run
        assert set(partial["tasks"]["zeroshot"]) == {"kang"}
        assert partial["tasks"]["zeroshot"]["kang"]["embeddings"]["pca"]["macro_f1"]["n"] == 2
        assert "report only: 1 planned unit(s) not run and not in this report: zeroshot/kang/seed2" in \
            (out / "report.md").read_text()
    finally:
        aside.replace(unit)
        benchmark.main(["--out", str(out), "--quick", "--data_dir", str(data_dir)])  # the full report again
