"""Fine-tuning benchmark: express (pretrained / without pretraining), the MLP encoder with identical heads, and the
classical baselines, on held-out donors or batches, over several seeds. Prints a table and writes JSON + Markdown.

Splits:
- ``cite``: NeurIPS 2021 BMMC CITE-seq starter, train donor s1d1, test s1d2: cell types and ADT (134 proteins);
- ``cellbench``: CellBench lung cell lines, train on sc_celseq2 and the 5-cell-line plates p1, p2, test on plate p3
  and the Drop-seq batch (another protocol): cell types (incl. 'doublet');
- ``kang``: Kang 2018 PBMC controls, train on six donors, test on donors 1244 and 1256: cell types.

Full run for a quiet machine (all arms, 3 seeds; --pretrained is a folder written by pretrain/run.py):

    python scripts/bench_finetune.py --budget full --seeds 0 1 2 --pretrained PRETRAINED_DIR \\
        --out bench_finetune_full

Small run (development machine, 2 cores): ``--budget small`` (fewer epochs, a smaller transformer).

The two transformer arms: ``express_no_pretraining`` (a vocabulary fitted on the training cells, random weights) and,
with ``--pretrained``, ``express_pretrained``. Given a pretrained model, the arm without pretraining copies its
architecture and both tokenize alike (``tokenize`` of the budget) and train with the same learning rate for encoder
and head (``--lr``; ``--pretrained_kwargs`` overrides the pretrained arm's settings): the starting weights are the
only difference. The pretrained vocabulary is taken to be keyed by gene symbol (``var['gene_symbol']``), as
``scripts/bench_pretrain.py`` builds it.
Targets: Kang macro-F1 of express >= L1 logistic regression; CITE-seq per-protein Pearson of express >= best of
kNN / ridge / kernel ridge on SVD features.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from finetune import api
from finetune import baselines as B
from finetune import metrics as M
from finetune.benchmark.splits import SPLITS, shared_data_dir
from finetune.data import fit_protein_reference, normalize_proteins, protein_counts, split_adata

logger = logging.getLogger("bench_finetune")

BUDGETS = {
    # epochs per task for the MLP-encoder arms ("epochs") and the two transformer arms ("tf_epochs"); the
    # architecture and tokenization of the transformer without pretraining (with --pretrained: the pretrained
    # model's architecture instead, so the two transformer arms differ only in their starting weights)
    "small": {"epochs": {"cite": 100, "cellbench": 30, "kang": 15}, "tf_epochs": {"cite": 30, "cellbench": 20, "kang": 10},
              "transformer": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
              "tokenization": dict(top_k=256, n_zeros=50)},
    "full": {"epochs": {"cite": 150, "cellbench": 60, "kang": 30}, "tf_epochs": {"cite": 100, "cellbench": 30, "kang": 10},
             "transformer": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
             "tokenization": dict(top_k=256, n_zeros=50)},
}
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "norm_placement", "classifier_pooling")
# The pretrained vocabulary of scripts/bench_pretrain.py is keyed by gene symbol (cellbench's var_names are Ensembl)
PRETRAINED_GENE_ID_KEY = "gene_symbol"


def transformer_arms(budget: dict, pretrained: str | None, lr: float, pretrained_kwargs: dict | None):
    """Keyword arguments of the two transformer arms: ``(without pretraining, pretrained)``.

    With a pretrained model, the arm without pretraining copies its architecture, and both use the same learning rate
    for encoder and head: the starting weights are the only difference between them. ``pretrained_kwargs`` override
    the pretrained arm's training settings."""
    transformer = dict(budget["transformer"])
    if pretrained:
        from modeling import ExpressConfig

        config = ExpressConfig.from_pretrained(pretrained)
        transformer = {k: getattr(config, k) for k in ARCHITECTURE}
    scratch = {"encoder": "transformer", "transformer": transformer, "tokenization": budget["tokenization"]}
    warm = {"model": pretrained, "encoder": "transformer", "gene_id_key": PRETRAINED_GENE_ID_KEY,
            "tokenization": budget["tokenization"], "encoder_lr": lr, **(pretrained_kwargs or {})}
    return scratch, warm


def _cell_type_metrics(truth, pred) -> dict:
    return {"accuracy": M.accuracy(truth, pred), "macro_f1": M.macro_f1(truth, pred)}


