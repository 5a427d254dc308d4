"""Choose cell-type training settings by cross-validation over groups (donors, batches) of the TRAINING cells only.

The held-out test groups of a benchmark split are dropped before anything is read, so a setting picked here never
saw them. Each arm is the express MLP-encoder head with the given keyword arguments of ``finetune.api.fit_cell_types``
(or ``--baseline`` for L1 logistic regression on log-normalised HVGs); every arm is scored on the same folds. Appends
one JSON line per (arm, fold, seed) to ``--out`` and prints mean ± sd macro-F1 per arm.

Kang 2018, six training donors in three folds (what the README reports)::

    python scripts/cv_celltype.py --data ../shared/data/kang2018_pbmc_12261.h5ad --group_key donor \\
        --drop 1244 1256 --folds 1015 1488,107 1016,101,1039 --out runs/kang_cv.jsonl \\
        --baseline --arm default '{"epochs": 15}' --arm one_layer '{"epochs": 15, "head": {"head_dropout": 0.3, "mlp_layers": 1}}'
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True, help="raw-count h5ad")
    p.add_argument("--label_key", default="cell_type")
    p.add_argument("--group_key", required=True, help="obs column of the groups folds are made of (e.g. donor)")
    p.add_argument("--drop", nargs="*", default=[], help="groups never read (the benchmark's test groups)")
    p.add_argument("--folds", nargs="+", required=True,
                   help="one entry per fold: the comma-separated groups it validates on")
    p.add_argument("--arm", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                   help="an arm: name and fit_cell_types keyword arguments as JSON (repeatable)")
    p.add_argument("--baseline", action="store_true", help="also score L1 logistic regression")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n_top_genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON-lines file results are appended to")
    args = p.parse_args(argv)
    if not args.arm and not args.baseline:
        p.error("give at least one --arm or --baseline")
    return args


def group_folds(groups: np.ndarray, folds: list[str], drop: list[str]) -> list[np.ndarray]:
    """Boolean validation masks, one per fold. Every fold's groups must exist, no group may be in two folds, and no
    fold may name a dropped group."""
    present = set(groups.tolist())
    seen: set[str] = set()
    masks = []
    for i, spec in enumerate(folds):
        names = [g.strip() for g in spec.split(",") if g.strip()]
        for g in names:
            if g in drop:
                raise ValueError(f"fold {i} names {g!r}, which is a dropped (test) group")
            if g not in present:
                raise ValueError(f"fold {i} names group {g!r}, absent from the data (groups: {sorted(present)})")
            if g in seen:
                raise ValueError(f"group {g!r} is in more than one fold")
            seen.add(g)
        masks.append(np.isin(groups, names))
    return masks


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse(argv)
    import anndata as ad
    import torch

    from finetune import api
    from finetune import baselines as B
    from finetune import metrics as M

    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    if args.group_key not in adata.obs.columns:
        raise SystemExit(f"{args.data}: no obs column {args.group_key!r} (columns: {list(adata.obs.columns)})")
    groups_all = adata.obs[args.group_key].astype(str).to_numpy()
    adata = adata[~np.isin(groups_all, args.drop)].copy()  # the test groups are gone before any fold is built
    groups = adata.obs[args.group_key].astype(str).to_numpy()
    masks = group_folds(groups, args.folds, args.drop)
    arms = [(name, json.loads(kw)) for name, kw in args.arm]
    if args.baseline:
        arms.insert(0, ("l1_logistic_regression", None))
    scores: dict[str, list[float]] = {name: [] for name, _ in arms}
    for fold, val in enumerate(masks):
        train, test = adata[~val].copy(), adata[val].copy()
        y_train = train.obs[args.label_key].astype(str).to_numpy()
        truth = test.obs[args.label_key].astype(str).to_numpy()
        for name, kw in arms:
            for seed in args.seeds:
                t0 = time.perf_counter()
                if kw is None:
                    x_train, x_test, _ = B.log_normalized_features(train, test, n_top_genes=args.n_top_genes)
                    pred = B.l1_logistic_regression(x_train, y_train, x_test, seed=seed)
                else:
                    model = api.fit_cell_types(train, encoder="mlp", label_key=args.label_key, seed=seed,
                                               n_top_genes=args.n_top_genes, **kw)
                    pred = api.predict_cell_types(test.copy(), model).astype(str).to_numpy()
                record = {"arm": name, "kwargs": kw, "fold": fold, "validation_groups": args.folds[fold],
                          "seed": seed, "n_train": int(train.n_obs), "n_validation": int(test.n_obs),
                          "accuracy": M.accuracy(truth, pred), "macro_f1": M.macro_f1(truth, pred),
                          "seconds": time.perf_counter() - t0}
                scores[name].append(record["macro_f1"])
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{name} fold {fold} seed {seed}: macro-F1 {record['macro_f1']:.3f}", flush=True)
    print("\n| arm | macro-F1 (mean ± sd over folds x seeds) |\n|---|---|")
    for name, values in sorted(scores.items(), key=lambda kv: -np.mean(kv[1])):
        sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
        print(f"| {name} | {np.mean(values):.3f} ± {sd:.3f} |")
    return scores


if __name__ == "__main__":
    main()
