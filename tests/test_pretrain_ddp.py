"""Real 2-process DDP on CPU (gloo): ``accelerate launch --multi_gpu --num_processes 2 pretrain/run.py`` with the
script creating ``Accelerator(cpu=True)`` because no GPU is present."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pretrain.run import PretrainArgs, main
from test_pretrain_data import make_tokenized_dataset, make_vocab

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "6", "--per_device_batch_size", "4", "--dropout", "0", "--objectives", "mlm,mcv",
        "--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "64", "--eval_steps", "3",
        "--save_steps", "3", "--logging_steps", "1", "--report_to", "none", "--no_progress_bar",
        "--write_rank_report", "--eval_fraction", "0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_on_different_cells(tmp_path):
    vocab = make_vocab(60)
    data = [make_tokenized_dataset(tmp_path / "a", n_cells=50, vocab=vocab, seed=1),
            make_tokenized_dataset(tmp_path / "b", n_cells=30, vocab=vocab, seed=2)]
    dataset_args = [a for d in data for a in ("--dataset", str(d))]
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(REPO / "pretrain" / "run.py"),
               *dataset_args, "--output_dir", str(out), *ARGS]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((out / "rank_reports" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]  # really two processes ...
    assert all("MULTI_CPU" in r["backend"] for r in reports)  # ... in gloo DDP
    assert reports[0]["param_sha256"] == reports[1]["param_sha256"]  # identical parameters on every rank
    cells = [[tuple(c) for c in r["cells"]] for r in reports]
    assert len(cells[0]) == len(cells[1]) == 6 * 4
    assert not set(cells[0]) & set(cells[1])  # every cell of the epoch on one rank only

    # one process with the same global batch: 4 cells x 2 accumulated micro-batches per step
    torch.set_num_threads(1)
    from pretrain.args import parse_args

    args = parse_args(PretrainArgs, [*dataset_args, "--output_dir", str(tmp_path / "single"), *ARGS,
                                     "--gradient_accumulation_steps", "2"])
    main(args)
    single = json.loads((tmp_path / "single" / "rank_reports" / "rank0.json").read_text())
    # the same micro-batches: rank r's k-th batch is the single process's micro-batch 2k + r
    batches = [[tuple(c) for c in single["cells"][i:i + 4]] for i in range(0, len(single["cells"]), 4)]
    assert batches[0::2] == [cells[0][i:i + 4] for i in range(0, 24, 4)]
    assert batches[1::2] == [cells[1][i:i + 4] for i in range(0, 24, 4)]

    ddp = safetensors.torch.load_file(str(out / "final" / "model.safetensors"))
    one = safetensors.torch.load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert ddp.keys() == one.keys()
    # Same data, masks, MCV splits and loss scaling. DDP sums the two ranks' gradients and halves the sum;
    # accumulation adds two gradients of losses scaled by 1/2. With two terms these agree exactly (scaling by 2 is
    # exact and a + b = b + a), and we measure a difference of 0. The tolerance covers gloo builds or bucketings
    # that sum in another association (more ranks), ~1e-7 relative per step, which Adam carries at most at the
    # scale of the learning rate per step.
    worst = max((ddp[k].double() - one[k].double()).abs().max().item() for k in ddp)
    print(f"largest weight difference DDP vs one process: {worst:.3e}")
    assert worst < 1e-5, worst
    ddp_metrics = json.loads((out / "final" / "metrics.json").read_text())
    one_metrics = json.loads((tmp_path / "single" / "final" / "metrics.json").read_text())
    assert ddp_metrics["eval/mlm_loss"] == pytest.approx(one_metrics["eval/mlm_loss"], abs=1e-4)