def cell_type_arms(name, train, test, seed, budget, pretrained, n_top_genes, lr, arms=None,
                   mlp_kwargs=None, pretrained_kwargs=None) -> dict[str, dict]:
    def want(arm: str) -> bool:
        return arms is None or arm in arms

    y_train = train.obs["cell_type"].astype(str).to_numpy()
    truth = test.obs["cell_type"].astype(str).to_numpy()
    results = {"majority": _cell_type_metrics(truth, B.majority_class(y_train, test.n_obs))}
    if want("l1_logistic_regression") or want("mlp_classifier_sklearn"):
        x_train, x_test, _ = B.log_normalized_features(train, test, n_top_genes=n_top_genes)
    if want("l1_logistic_regression"):
        t = time.perf_counter()
        results["l1_logistic_regression"] = _cell_type_metrics(truth, B.l1_logistic_regression(x_train, y_train,
                                                                                               x_test, seed=seed))
        results["l1_logistic_regression"]["seconds"] = time.perf_counter() - t
    if want("mlp_classifier_sklearn"):
        t = time.perf_counter()
        results["mlp_classifier_sklearn"] = _cell_type_metrics(truth, B.mlp_classifier(x_train, y_train, x_test,
                                                                                       seed=seed))
        results["mlp_classifier_sklearn"]["seconds"] = time.perf_counter() - t

    def express(arm, **kw):
        if not want(arm):
            return
        t0 = time.perf_counter()
        # the arm's own keywords (e.g. --mlp_kwargs) override the shared defaults
        model = api.fit_cell_types(train, **{"label_key": "cell_type", "n_top_genes": n_top_genes, "seed": seed,
                                             "lr": lr, **kw})
        pred = api.predict_cell_types(test.copy(), model, gene_id_key=kw.get("gene_id_key")).astype(str).to_numpy()
        results[arm] = {**_cell_type_metrics(truth, pred), "seconds": time.perf_counter() - t0}

    express("express_mlp_encoder", encoder="mlp", **{"epochs": budget["epochs"][name], **(mlp_kwargs or {})})
    if want("vae_mixture_mlp_encoder"):
        t0 = time.perf_counter()
        vae = api.train_vae(train, encoder="mlp", label_key="cell_type", n_top_genes=n_top_genes, seed=seed,
                            epochs=budget["epochs"][name])
        pred = api.predict_cell_types(test.copy(), vae).astype(str).to_numpy()
        results["vae_mixture_mlp_encoder"] = {**_cell_type_metrics(truth, pred), "seconds": time.perf_counter() - t0}
    scratch, warm = transformer_arms(budget, pretrained, lr, pretrained_kwargs)
    tf_epochs = budget["tf_epochs"][name]
    express("express_no_pretraining", **{"epochs": tf_epochs, **scratch})
    if pretrained:
        express("express_pretrained", **{"epochs": tf_epochs, **warm})
    return results


def adt_arms(train, test, seed, budget, pretrained, n_top_genes, lr, arms=None,
             pretrained_kwargs=None) -> dict[str, dict]:
    def want(arm: str) -> bool:
        return arms is None or arm in arms

    raw_train, names = protein_counts(train, "protein_counts")
    raw_test, _ = protein_counts(test, "protein_counts", names)
    reference = fit_protein_reference(raw_train, "clr")
    y_train, truth = normalize_proteins(raw_train, "clr", reference), normalize_proteins(raw_test, "clr", reference)
    results = {"mean_protein": M.protein_metrics(B.mean_protein(y_train, test.n_obs), truth)}
    x_train, x_test, _ = B.log_normalized_features(train, test, n_top_genes=n_top_genes)
    f_train, f_test = B.svd_features(x_train, x_test, seed=seed)
    for arm, fn in (("knn_svd", B.knn_regression), ("ridge_svd", B.ridge_regression),
                    ("kernel_ridge_svd", B.kernel_ridge_svd)):
        if not want(arm):
            continue
        t0 = time.perf_counter()
        results[arm] = {**M.protein_metrics(fn(f_train, y_train, f_test, seed=seed), truth),
                        "seconds": time.perf_counter() - t0}

    def express(arm, **kw):
        if not want(arm):
            return
        t0 = time.perf_counter()
        model = api.fit_proteins(train, n_top_genes=n_top_genes, seed=seed, **kw)
        pred = api.predict_proteins(test.copy(), model, gene_id_key=kw.get("gene_id_key")).to_numpy()
        results[arm] = {**M.protein_metrics(pred, truth), "seconds": time.perf_counter() - t0}

    epochs = budget["epochs"]["cite"]
    express("express_mlp_encoder", encoder="mlp", epochs=epochs, lr=lr)
    express("nb_vae_mlp_encoder", encoder="mlp", protein_head="nb", epochs=epochs, lr=3e-3)
    scratch, warm = transformer_arms(budget, pretrained, lr, pretrained_kwargs)
    tf_epochs = budget["tf_epochs"]["cite"]
    express("express_no_pretraining", **{"epochs": tf_epochs, "lr": lr, **scratch})
    if pretrained:
        express("express_pretrained", **{"epochs": tf_epochs, "lr": lr, **warm})
    return results


