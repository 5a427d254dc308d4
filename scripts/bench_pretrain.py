"""Does pretraining help? Pretrain on all real data for a fixed CPU time budget, then compare frozen embeddings.

1. Tokenize every h5ad in ``../shared/data`` plus the built-in default data (pbmc68k_reduced) with ONE vocabulary:
   statistics are fitted per file (each with its own library sizes: ``obs['n_counts']`` for pbmc68k, whose 765 genes
   are a subset, row sums elsewhere) and merged exactly (``tokenizer.merge_statistics``); each file becomes its own
   tokenized dataset with kept counts for MCV.

   Gene ids: **symbols** (``var['gene_symbol']``). Most files are keyed by symbol, the default data has symbols only,
   and citefuse maps only part of its genes to Ensembl ids (``var['ensembl_id']`` is '' for the rest), so Ensembl
   ids would drop genes; cellbench (Ensembl ``var_names``) is mapped through its ``var['gene_symbol']`` column, and
   its genes without a symbol are left out.
2. Pretrain ``pretrain/run.py``'s model on all of them for ``--budget_minutes`` of training (the step count is
   calibrated on this machine first, so the learning-rate schedule completes within the budget, or fixed with
   ``--max_steps``; a hard stop at 1.1x the budget guards against a slower machine).
3. Report held-out MLM accuracy/loss and MCV NLL (pretrained vs the same architecture with random weights), and the
   5-fold kNN (k=15) cell-type accuracy and macro-F1 on the labelled datasets (kang2018_pbmc, cellbench, bmmc_cite,
   pbmc68k) of frozen ``<cls>`` and mean-pooled embeddings, pretrained vs random weights, against PCA (50
   components) of log-normalised, scaled highly variable genes. Labels are never used in pretraining. The kNN
   cells are all labelled cells (subsampled to ``--knn_max_cells``), as before; the table also splits the same
   out-of-fold predictions into cells **seen** (unlabelled) in pretraining and cells **unseen** (the fine-tuning
   test cells left out below, plus the 5% held-out split).

Clean corpus (``--exclude_finetune_test_cells``, on by default; ``--no-exclude_finetune_test_cells`` to keep them):
the cells that ``scripts/bench_finetune.py`` tests on (its ``SPLITS``: Kang 2018 donors 1244 and 1256, BMMC CITE-seq
donor s1d2, CellBench batches sc_celseq2_5cl_p3 and sc_dropseq) are left out of the pretraining corpus *and* of the
vocabulary statistics (gene medians), so the "pretrained" fine-tuning arm never saw its test cells, even unlabelled.
The rule is by value, in every file that has the split's column: a cell is left out when ``obs[key]`` is one of a
split's test values. That also removes the 302 control cells of ``kang2018_ctrlstim_2000`` whose donor is 1244 or
1256 -- they are the very same cells as Kang's test cells (same barcodes). Its 1,000 IFN-beta-stimulated cells carry
no donor label and are different cells, so they stay. Left-out cells go to a filtered copy of each affected file
(``OUT/inputs/pretrain/``); the kNN evaluation tokenizes the complete labelled files with the same vocabulary
(``OUT/tokens_eval/``). What was left out is recorded in ``OUT/corpus.json`` and the report.

Validate quickly (tiny budget): ``python scripts/bench_pretrain.py --budget_minutes 1 --knn_max_cells 400``
Full run on a quiet machine: ``python scripts/bench_pretrain.py --budget_minutes 60 --out runs/bench_pretrain``
Prints a table and writes ``OUT/bench_pretrain.json`` and ``OUT/bench_pretrain.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
from finetune.benchmark.splits import held_out_mask, shared_data_dir

LABELLED = {"kang2018_pbmc_12261": "cell_type", "cellbench_lung_1408": "cell_type", "bmmc_cite_600": "cell_type",
            "pbmc68k_counts": "cell_type"}
NOT_A_LABEL = {"doublet", "unlabelled", "unknown", "nan", ""}
logger = logging.getLogger("bench_pretrain")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget_minutes", type=float, default=60.0, help="pretraining time budget (training only)")
    p.add_argument("--data_dir", default=str(shared_data_dir()))
    p.add_argument("--out", default="runs/bench_pretrain")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=256)
    p.add_argument("--per_device_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--objectives", default="mlm,mcv")
    p.add_argument("--top_k", type=int, default=256)
    p.add_argument("--n_zeros", type=int, default=50)
    p.add_argument("--min_cells", type=int, default=10, help="vocabulary: genes detected in at least this many cells")
    p.add_argument("--knn_max_cells", type=int, default=3000, help="labelled cells per dataset for kNN (subsample)")
    p.add_argument("--knn_k", type=int, default=15)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration_steps", type=int, default=6)
    p.add_argument("--max_steps", type=int, default=None,
                   help="fixed number of optimizer steps instead of calibrating them to the budget (on a machine whose "
                        "load changes, the calibration can be off by 2x); the budget still stops training at 1.1x")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a machine shared with other "
                        "jobs, where 2 threads on 2 busy cores wait on each other)")
    p.add_argument("--exclude_finetune_test_cells", action=argparse.BooleanOptionalAction, default=True,
                   help="leave bench_finetune.py's test cells out of the pretraining corpus and its statistics")
    p.add_argument("--overwrite", action="store_true", help="redo tokenization and pretraining")
    return p.parse_args(argv)


# --- 1. one vocabulary, one tokenized dataset per file ----------------------------------------------------------------


def finetune_test_mask(obs) -> np.ndarray:
    """True for the cells of ``obs`` that some fine-tuning benchmark split tests on."""
    return held_out_mask(obs)


def pretraining_inputs(inputs: list[tuple[Path, str | None]], out: Path, exclude: bool
                       ) -> tuple[list[tuple[Path, str | None]], dict[str, dict]]:
    """The files pretraining reads: the originals, or, with ``exclude``, filtered copies of the files holding
    fine-tuning test cells (in ``OUT/inputs/pretrain/``, same file names so the ``source`` column is unchanged)."""
    import anndata as ad

    if not exclude:
        return inputs, {}
    kept, left_out = [], {}
    for path, totals_key in inputs:
        adata = ad.read_h5ad(path, backed="r")
        mask = finetune_test_mask(adata.obs)
        if not mask.any():
            adata.file.close()
            kept.append((path, totals_key))
            continue
        left_out[path.stem] = {"n_cells": int(adata.n_obs), "n_left_out": int(mask.sum())}
        target = out / "inputs" / "pretrain" / path.name
        if not target.is_file() or ad.read_h5ad(target, backed="r").n_obs != int((~mask).sum()):
            target.parent.mkdir(parents=True, exist_ok=True)
            subset = adata[~mask].to_memory()
            tmp = target.with_name(f".tmp-{target.name}")
            subset.write_h5ad(tmp)
            tmp.replace(target)
        adata.file.close()
        kept.append((target, totals_key))
        logger.info("%s: %d of %d cells left out of pretraining (fine-tuning test cells)", path.stem,
                    left_out[path.stem]["n_left_out"], left_out[path.stem]["n_cells"])
    return kept, left_out


def tokenize_all(data_dir: Path, out: Path, args) -> tuple[list[Path], dict[str, Path], dict]:
    """One vocabulary fitted on the pretraining files; returns the pretraining dataset folders, a complete tokenized
    folder per labelled file for the kNN evaluation, and what was left out."""
    import tokenizer
    from tokenizer.data import pbmc68k_counts
    from tokenizer.tokenize import MANIFEST_FILE

    files = sorted(data_dir.glob("*.h5ad"))
    if not files:
        raise FileNotFoundError(f"no h5ad files in {data_dir}")
    default = out / "inputs" / "pbmc68k_counts.h5ad"
    if not default.is_file():
        default.parent.mkdir(parents=True, exist_ok=True)
        pbmc68k_counts().write_h5ad(default)
    inputs = [(f, None) for f in files] + [(default, "n_counts")]
    train_inputs, left_out = pretraining_inputs(inputs, out, args.exclude_finetune_test_cells)
    corpus_record = {"exclude_finetune_test_cells": args.exclude_finetune_test_cells, "left_out": left_out,
                     "inputs": [str(p) for p, _ in train_inputs], "top_k": args.top_k, "n_zeros": args.n_zeros,
                     "min_cells": args.min_cells}
    record_file = out / "corpus.json"
    redo = args.overwrite or not record_file.is_file() or json.loads(record_file.read_text()) != corpus_record
    merged = out / "stats" / "merged"
    if redo or not (merged / "vocab.json").is_file():
        parts = []
        for path, totals_key in train_inputs:
            part = out / "stats" / path.stem
            tokenizer.fit_statistics([path], part, gene_id_key="gene_symbol", total_counts_key=totals_key,
                                     overwrite=True, progress=False)
            parts.append(part)
        tokenizer.merge_statistics(parts, merged, min_cells=args.min_cells, overwrite=True)

    def tokenize(path, totals_key, folder):
        if redo or not (folder / MANIFEST_FILE).is_file():
            obs_keys = [LABELLED[path.stem]] if path.stem in LABELLED else None
            tokenizer.tokenize_files([path], merged, folder, gene_id_key="gene_symbol", total_counts_key=totals_key,
                                     obs_keys=obs_keys, keep_counts=True, overwrite=True, progress=False,
                                     spec=tokenizer.TokenizationSpec(top_k=args.top_k, n_zeros=args.n_zeros))
        return folder

    folders = [tokenize(path, key, out / "tokens" / path.stem) for path, key in train_inputs]
    # the kNN evaluation reads every labelled cell: complete files where pretraining saw a filtered copy
    eval_folders = {}
    for (path, key), folder in zip(inputs, folders):
        if path.stem in LABELLED:
            eval_folders[path.stem] = tokenize(path, key, out / "tokens_eval" / path.stem) \
                if path.stem in left_out else folder
    record_file.write_text(json.dumps(corpus_record, indent=2))
    args.corpus_changed = redo  # a pretrained model from another corpus must not be reused
    return folders, eval_folders, left_out


# --- 2. pretraining ---------------------------------------------------------------------------------------------------


def run_args(args, folders, output_dir: Path, max_steps: int, minutes: float | None, calibration: bool = False):
    from pretrain.run import PretrainArgs

    return PretrainArgs(
        dataset=[str(f) for f in folders], output_dir=str(output_dir), overwrite_output_dir=True,
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
        per_device_batch_size=args.per_device_batch_size, learning_rate=args.learning_rate,
        objectives=args.objectives, max_steps=max_steps, max_train_minutes=minutes, seed=args.seed,
        eval_steps=0 if calibration else max(max_steps // 5, 1),
        save_steps=max_steps if calibration else max(max_steps // 4, 1),
        logging_steps=max(max_steps // 50, 1), max_eval_cells=300, report_to="none" if calibration else "tensorboard",
        warmup_steps=0 if calibration else None,
    )


def pretrain(args, folders, out: Path) -> dict:
    from pretrain.run import main

    final = out / "pretrain" / "final"
    if not (args.overwrite or getattr(args, "corpus_changed", False)) and (final / "metrics.json").is_file():
        logger.info("reusing %s", final)
        metrics = json.loads((final / "metrics.json").read_text())
        return {"final_dir": str(final), "metrics": metrics, "step": metrics.get("step"), "reused": True}
    if args.max_steps:
        seconds_per_step, max_steps = None, args.max_steps
    else:
        calib = main(run_args(args, folders, out / "calibration", args.calibration_steps, None, calibration=True))
        seconds_per_step = calib["train_seconds"] / args.calibration_steps  # steps only: no evaluation or saving
        max_steps = max(int(args.budget_minutes * 60 / seconds_per_step), 1)
        logger.info("calibration: %.2f s/step -> %d steps in %.1f min", seconds_per_step, max_steps,
                    args.budget_minutes)
    result = main(run_args(args, folders, out / "pretrain", max_steps, 1.1 * args.budget_minutes))
    result.update(calibration_seconds_per_step=seconds_per_step, planned_steps=max_steps)
    return result


# --- 3. evaluation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(model, dataset, collator, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Frozen ``<cls>`` and mean-pooled (over the gene tokens) embeddings of every cell of ``dataset``."""
    model.eval()
    cls_parts, mean_parts = [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
        batch = collator(rows)
        hidden = model(input_ids=batch["input_ids"], values=batch["values"], is_zero=batch["is_zero"],
                       attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
        genes = (batch["attention_mask"].bool() & (batch["input_ids"] >= 4)).unsqueeze(-1).float()
        cls_parts.append(hidden[:, 0].numpy())
        mean_parts.append(((hidden * genes).sum(1) / genes.sum(1).clamp_min(1)).numpy())
    return np.concatenate(cls_parts), np.concatenate(mean_parts)


def pca_features(path: Path, cell_ids: np.ndarray, seed: int) -> np.ndarray:
    """PCA (50) of scaled log-normalised highly variable genes, for the given cells in the given order."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    rows = adata.obs_names.get_indexer(cell_ids)
    if (rows < 0).any():
        raise ValueError(f"{path}: {int((rows < 0).sum())} tokenized cells are not in the file (obs names changed?)")
    adata = adata[rows].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_top = min(2000, adata.n_vars)
    if n_top < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top)
        adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.scale(adata, max_value=10)
    n_comps = min(50, adata.n_obs - 1, adata.n_vars - 1)
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
    return adata.obsm["X_pca"]


def knn_predictions(features: np.ndarray, labels: np.ndarray, k: int, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold kNN predictions (stratified ``folds``-fold split)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    predictions = np.empty_like(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes smaller than the number of folds
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for train, test in splitter.split(features, labels):
            knn = KNeighborsClassifier(n_neighbors=min(k, len(train)))
            predictions[test] = knn.fit(features[train], labels[train]).predict(features[test])
    return predictions


def scores(labels: np.ndarray, predictions: np.ndarray, seen: np.ndarray | None = None) -> dict:
    """Accuracy and macro-F1 over all cells, and (given ``seen``) over the cells seen / unseen in pretraining."""
    from sklearn.metrics import accuracy_score, f1_score

    def pair(rows):
        if not rows.any():
            return {"accuracy": float("nan"), "macro_f1": float("nan"), "n_cells": 0}
        return {"accuracy": float(accuracy_score(labels[rows], predictions[rows])),
                "macro_f1": float(f1_score(labels[rows], predictions[rows], average="macro")),
                "n_cells": int(rows.sum())}

    out = pair(np.ones(len(labels), dtype=bool))
    if seen is not None:
        out["seen"], out["unseen"] = pair(seen), pair(~seen)
    return out


def knn_scores(features: np.ndarray, labels: np.ndarray, k: int, folds: int, seed: int,
               seen: np.ndarray | None = None) -> dict:
    return scores(labels, knn_predictions(features, labels, k, folds, seed), seen)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    folders, eval_folders, left_out = tokenize_all(Path(args.data_dir), out, args)
    timings["tokenize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = pretrain(args, folders, out)
    timings["pretrain_wall_s"] = time.perf_counter() - t0

    from accelerate import Accelerator

    import modeling
    from pretrain.data import CellDataset, ExpressCollator, LengthGroupedBatchSampler, load_corpus
    from pretrain.objectives import evaluate, make_collator
    from pretrain.run import PretrainArgs
    from tokenizer import TokenizedCells

    # held-out MLM / MCV metrics on exactly the cells and masks the run evaluated
    train_args = json.loads((Path(result["final_dir"]) / "training_args.json").read_text())
    run = PretrainArgs(**train_args)
    corpus = load_corpus(run.dataset, eval_fraction=run.eval_fraction, seed=run.seed,
                         max_eval_cells=run.max_eval_cells, require_counts=True)
    torch.manual_seed(args.seed)
    pretrained = modeling.ExpressForMaskedModeling.from_pretrained(result["final_dir"])
    random_model = modeling.ExpressForMaskedModeling(pretrained.config)  # same architecture, fresh weights
    random_model.set_gene_statistics(corpus.vocab.token_zero_fraction, corpus.vocab.token_group_ids)
    models = {"pretrained": pretrained, "random weights": random_model}
    sampler = LengthGroupedBatchSampler(corpus.eval.lengths, 64, seed=run.seed + 1, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(corpus.eval, batch_sampler=sampler,
                                         collate_fn=make_collator(corpus.vocab, corpus.specs, run.objective_list,
                                                                  mlm_probability=run.mlm_probability,
                                                                  mcv_input_fraction=run.mcv_input_fraction,
                                                                  seed=run.seed + 1))
    accelerator = Accelerator(cpu=True)
    held_out = {name: evaluate(m, loader, accelerator, run.objective_list) for name, m in models.items()}

    # kNN cell types on frozen embeddings vs PCA
    t0 = time.perf_counter()
    plain = ExpressCollator(corpus.vocab, mlm_probability=0.0, pad_to_multiple_of=8)
    knn: dict[str, dict] = {}
    rng = np.random.default_rng(args.seed)
    for index, folder in enumerate(folders):
        stem = folder.name
        if stem not in LABELLED:
            continue
        # cells seen in pretraining: the training rows of this dataset's pretraining folder, by cell id
        seen_ids = set(np.asarray(corpus.parts[index].dataset.select(corpus.train.rows[index].tolist())["cell_id"],
                                  dtype=object).tolist())
        part = corpus.parts[index] if eval_folders[stem] == folder else TokenizedCells.load(eval_folders[stem])
        ds = part.dataset
        labels_all = np.asarray(ds[LABELLED[stem]], dtype=object).astype(str)
        keep = np.flatnonzero(~np.isin(np.char.lower(labels_all.astype(str)), list(NOT_A_LABEL)))
        if len(keep) > args.knn_max_cells:
            keep = np.sort(rng.choice(keep, args.knn_max_cells, replace=False))
        labels = labels_all[keep]
        cell_ids = np.asarray(ds.select(keep.tolist())["cell_id"], dtype=object)
        seen = np.array([c in seen_ids for c in cell_ids], dtype=bool)
        cells = CellDataset([part.dataset], [keep])
        rows = {}
        for name, model in models.items():
            cls_emb, mean_emb = embed(model.express, cells, plain)
            rows[f"{name} <cls>"] = knn_scores(cls_emb, labels, args.knn_k, args.folds, args.seed, seen)
            rows[f"{name} mean"] = knn_scores(mean_emb, labels, args.knn_k, args.folds, args.seed, seen)
        source = Path(args.data_dir) / f"{stem}.h5ad" if stem != "pbmc68k_counts" else out / "inputs" / f"{stem}.h5ad"
        rows["PCA (50) of log-normalised HVGs"] = knn_scores(pca_features(source, cell_ids, args.seed), labels,
                                                             args.knn_k, args.folds, args.seed, seen)
        knn[stem] = {"n_cells": int(len(keep)), "n_types": int(len(set(labels))), "n_seen": int(seen.sum()),
                     "n_unseen": int((~seen).sum()), "scores": rows}
    timings["knn_s"] = time.perf_counter() - t0

    report = {
        "command": "python scripts/bench_pretrain.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("overwrite", "corpus_changed")),
        "budget_minutes": args.budget_minutes,
        "steps": result.get("step"), "planned_steps": result.get("planned_steps"),
        "calibration_seconds_per_step": result.get("calibration_seconds_per_step"),
        "train_seconds": result.get("train_seconds"),
        "model": {k: getattr(pretrained.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "n_parameters": sum(p.numel() for p in pretrained.parameters()),
        "train_cells": len(corpus.train), "held_out_cells": len(corpus.eval),
        "exclude_finetune_test_cells": args.exclude_finetune_test_cells, "left_out_of_pretraining": left_out,
        "held_out": held_out, "knn": knn, "timings_s": timings, "torch_threads": torch.get_num_threads(),
    }
    (out / "bench_pretrain.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (out / "bench_pretrain.md").write_text(table)
    print(table)
    return report


def render(report: dict) -> str:
    lines = [f"Pretraining: {report['steps']} steps in {report['budget_minutes']} min budget "
             f"({report['n_parameters']:,} parameters, {report['train_cells']} training cells, "
             f"{report['held_out_cells']} held out)", "",
             "| held-out | MLM accuracy | MLM loss | MCV NLL (nats/count) |", "|---|---|---|---|"]
    for name, m in report["held_out"].items():
        lines.append(f"| {name} | {m.get('eval/mlm_accuracy', float('nan')):.4f} | "
                     f"{m.get('eval/mlm_loss', float('nan')):.4f} | {m.get('eval/mcv_nll', float('nan')):.4f} |")
    lines += ["", "kNN (k=15, 5-fold) cell-type accuracy / macro-F1 of frozen embeddings", ""]
    datasets = list(report["knn"])
    lines.append("| embedding | " + " | ".join(f"{d} ({report['knn'][d]['n_cells']} cells, "
                                               f"{report['knn'][d]['n_types']} types)" for d in datasets) + " |")
    lines.append("|---" * (len(datasets) + 1) + "|")
    methods = list(next(iter(report["knn"].values()))["scores"]) if datasets else []
    for method in methods:
        cells = [report["knn"][d]["scores"][method] for d in datasets]
        lines.append(f"| {method} | " + " | ".join(f"{c['accuracy']:.3f} / {c['macro_f1']:.3f}" for c in cells) + " |")
    split = [d for d in datasets if "unseen" in report["knn"][d]["scores"][methods[0]]] if methods else []
    if split:
        lines += ["", "The same out-of-fold kNN predictions, scored separately on cells seen (unlabelled) in pretraining "
                  "and on cells unseen (left-out fine-tuning test cells and the held-out split)", "",
                  "| embedding | " + " | ".join(f"{d} {part} ({report['knn'][d]['n_' + part]})" for d in split
                                               for part in ("seen", "unseen")) + " |",
                  "|---" * (2 * len(split) + 1) + "|"]
        for method in methods:
            cells = [report["knn"][d]["scores"][method][part] for d in split for part in ("seen", "unseen")]
            lines.append(f"| {method} | " + " | ".join(f"{c['accuracy']:.3f} / {c['macro_f1']:.3f}" for c in cells)
                         + " |")
    if report.get("left_out_of_pretraining"):
        lines += ["", "Left out of pretraining (fine-tuning test cells): " + ", ".join(
            f"{stem} {v['n_left_out']} of {v['n_cells']}" for stem, v in report["left_out_of_pretraining"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
