"""The fine-tuning loop and batched prediction, shared by ``finetune/run.py`` and the Python API.

A plain ``accelerate`` loop: ``accelerator.prepare``, ``accelerator.backward``, gradient clipping, the shared AdamW
and warmup/cosine schedule of :mod:`pretrain.training`, and a KL warm-up for the VAE's ELBO.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from modeling.modeling_vae import ExpressForCellTypes, ExpressForProteinRegression, ExpressForVAE
from pretrain.training import build_optimizer, build_scheduler

from .data import CellTable, TableCollator, TableDataset, normalize_proteins

logger = logging.getLogger(__name__)

TASKS = ("cell-type", "vae", "adt")
CLASS_WEIGHTINGS = ("none", "balanced", "sqrt")
ENCODER_KEYS = ("input_ids", "values", "is_zero", "attention_mask", "log_counts")


@dataclass
class TrainSettings:
    """Optimisation settings of one fine-tuning run."""

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    encoder_lr: float | None = None  # learning rate of the encoder (default: lr / 10 if pretrained, else lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    objective: str = "elbo"
    n_samples: int = 1
    dreg: bool = True
    kl_warmup_ratio: float = 0.3
    classification_weight: float = 50.0  # scANVI's classification ratio
    validation_fraction: float = 0.1  # training cells held back to pick the best epoch (0: keep the last epoch)
    # cell-type classifier only: per-class loss weights from the training labels -- "balanced" (n / (C * n_c), every
    # class counts as much as any other, as macro-F1 does), "sqrt" (its square root: a milder push to small classes)
    # or "none" -- and label smoothing of the cross-entropy
    class_weighting: str = "none"
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def model_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, train: bool) -> dict[str, Any]:
    """The entries of a collated batch the given head reads."""
    inputs = {k: batch[k] for k in ENCODER_KEYS if k in batch}
    if isinstance(model, ExpressForCellTypes):
        return {**inputs, "labels": batch["labels"]} if train else inputs
    if isinstance(model, ExpressForProteinRegression):
        return {**inputs, "protein_targets": batch["protein_targets"]} if train else inputs
    if isinstance(model, ExpressForVAE):
        extra = {k: batch[k] for k in ("counts", "library", "batch_index") if k in batch}
        if train:
            extra["labels"] = batch["labels"]
            if model.vae.protein_decoder is not None:
                extra["proteins"] = batch["proteins"]
        return {**inputs, **extra}
    raise TypeError(f"not a fine-tuning head: {type(model).__name__}")


def _loader(table: CellTable, batch_size: int, token_collator, *, shuffle: bool, seed: int,
            indices: np.ndarray | None = None):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        TableDataset(table, indices), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=TableCollator(table, token_collator), drop_last=False,
    )


def split_validation(n_cells: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Training and validation cell indices (no validation set when it would hold fewer than 10 cells)."""
    n_val = int(round(fraction * n_cells))
    if fraction <= 0 or n_val < 10 or n_cells - n_val < 10:
        return np.arange(n_cells), None
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def class_weights(labels: np.ndarray, n_classes: int, method: str) -> torch.Tensor | None:
    """Per-class loss weights from the training cells' labels (-100 = unlabelled, ignored): ``"balanced"`` gives
    class ``c`` the weight ``n / (C * n_c)`` (every class weighs as much in the loss as any other), ``"sqrt"`` its
    square root, ``"none"`` returns None. Classes without a training cell get weight 0 (they cannot occur)."""
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    if method == "none":
        return None
    counts = np.bincount(labels[labels >= 0], minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    if method == "sqrt":
        weights = np.sqrt(weights)
    return torch.tensor(weights, dtype=torch.float32)


def _step_kwargs(model, batch, settings: TrainSettings, *, kl_weight: float, n_obs: int,
                 weights: torch.Tensor | None = None) -> dict[str, Any]:
    kwargs = model_kwargs(model, batch, train=True)
    if isinstance(model, ExpressForVAE):
        kwargs.update(objective=settings.objective, n_samples=settings.n_samples, dreg=settings.dreg,
                      kl_weight=kl_weight, classification_weight=settings.classification_weight, n_obs=n_obs)
    elif isinstance(model, ExpressForCellTypes):
        kwargs.update(class_weights=weights, label_smoothing=settings.label_smoothing)
    return kwargs


@torch.no_grad()
def _validation_loss(model, loader, settings: TrainSettings, device, n_obs: int, epoch: int,
                     weights: torch.Tensor | None = None) -> float:
    model.eval()
    total, count = 0.0, 0
    # a private, seeded random stream: every process draws the same VAE samples, so all pick the same best epoch
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed + epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**_step_kwargs(model, batch, settings, kl_weight=1.0, n_obs=n_obs, weights=weights))
            if out.loss is not None:
                n = len(batch["batch_index"])
                total, count = total + float(out.loss) * n, count + n
    model.train()
    return total / count if count else float("nan")