def summarise(per_seed: list[dict]) -> dict:
    out: dict = {}
    for arm in per_seed[0]:
        keys = [k for k in per_seed[0][arm] if isinstance(per_seed[0][arm][k], float)]
        out[arm] = {k: {"mean": float(np.mean([s[arm][k] for s in per_seed])),
                        "std": float(np.std([s[arm][k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0}
                    for k in keys}
    return out


def table(summary: dict, columns: list[str], title: str) -> str:
    lines = [f"**{title}**", "", "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, values in summary.items():
        cells = [f"{values[c]['mean']:.3f} ± {values[c]['std']:.3f}" if c in values else "" for c in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["cite", "cellbench", "kang"], choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", choices=list(BUDGETS), default="small")
    parser.add_argument("--pretrained", default=None, help="pretrained express folder (the 'express_pretrained' arm)")
    parser.add_argument("--arms", nargs="+", default=None,
                        help="run only these arms (e.g. express_pretrained); the majority / mean-protein reference "
                             "always runs. Default: all")
    parser.add_argument("--mlp_kwargs", type=json.loads, default=None,
                        help="JSON keyword arguments of fit_cell_types for the express_mlp_encoder cell-type arm, e.g. "
                             "settings chosen by scripts/cv_celltype.py: '{\"head\": {\"mlp_layers\": 1}}'")
    parser.add_argument("--pretrained_kwargs", type=json.loads, default=None,
                        help="JSON training keyword arguments for the express_pretrained arm (cell-type and adt), e.g. "
                             "'{\"batch_size\": 16, \"encoder_lr\": 0.001}'")
    parser.add_argument("--n_top_genes", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data_dir", default=str(shared_data_dir()))
    parser.add_argument("--out", default="bench_finetune", help="output stem: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    arms = set(args.arms) if args.arms else None
    report: dict = {"args": vars(args), "budget": budget, "results": {}}
    markdown = [f"Budget `{args.budget}`, seeds {args.seeds}, torch threads {args.threads}; mean ± sd over seeds.", ""]
    for name in args.datasets:
        file, key, test_values = SPLITS[name]
        adata = ad.read_h5ad(Path(args.data_dir) / file)
        train, test = split_adata(adata, key, test_values)
        logger.info("%s: %d training cells, %d held-out cells", name, train.n_obs, test.n_obs)
        tasks = {"cell-type": cell_type_arms}
        if name == "cite":
            tasks["adt"] = None
        for task in tasks:
            per_seed = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                if task == "adt":
                    res = adt_arms(train, test, seed, budget, args.pretrained, args.n_top_genes, args.lr, arms,
                                   args.pretrained_kwargs)
                else:
                    res = cell_type_arms(name, train, test, seed, budget, args.pretrained, args.n_top_genes, args.lr,
                                         arms, args.mlp_kwargs, args.pretrained_kwargs)
                logger.info("%s %s seed %d done in %.0f s", name, task, seed, time.perf_counter() - t0)
                per_seed.append(res)
            summary = summarise(per_seed)
            report["results"][f"{name}/{task}"] = {"per_seed": per_seed, "summary": summary,
                                                  "split": {"key": key, "test": test_values,
                                                            "n_train": train.n_obs, "n_test": test.n_obs}}
            columns = ["accuracy", "macro_f1", "seconds"] if task == "cell-type" else \
                ["rmse", "pearson_per_cell", "pearson_per_protein", "seconds"]
            text = table(summary, columns, f"{name} {task} (test {key} in {test_values})")
            print(text + "\n", flush=True)
            markdown += [text, ""]
            Path(args.out + ".json").write_text(json.dumps(report, indent=2, default=float))
    Path(args.out + ".md").write_text("\n".join(markdown))
    return report


if __name__ == "__main__":
    main()
