"""What a pretraining run writes besides checkpoints: the loss curve, the model card, and the final model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizer.output import staged_dir, write_bytes

from .args import args_to_dict
from .data import Corpus
from .loop import TrainResult


def plot_loss_curve(history: list[dict], path: Path) -> None:
    """Training losses and held-out metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "train/loss" in h]
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "-"), ("train/mlm_loss", "--"), ("train/mcv_loss", ":"),
                       ("train/count_loss", "-.")):
        points = [(h["step"], h[key]) for h in train if key in h]
        if points:
            axes[0].plot(*zip(*points), style, label=key.split("/")[1])
    for key in ("eval/mlm_loss", "eval/mcv_nll", "eval/count_nll"):
        points = [(h["step"], h[key]) for h in evals if key in h]
        if points:
            axes[0].plot(*zip(*points), "o-", label=key)
    axes[0].set(xlabel="optimizer step", ylabel="loss", title="losses")
    axes[0].legend(fontsize=8)
    points = [(h["step"], h["eval/mlm_accuracy"]) for h in evals if "eval/mlm_accuracy" in h]
    if points:
        axes[1].plot(*zip(*points), "o-")
    axes[1].set(xlabel="optimizer step", ylabel="accuracy", title="held-out masked-gene accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_card(args: Any, corpus: Corpus, result: TrainResult, n_params: int, world_size: int) -> str:
    """The ``README.md`` of a pretrained model folder: what it is, how to load it, its data and held-out metrics."""
    datasets_table = "\n".join(
        f"| `{p.name}` | {len(p)} | {p.spec.top_k} | {p.spec.n_zeros} |" for p in corpus.parts
    )
    metrics_table = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(result.metrics.items()))
    return f"""---
library_name: transformers
tags: [single-cell, express, pretraining]
---

# express encoder pretrained with {args.objectives.replace(",", " + ")}

An `ExpressForMaskedModeling` model ({n_params:,} parameters, {result.step} optimizer steps) pretrained with
`pretrain/run.py`. This folder also holds its gene vocabulary (`vocab.json`, `gene_stats.parquet`, `stats.json`) and
how its corpus was tokenized (`tokenization.json`): `express-tokenize tokenize --stats THIS_FOLDER` tokenizes new
data the same way.

```python
import modeling  # registers the express classes with the transformers Auto classes
from transformers import AutoModel
model = AutoModel.from_pretrained("THIS_FOLDER")  # the encoder; AutoModelForMaskedLM for the pretraining heads
```

## Training data

Vocabulary fingerprint `{corpus.vocab.fingerprint()}` ({corpus.vocab.n_genes} genes).

| dataset | cells | top_k | sampled zeros |
|---|---|---|---|
{datasets_table}

## Held-out metrics (final)

{len(corpus.eval)} held-out cells. MLM accuracy counts masked detected genes
whose identity the model ranks first; MCV NLL is in nats per held-out count.

| metric | value |
|---|---|
{metrics_table}

## Training arguments

Processes: {world_size}; training time {result.train_seconds / 60:.1f} min.

```json
{json.dumps(args_to_dict(args), indent=2)}
```
"""


def write_final_model(final_dir: Path, model, corpus: Corpus, args: Any, result: TrainResult, n_params: int,
                      world_size: int, *, state_dict: dict | None = None) -> Path:
    """The ``from_pretrained`` folder of a finished run: weights and config, the vocabulary and the corpus's
    tokenization spec (``tokenization.json``, so new cells are tokenized the same way), the arguments, the final
    held-out metrics, the model card and the loss curve. Written to a temporary folder and renamed when complete."""
    plot_loss_curve(result.log_history, final_dir.parent / "loss_curve.png")
    with staged_dir(final_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        corpus.vocab.save(tmp)
        spec = corpus.shared_spec()
        if spec is not None:
            spec.save(tmp)
        write_bytes(tmp / "training_args.json", json.dumps(args_to_dict(args), indent=2).encode())
        write_bytes(tmp / "metrics.json", json.dumps({"step": result.step, **result.metrics}, indent=2).encode())
        write_bytes(tmp / "README.md", model_card(args, corpus, result, n_params, world_size).encode())
        write_bytes(tmp / "loss_curve.png", (final_dir.parent / "loss_curve.png").read_bytes())
    return final_dir