def fit(
    model: torch.nn.Module, table: CellTable, settings: TrainSettings, *, token_collator=None,
    accelerator: Accelerator | None = None, progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` on every cell of ``table``; returns one record per epoch (mean loss, and the mean bound for
    the VAE)."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    train_idx, val_idx = split_validation(len(table), settings.validation_fraction, settings.seed)
    loader = _loader(table, settings.batch_size, token_collator, shuffle=True, seed=settings.seed, indices=train_idx)
    val_loader = None if val_idx is None else \
        _loader(table, 256, token_collator, shuffle=False, seed=settings.seed, indices=val_idx)
    steps_per_epoch = max(math.ceil(len(loader) / accelerator.num_processes), 1)  # each process sees a shard
    total = settings.max_steps or settings.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    encoder_lr = settings.encoder_lr
    if encoder_lr is None:  # a pretrained encoder moves slower than freshly initialised heads
        encoder_lr = settings.lr / 10 if getattr(model, "pretrained_encoder", False) else settings.lr
    optimizer = _build_optimizer(model, settings.lr, encoder_lr, settings.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=int(settings.warmup_ratio * total))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw_model = accelerator.unwrap_model(model)
    device = next(raw_model.parameters()).device
    is_vae = isinstance(raw_model, ExpressForVAE)
    weights = None
    if isinstance(raw_model, ExpressForCellTypes):
        weights = class_weights(table.labels[train_idx], raw_model.config.num_labels, settings.class_weighting)
    kl_steps = max(int(settings.kl_warmup_ratio * total), 1)
    history: list[dict[str, float]] = []
    best_loss, best_state, best_epoch = math.inf, None, None
    step = 0
    # disable=None: a bar on a terminal only, not in log files
    bar = tqdm(total=total, desc="fine-tuning", disable=None if progress and accelerator.is_main_process else True,
               leave=False)
    model.train()
    for epoch in range(epochs):
        losses, bounds = [], []
        for batch in loader:
            kl_weight = min(1.0, (step + 1) / kl_steps) if settings.objective == "elbo" else 1.0
            out = model(**_step_kwargs(raw_model, batch, settings, kl_weight=kl_weight, n_obs=len(train_idx),
                                       weights=weights))
            if out.loss is None:
                continue  # e.g. a batch without any labelled cell for the classifier
            accelerator.backward(out.loss)
            if settings.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if is_vae:
                bounds.append(float(out.bound.mean()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if step >= total:
                break
        record = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else float("nan")}
        if bounds:
            record["bound"] = float(np.mean(bounds))
        # pick the best epoch on held-back training cells; for the VAE only once the KL weight has reached 1
        if val_loader is not None and (not is_vae or step >= kl_steps):
            record["validation_loss"] = _validation_loss(raw_model, val_loader, settings, device, len(train_idx),
                                                         epoch, weights)
            if record["validation_loss"] < best_loss:
                best_loss, best_epoch = record["validation_loss"], epoch + 1
                best_state = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}
        history.append(record)
        logger.info("epoch %d: %s", epoch + 1, record)
        if step >= total:
            break
    bar.close()
    if best_state is not None:
        raw_model.load_state_dict(best_state)
        logger.info("kept epoch %d (lowest validation loss %.4g)", best_epoch, best_loss)
        history.append({"best_epoch": best_epoch, "validation_loss": best_loss})
    model.eval()
    return history


def _build_optimizer(model: torch.nn.Module, lr: float, encoder_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The shared AdamW (:func:`pretrain.training.build_optimizer`), with the encoder's groups at ``encoder_lr``."""
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay)
    if encoder_lr == lr:
        return optimizer
    encoder_params = {id(p) for p in model.express.parameters()}
    groups = []
    for group in optimizer.param_groups:
        enc = [p for p in group["params"] if id(p) in encoder_params]
        head = [p for p in group["params"] if id(p) not in encoder_params]
        for params, group_lr in ((enc, encoder_lr), (head, lr)):
            if params:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params,
                               "lr": group_lr, "initial_lr": group_lr})
    defaults = optimizer.defaults
    return torch.optim.AdamW(groups, lr=lr, betas=defaults["betas"], eps=defaults["eps"])


@torch.no_grad()
def predict(
    model: torch.nn.Module, table: CellTable, *, token_collator=None, batch_size: int = 256,
    protein_samples: int = 64, mll_samples: int = 0, seed: int = 0, accelerator: Accelerator | None = None,
) -> dict[str, np.ndarray]:
    """Batched outputs for every cell: ``embedding`` (the encoder's, or the VAE's posterior mean), ``probabilities``
    (classifiers), ``proteins`` (normalised protein predictions) and ``marginal_log_likelihood`` (VAE, when
    ``mll_samples`` > 0)."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    model = accelerator.unwrap_model(model)
    model.eval()
    device = next(model.parameters()).device
    loader = _loader(table, batch_size, token_collator, shuffle=False, seed=seed)
    out: dict[str, list[np.ndarray]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        out.setdefault(name, []).append(value.detach().float().cpu().numpy())

    settings = model.settings
    # sampling (posterior-predictive proteins, importance samples) from a private seeded stream: reproducible
    # predictions that leave the caller's random state alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc="predicting", leave=False, disable=None if len(loader) >= 10 else True):
            _predict_batch(model, batch, device, settings, add, protein_samples, mll_samples)
    return {k: np.concatenate(v) for k, v in out.items()}


def _predict_batch(model, batch, device, settings, add, protein_samples: int, mll_samples: int) -> None:
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in model_kwargs(model, batch, train=False).items() if k in ENCODER_KEYS}
    if isinstance(model, ExpressForVAE):
        loc, log_probs = model.latent(**inputs)
        add("embedding", loc)
        if log_probs is not None:
            add("probabilities", log_probs.exp())
        if model.vae.protein_decoder is not None:
            samples = model.sample_proteins(batch.get("batch_index"), protein_samples, **inputs)
            normalised = normalize_proteins(samples.cpu().numpy(), settings.protein_norm,
                                            settings.protein_reference or None)
            add("proteins", torch.from_numpy(normalised.mean(0)))
        if mll_samples and "counts" in batch:
            add("marginal_log_likelihood", model.marginal_log_likelihood(
                batch["counts"], batch["library"], batch.get("batch_index"), mll_samples, **inputs))
    else:
        add("embedding", model.embed(**inputs))
        if isinstance(model, ExpressForCellTypes):
            add("probabilities", torch.softmax(model(**inputs).logits.float(), -1))
        else:
            add("proteins", model(**inputs).predictions)
