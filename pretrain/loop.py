"""The one training loop, shared by pretraining (``pretrain/run.py``) and fine-tuning (``finetune``).

A plain ``accelerate`` loop: per optimizer step, ``gradient_accumulation_steps`` micro-batches under
``accelerator.accumulate``, ``accelerator.backward``, ``accelerator.clip_grad_norm_``, AdamW (:func:`build_optimizer`)
and a warmup-then-decay schedule from ``transformers`` (:func:`build_scheduler`). The model is any express model:
``model(**batch)`` returns an output whose ``loss`` is trained, and whose other ``*_loss`` fields are logged.

What the caller chooses (:class:`LoopSettings`): the length of training, when to log, when to evaluate (a function of
the model returning metrics), whether to keep the state that scored best on a metric (fine-tuning's model selection),
and whether to write resumable checkpoints (pretraining). Batches come from a ``DataLoader`` whose batch sampler is a
:class:`~pretrain.data.LengthGroupedBatchSampler`: it shards batches across processes itself, and with the
collator's state and the random states in each checkpoint, ``resume_from`` continues a run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .checkpoints import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, random states
# ---------------------------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    encoder_lr: float | None = None, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norm scales and other vectors are not decayed).

    ``encoder_lr``: a learning rate of its own for the encoder's parameters (``model.base_model``, e.g. a pretrained
    transformer under a freshly initialised head). ``fused=None`` uses the fused CUDA kernel when every parameter is
    on a GPU.
    """
    base = getattr(model, "base_model", model)
    encoder = {id(p) for p in base.parameters()} if encoder_lr is not None and base is not model else set()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((param.ndim >= 2, id(param) in encoder), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for group in groups.values() for p in group]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    param_groups = [{"params": group, "weight_decay": weight_decay if decay else 0.0,
                     "lr": encoder_lr if in_encoder else lr}
                    for (decay, in_encoder), group in sorted(groups.items(), reverse=True)]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                    kind: Literal["cosine", "linear", "constant"] = "cosine", min_lr_ratio: float = 0.0,
                    budget_seconds: float | None = None, clock: Callable[[], float] | None = None
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then ``cosine`` or ``linear`` decay to ``min_lr_ratio`` of the peak at
    ``total_steps`` (``transformers``' warmup-stable-decay schedule with no stable phase), or ``constant``. Step it
    once per optimizer step.

    With a training-time budget (``budget_seconds``, and ``clock()`` the training seconds so far) the schedule runs
    on whichever is further along, the steps or the time: a run stopped by its budget ends its decay at the budget
    instead of being cut off at a high learning rate. Warmup is then the same share of that progress."""
    from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
    if budget_seconds is None or kind == "constant":
        if kind == "constant":
            return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
        warmup = min(warmup_steps, total_steps)
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=total_steps - warmup,
                                num_stable_steps=0, decay_type=kind, min_lr_ratio=min_lr_ratio)
    if clock is None or budget_seconds <= 0:
        raise ValueError("a time-budgeted schedule needs budget_seconds > 0 and a clock")
    warmup_share = min(warmup_steps, total_steps) / total_steps

    def factor(step: int) -> float:
        progress = min(max(step / total_steps, clock() / budget_seconds), 1.0)
        if progress < warmup_share:
            return progress / warmup_share
        decayed = (progress - warmup_share) / max(1.0 - warmup_share, 1e-12)
        shape = 0.5 * (1.0 + math.cos(math.pi * decayed)) if kind == "cosine" else 1.0 - decayed
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    """This process's global random states (Python, NumPy, torch CPU and CUDA), ready for ``torch.save``."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(accelerator, obj) -> list:
    """Every process's ``obj`` on every process (a list ordered by rank)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoopSettings:
    """How a model is trained: optimiser, schedule, and when to log, evaluate, select and save.

    ``eval_steps`` 0 evaluates at the end only. ``select_metric`` keeps (and at the end restores) the state whose
    evaluation scored best on that metric (``select_mode`` "min" or "max"), from ``select_from_step`` on.
    ``save_steps`` writes a resumable checkpoint every N steps and at the end (needs an output folder).
    ``max_train_minutes`` finishes once the training steps (evaluation and checkpoints not counted) took that long;
    ``stop_at_step`` leaves after that step with a checkpoint, without finishing (for job time limits).
    """

    max_steps: int
    learning_rate: float = 1e-3
    encoder_learning_rate: float | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    logging_steps: int = 10
    eval_steps: int = 0
    select_metric: str | None = None
    select_mode: Literal["min", "max"] = "min"
    select_from_step: int = 0
    save_steps: int | None = None
    save_total_limit: int | None = 2
    stop_at_step: int | None = None
    max_train_minutes: float | None = None
    torch_compile: bool = False
    progress_bar: bool = True
    description: str = "training"

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.logging_steps < 1 or self.eval_steps < 0:
            raise ValueError("max_steps and logging_steps must be >= 1 and eval_steps >= 0")
        if self.select_mode not in ("min", "max"):
            raise ValueError(f"select_mode must be 'min' or 'max', got {self.select_mode!r}")


@dataclass
class TrainResult:
    """What :func:`train` did: the last step, held-out metrics, history, and where things are."""

    step: int
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    train_seconds: float
    last_checkpoint: Path | None = None
    best: dict[str, Any] = field(default_factory=dict)  # {"step", metric: value} of the selected state
    finished: bool = True  # False when it left at stop_at_step


def _loss_fields(output: Any) -> list[str]:
    """The ``*_loss`` fields an output class declares (the same on every process, whatever this batch gave)."""
    return [f.name for f in dataclasses.fields(output) if f.name.endswith("_loss")] \
        if dataclasses.is_dataclass(output) else []


def train(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator,
    settings: LoopSettings,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    state_extra: Mapping[str, Any] | None = None,
    save_extra: Callable[[Path], None] | None = None,
    batch_hook: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    trackers: bool = False,
) -> TrainResult:
    """Train ``model`` on the batches of ``loader`` for ``settings.max_steps`` optimizer steps.

    Args:
        loader: a ``DataLoader`` with a :class:`~pretrain.data.LengthGroupedBatchSampler` as its batch sampler (it
            shards across processes; the loader is not passed to ``accelerator.prepare``).
        evaluate: metrics of the (unwrapped) model on held-out cells, called every ``eval_steps`` and at the end.
        output_dir: where ``checkpoint-<step>`` folders go (with ``settings.save_steps``).
        resume_from: a checkpoint to continue from exactly (same processes and batch sizes).
        state_extra: saved with every checkpoint's trainer state (e.g. the vocabulary fingerprint, the arguments).
        save_extra: writes further files into every checkpoint (e.g. the vocabulary).
        batch_hook: sees (and may change) every batch before the forward pass.
        trackers: log to the trackers the accelerator was set up with (``accelerator.init_trackers`` done).

    Returns the final model in place (the selected state with ``select_metric``) and a :class:`TrainResult`.
    """
    sampler = loader.batch_sampler
    collator = loader.collate_fn
    accumulation = accelerator.gradient_accumulation_steps
    if settings.save_steps and output_dir is None:
        raise ValueError("save_steps needs an output folder for the checkpoints")
    optimizer = build_optimizer(model, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_epsilon,
                                encoder_lr=settings.encoder_learning_rate, fused=accelerator.device.type == "cuda")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "log_history": [],
                             "world_size": accelerator.num_processes, "per_device_batch_size": sampler.batch_size,
                             "gradient_accumulation_steps": accumulation}
    # every process reads the same (averaged) training time, so a time-budgeted schedule stays in step under DDP
    shared_seconds = [0.0]
    budget = 60 * settings.max_train_minutes if settings.max_train_minutes is not None else None
    scheduler = build_scheduler(optimizer, total_steps=settings.max_steps, warmup_steps=settings.warmup_steps,
                                kind=settings.lr_scheduler, min_lr_ratio=settings.min_lr_ratio,
                                budget_seconds=budget, clock=lambda: shared_seconds[0])
    if resume_from is not None:
        loaded, rng = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                      rank=accelerator.process_index)
        for key in ("world_size", "per_device_batch_size", "gradient_accumulation_steps"):
            if loaded.get(key) != state[key]:
                raise CheckpointError(
                    f"{resume_from} was written with {key}={loaded.get(key)} but this run has {state[key]}; an exact "
                    "resume needs the same processes and batch sizes (or start a new run from its weights with "
                    f"--init_from {resume_from})"
                )
        state.update({k: loaded[k] for k in ("step", "epoch", "batch_in_epoch", "train_seconds", "log_history")})
        if "collator" in loaded and hasattr(collator, "load_state_dict"):
            collator.load_state_dict(loaded["collator"])
        if rng is None:
            raise CheckpointError(f"{resume_from} lacks the random state of process {accelerator.process_index}")
        set_rng_state(rng)
        shared_seconds[0] = state["train_seconds"]
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    raw_model = model
    if settings.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            sampler.set_epoch(state["epoch"], start_batch=state["batch_in_epoch"])
            for batch in loader:
                state["batch_in_epoch"] += 1
                yield batch
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    def save(step: int) -> Path:
        rngs = _gather_objects(accelerator, rng_state())
        model_state = accelerator.get_state_dict(model)
        path = checkpoint_path(output_dir, step)
        if accelerator.is_main_process:
            trainer_state = dict(state, **(state_extra or {}))
            if hasattr(collator, "state_dict"):
                trainer_state["collator"] = collator.state_dict()
            save_checkpoint(path, model=accelerator.unwrap_model(model), model_state_dict=model_state,
                            optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state, rng_states=rngs,
                            extra=save_extra)
            rotate_checkpoints(output_dir, settings.save_total_limit)
        accelerator.wait_for_everyone()
        return path

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.max_steps, initial=state["step"], desc=settings.description, dynamic_ncols=True,
               leave=False, disable=not (settings.progress_bar and accelerator.is_main_process) or None)
    stream = micro_batches()
    loss_names: list[str] = []
    window = torch.zeros(0, dtype=torch.float64, device=accelerator.device)
    window_start = time.perf_counter()
    last_saved = state["step"] if resume_from is not None else None
    last_good = Path(resume_from) if resume_from is not None else None
    metrics: dict[str, float] = {}
    best: dict[str, Any] = {}
    best_state: dict[str, torch.Tensor] | None = None
    grad_norm = torch.zeros(())
    finished = True
    model.train()
    while state["step"] < settings.max_steps:
        step_start = time.perf_counter()  # training time counts steps only, not evaluation or checkpoints
        step_sums = None
        for _ in range(accumulation):
            batch = next(stream)
            if batch_hook is not None:
                batch = batch_hook(batch)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                if not loss_names:  # loss, the declared loss parts, then tokens, cells and micro-batches
                    loss_names = ["loss", *_loss_fields(out)]
                    window = torch.zeros(len(loss_names) + 3, dtype=torch.float64, device=accelerator.device)
                parts = torch.stack([getattr(out, n).detach().double().reshape(()) if getattr(out, n) is not None
                                     else torch.zeros((), dtype=torch.float64, device=accelerator.device)
                                     for n in loss_names])
                step_sums = parts if step_sums is None else step_sums + parts
                mask = batch.get("attention_mask")
                window[-3] += mask.sum() if mask is not None else 0
                window[-2] += next(iter(batch.values())).shape[0]
                window[-1] += 1
                if accelerator.sync_gradients:
                    # one collective decision, so that every process stops together
                    bad = torch.tensor([0.0 if torch.isfinite(step_sums[0]) else 1.0,
                                        state["train_seconds"] + time.perf_counter() - step_start],
                                       dtype=torch.float64, device=accelerator.device)
                    if settings.max_grad_norm > 0:
                        bad[0] += 0.0 if torch.isfinite(torch.as_tensor(grad_norm)) else 1.0
                    bad = accelerator.reduce(bad, reduction="sum")
                    shared_seconds[0] = bad[1].item() / accelerator.num_processes
                    if bad[0].item() > 0:
                        bar.close()
                        raise NonFiniteLossError(
                            f"the loss became {step_sums[0].item() / accumulation} at step {state['step'] + 1}; "
                            "training stopped before that update. The last good checkpoint is "
                            f"{last_good or 'none (no checkpoint was written yet)'}. Try a lower learning rate, "
                            "gradient clipping or mixed precision off"
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        window[:len(loss_names)] += step_sums / accumulation
        state["train_seconds"] += time.perf_counter() - step_start
        bar.update(1)
        step = state["step"]

        if step % settings.logging_steps == 0 or step == settings.max_steps:
            totals = accelerator.reduce(window.clone(), reduction="sum")
            seconds = time.perf_counter() - window_start
            n_steps = max(totals[-1].item() / accelerator.num_processes / accumulation, 1e-9)
            record = {"step": step, "train/lr": scheduler.get_last_lr()[0],
                      "train/tokens_per_s": totals[-3].item() / seconds,
                      "train/cells_per_s": totals[-2].item() / seconds}
            for i, name in enumerate(loss_names):
                value = totals[i].item() / accelerator.num_processes / n_steps
                if name == "loss" or value != 0.0:
                    record[f"train/{name}"] = value
            if settings.max_grad_norm > 0:
                record["train/grad_norm"] = float(grad_norm)
            state["log_history"].append(record)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{record['train/loss']:.3f}", tok_s=f"{record['train/tokens_per_s']:.0f}",
                            cells_s=f"{record['train/cells_per_s']:.1f}")
            window.zero_()
            window_start = time.perf_counter()

        out_of_time = False
        if settings.max_train_minutes is not None:  # decided together: every process must leave at the same step
            out_of_time = shared_seconds[0] > budget
        at_end = step == settings.max_steps or out_of_time
        if evaluate is not None and ((settings.eval_steps and step % settings.eval_steps == 0) or at_end):
            # the bare module: a DDP forward may broadcast buffers, a collective that ranks evaluating different
            # numbers of batches would never join
            unwrapped = accelerator.unwrap_model(model)
            metrics = evaluate(unwrapped)
            unwrapped.train()
            state["log_history"].append({"step": step, **metrics})
            if trackers:
                accelerator.log(metrics, step=step)
            accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            name = settings.select_metric
            if name is not None and step >= settings.select_from_step and math.isfinite(metrics.get(name, math.nan)):
                sign = 1.0 if settings.select_mode == "min" else -1.0
                if not best or sign * metrics[name] < sign * best[name]:
                    best = {"step": step, name: metrics[name]}
                    best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if settings.save_steps and (step % settings.save_steps == 0 or at_end or step == settings.stop_at_step):
            last_good = save(step)
            last_saved = step
            window_start = time.perf_counter()
        if step == settings.stop_at_step and not at_end:
            finished = False
            break
        if out_of_time:
            accelerator.print(f"time budget of {settings.max_train_minutes} min reached at step {step}")
            break
    bar.close()
    if finished and settings.save_steps and last_saved != state["step"]:
        last_good = save(state["step"])
    if best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state)
        logger.info("kept the state of step %d (%s %.4g)", best["step"], settings.select_metric,
                    best[settings.select_metric])
    raw_model.eval()
    return TrainResult(step=state["step"], metrics=metrics, log_history=state["log_history"],
                       train_seconds=state["train_seconds"], last_checkpoint=last_good, best=best,
                       finished=finished)


# ---------------------------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, collator: Callable, *, batch_size: int = 256,
            seed: int = 0, fields: tuple[str, ...] | None = None, method: str | None = None,
            progress: bool = True, **method_kwargs: Any) -> dict[str, np.ndarray]:
    """Every cell's outputs in evaluation mode, batched: the tensor fields of ``model(**batch)`` with one row per cell
    (all of them, or ``fields``), as numpy arrays in dataset order. ``method`` calls ``getattr(model, method)(**batch,
    **method_kwargs)`` instead, which returns one tensor (``{method: array}``).

    Sampling (posterior draws, importance samples) comes from a private stream seeded with ``seed``: predictions are
    reproducible and leave the caller's random state alone.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    out: dict[str, list[np.ndarray]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc="predicting", leave=False, disable=None if progress and len(loader) >= 10
                          else True):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = next(iter(batch.values())).shape[0]
            if method is not None:
                result = {method: getattr(model, method)(**batch, **method_kwargs)}
            else:
                result = {k: v for k, v in model(**batch).items() if fields is None or k in fields}
            for name, value in result.items():
                if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
                    out.setdefault(name, []).append(value.detach().float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
