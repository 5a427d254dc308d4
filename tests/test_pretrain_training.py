"""Shared training pieces: dataclass -> CLI with config files (HfArgumentParser), schedules, optimizer groups,
random states and atomic, verified checkpoints."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import math

import pytest
import torch

from accelerate.utils import set_seed

from pretrain.args import parse_args
from pretrain.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from pretrain.loop import build_optimizer, build_scheduler, rng_state, set_rng_state
from tokenizer.errors import InputError
from tokenizer.output import staged_dir


@dataclass
class ToyArgs:
    """Toy arguments."""

    dataset: list[str] = field(default_factory=list, metadata={"help": "dataset folders", "action": "extend"})
    output_dir: str = field(default="out", metadata={"help": "where to write"})
    max_steps: int = 10
    learning_rate: float = 1e-3
    resume: bool = False
    eval_steps: int | None = None
    schedule: Literal["cosine", "linear"] = "cosine"
    weights: list[float] | None = None


def test_cli_flags_aliases_lists_and_booleans():
    args = parse_args(ToyArgs, ["--dataset", "a", "--dataset", "b", "c", "--max-steps", "7", "--resume",
                                "--weights", "1", "2.5"])
    assert args.dataset == ["a", "b", "c"] and args.max_steps == 7 and args.resume is True
    assert args.eval_steps is None and args.weights == [1.0, 2.5] and args.schedule == "cosine"
    defaults = parse_args(ToyArgs, [])
    assert defaults == ToyArgs()
    assert parse_args(ToyArgs, ["--resume", "false", "--eval-steps", "3"]) == ToyArgs(eval_steps=3)
    with pytest.raises(SystemExit):
        parse_args(ToyArgs, ["--schedule", "exponential"])


def test_config_files_json_and_yaml_with_cli_precedence(tmp_path):
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({"max-steps": 20, "dataset": ["x", "y"], "learning_rate": 0.01, "resume": True}))
    args = parse_args(ToyArgs, ["--config", str(json_file), "--max_steps", "5"])
    assert (args.max_steps, args.dataset, args.learning_rate, args.resume) == (5, ["x", "y"], 0.01, True)
    assert parse_args(ToyArgs, ["--config", str(json_file), "--dataset", "z"]).dataset == ["z"]
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("dataset: only\nschedule: linear\noutput_dir: elsewhere\n")
    args = parse_args(ToyArgs, ["--config", str(yaml_file)])
    assert (args.dataset, args.schedule, args.output_dir) == (["only"], "linear", "elsewhere")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_stepz": 3}))
    with pytest.raises(SystemExit):
        parse_args(ToyArgs, ["--config", str(bad)])
    with pytest.raises(InputError, match="does not exist"):
        parse_args(ToyArgs, ["--config", str(tmp_path / "missing.yaml")])


def _lr_curve(steps: int, **kwargs) -> list[float]:
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=1.0)
    scheduler = build_scheduler(optimizer, **kwargs)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_learning_rate_schedules():
    cosine = _lr_curve(111, warmup_steps=10, total_steps=110)
    assert cosine[0] == 0.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(1.0)
    assert cosine[60] == pytest.approx(0.5)  # cosine half way through the decay
    assert cosine[110] == pytest.approx(0.0, abs=1e-12)
    floor = _lr_curve(111, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert floor[110] == pytest.approx(0.1) and floor[60] == pytest.approx(0.55)
    assert _lr_curve(36, warmup_steps=10, total_steps=110, kind="linear")[35] == pytest.approx(0.75)
    assert _lr_curve(36, warmup_steps=10, total_steps=110, kind="constant")[35] == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler(build_optimizer(torch.nn.Linear(2, 2), lr=0.1), total_steps=10, kind="step")


def test_time_budgeted_schedule_follows_the_clock_or_the_steps_whichever_is_further():
    seconds = [0.0]
    optimizer = build_optimizer(torch.nn.Linear(2, 2), lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=1000, warmup_steps=100, min_lr_ratio=0.1,
                                budget_seconds=60.0, clock=lambda: seconds[0])
    lrs = []
    for step in range(1, 21):
        seconds[0] = 3.0 * step  # 3 s per step: the 60 s budget ends at step 20, long before step 1000
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # warmup is the first 10% of the progress (6 s = step 2), the cosine decay ends at the budget, at the floor
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (33 / 60 - 0.1) / 0.9)))
    assert lrs[-1] == pytest.approx(0.1)
    # with a slow clock the steps lead, as without a budget
    seconds[0] = 0.0
    steps_led = build_scheduler(build_optimizer(torch.nn.Linear(2, 2), lr=1.0), total_steps=110, warmup_steps=10,
                                budget_seconds=1e9, clock=lambda: 0.0)
    for _ in range(60):
        steps_led.optimizer.step()
        steps_led.step()
    assert steps_led.get_last_lr()[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clock"):
        build_scheduler(optimizer, total_steps=10, budget_seconds=5.0)


def test_optimizer_groups_and_encoder_learning_rate():
    from modeling import ExpressConfig, ExpressForCellClassification

    config = ExpressConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, num_labels=3)
    model = ExpressForCellClassification(config)
    optimizer = build_optimizer(model, lr=1e-2, encoder_lr=1e-3)
    encoder = {id(p) for p in model.express.parameters()}
    for group in optimizer.param_groups:
        inside = {id(p) in encoder for p in group["params"]}
        assert len(inside) == 1 and group["lr"] == (1e-3 if inside.pop() else 1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_optimizer_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not optimizer.defaults.get("fused")  # CPU parameters: no fused kernel


def test_random_states_round_trip():
    set_seed(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = build_optimizer(model, lr=0.01)
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=2)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 3)
    set_seed(11)
    path = save_checkpoint(checkpoint_path(tmp_path, 3), model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 3}, rng_states=[rng_state()])
    assert (path / COMPLETE_MARKER).is_file() and latest_checkpoint(tmp_path) == path
    _train(model, optimizer, scheduler, 4)
    expected = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt, fresh_sched = _toy(seed=99)
    state, rng = load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state == {"step": 3} and fresh_sched.last_epoch == 3
    set_rng_state(rng)
    _train(fresh, fresh_opt, fresh_sched, 4)
    for a, b in zip(expected, fresh.parameters()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_is_refused_before_anything_is_loaded(tmp_path):
    model, optimizer, scheduler = _toy()
    path = save_checkpoint(checkpoint_path(tmp_path, 1), model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 1})
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    payload = bytearray(original)
    payload[-3] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(payload))
    other, other_opt, _ = _toy(seed=5)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match="model.safetensors does not match the checksum"):
        load_checkpoint(path, model=other, optimizer=other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    weights.write_bytes(original)
    (path / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="optimizer.pt has 9 bytes"):
        load_checkpoint(path, model=other)
    (path / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model=other)
    assert latest_checkpoint(tmp_path) is None


def test_failed_write_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "final"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_process_killed_mid_checkpoint_never_looks_complete(tmp_path):
    model, optimizer, scheduler = _toy()
    save_checkpoint(checkpoint_path(tmp_path, 2), model=model, optimizer=optimizer, scheduler=scheduler,
                    trainer_state={"step": 2})
    # a child process dies (os._exit: no cleanup, like SIGKILL) while writing checkpoint-4
    code = (
        "import os, sys, torch\n"
        "from pretrain.checkpoints import save_checkpoint\n"
        "model = torch.nn.Linear(2, 2)\n"
        "def die(tmp):\n"
        "    os._exit(9)\n"
        f"save_checkpoint({str(checkpoint_path(tmp_path, 4))!r}, model=model, trainer_state={{'step': 4}}, extra=die)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-4.tmp-")]
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-4").exists()
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)
    rotate_checkpoints(tmp_path, keep_last=2)  # the next save clears the leftover
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = _toy()
    for step in (1, 2, 3, 4):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, trainer_state={"step": step})
    (tmp_path / "checkpoint-5").mkdir()  # incomplete: neither kept nor counted
    rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 4)
