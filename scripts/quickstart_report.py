"""Print the quick start's results: pretraining metrics, and the fine-tuned cell-type classifier (the default, and the
transformer alone without its wide path) on the held-out 20% of the built-in data next to L1 logistic regression and
the majority class on the same split.

    python scripts/quickstart_report.py express_demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad

from finetune import baselines
from finetune import metrics as M


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", nargs="?", default="express_demo")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir)

    pretrain = json.loads((demo / "pretrain" / "final" / "metrics.json").read_text())
    print("pretraining (held-out cells):")
    for key in sorted(pretrain):
        if isinstance(pretrain[key], (int, float)):
            print(f"  {key:<28} {pretrain[key]:.4g}")

    adata = ad.read_h5ad(demo / "pbmc68k_counts.h5ad")
    train, test = adata[adata.obs["split"] == "train"].copy(), adata[adata.obs["split"] == "test"].copy()
    y_train = train.obs["cell_type"].astype(str).to_numpy()
    truth = test.obs["cell_type"].astype(str).to_numpy()
    x_train, x_test, _ = baselines.log_normalized_features(train, test)
    rows = {
        "express (pretrained, fine-tuned)": json.loads((demo / "celltype" / "metrics.json").read_text()),
        "  transformer alone (no wide path)": json.loads(
            (demo / "celltype_transformer" / "metrics.json").read_text()),
        "L1 logistic regression": {
            "accuracy": M.accuracy(truth, pred := baselines.l1_logistic_regression(x_train, y_train, x_test)),
            "macro_f1": M.macro_f1(truth, pred),
        },
        "majority class": {
            "accuracy": M.accuracy(truth, pred := baselines.majority_class(y_train, test.n_obs)),
            "macro_f1": M.macro_f1(truth, pred),
        },
    }
    print(f"\ncell types on the held-out 20% ({test.n_obs} cells, {len(set(truth))} types):")
    print(f"  {'method':<34} {'accuracy':>8} {'macro-F1':>8}")
    for name, m in rows.items():
        print(f"  {name:<34} {m['accuracy']:>8.3f} {m['macro_f1']:>8.3f}")
    print(f"\noutputs: {demo}/tokens (dataset), {demo}/pretrain/final (model), {demo}/celltype (metrics, plots, model; "
          f"{demo}/celltype_transformer without the wide path)")
    return rows


if __name__ == "__main__":
    main()
