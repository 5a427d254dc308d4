"""Training-step throughput and peak memory: ExpressForMaskedModeling (MLM only) vs transformers' BertForMaskedLM.

Both models get the same layers, hidden size, heads, intermediate size and vocabulary, and train on the same token
batches (cells of up to 307 tokens, most full length, 15% of gene tokens masked), interleaved step by step in one
process so machine noise hits both alike. Reported per shape: median step time, real (non-pad) tokens per second,
the Express / BERT ratio, and peak memory of a training step. With ``--device cuda`` also model FLOPs utilisation
(MFU = FLOPs the model's own algorithm needs on the real tokens / step time / peak FLOP/s).

Memory: on CUDA the allocator's peak during a step; on CPU the resident-set high-water mark of a child process that
runs the same steps for one model, minus its resident size before the first step (CPU has no allocator statistics).

CPU (the numbers in the README)::

    python scripts/bench_model.py --steps 3 --batch-size 8 --out bench_model.json

GPU::

    python scripts/bench_model.py --device cuda --dtype bf16 --batch-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from modeling import ExpressConfig, ExpressForMaskedModeling  # noqa: E402

logger = logging.getLogger("bench_model")

SHAPES = {
    # Geneformer V1 (gf-6L-30M): 6 layers, hidden 256, 4 heads, intermediate 512, 25,426 tokens.
    "gf-v1": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "large": dict(num_hidden_layers=12, hidden_size=512, num_attention_heads=8, intermediate_size=1024),
}
VOCAB_SIZE = 25_426
PAD, MASK, CLS = 0, 1, 2
N_SPECIAL = 4
# Bf16 dense tensor-core peak (TFLOP/s) per device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Args:
    shapes: list[str] = field(default_factory=lambda: ["gf-v1", "large"])
    batch_size: int = 8
    steps: int = 3
    warmup: int = 1
    max_tokens: int = 307  # <cls> + 256 detected genes + 50 sampled zeros
    n_zeros: int = 50
    short_fraction: float = 0.25  # share of cells shorter than max_tokens (fewer detected genes)
    mask_fraction: float = 0.15
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    memory: bool = True
    bert_default_dropout: bool = False
    peak_tflops: float | None = None
    seed: int = 0
    out: str | None = "bench_model.json"


# --- data ------------------------------------------------------------------------------------------------------------


def make_batch(args: Args, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rank-encoded cells like the tokenizer's: <cls>, ranked detected genes, then sampled zeros; MLM-masked."""
    b, t = args.batch_size, args.max_tokens
    lengths = torch.full((b,), t)
    short = torch.rand(b, generator=generator) < args.short_fraction
    lengths[short] = torch.randint(t // 2, t, (int(short.sum()),), generator=generator)
    input_ids = torch.full((b, t), PAD)
    values = torch.zeros(b, t)
    is_zero = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        genes = torch.randperm(VOCAB_SIZE - N_SPECIAL, generator=generator)[: n - 1] + N_SPECIAL
        input_ids[i, 0] = CLS
        input_ids[i, 1:n] = genes
        n_detected = n - 1 - args.n_zeros
        values[i, 1 : 1 + n_detected] = torch.sort(torch.rand(n_detected, generator=generator) * 20, descending=True)[0]
        is_zero[i, 1 + n_detected : n] = 1
    attention_mask = (input_ids != PAD).long()
    maskable = attention_mask.bool() & (input_ids != CLS)
    masked = maskable & (torch.rand(b, t, generator=generator) < args.mask_fraction)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(b, t, generator=generator)
    random_genes = torch.randint(N_SPECIAL, VOCAB_SIZE, (b, t), generator=generator)
    input_ids = torch.where(masked & (roll < 0.8), torch.full_like(input_ids, MASK), input_ids)
    input_ids = torch.where(masked & (roll >= 0.8) & (roll < 0.9), random_genes, input_ids)
    values = torch.where(masked, torch.zeros_like(values), values)
    return {"input_ids": input_ids, "values": values, "is_zero": is_zero, "attention_mask": attention_mask, "labels": labels}


def model_inputs(kind: str, batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels") if kind == "bert" else tuple(batch)
    return {k: batch[k].to(device) for k in keys}


# --- models ----------------------------------------------------------------------------------------------------------


def build_model(kind: str, shape: str, args: Args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    dims = SHAPES[shape]
    if kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        # Same dropout as Express unless asked for BERT's own defaults (0.1 / 0.1): on CPU, attention dropout sends
        # SDPA to its unfused math path, which would measure the dropout choice rather than the implementation.
        dropout = {} if args.bert_default_dropout else dict(
            hidden_dropout_prob=ExpressConfig().hidden_dropout_prob,
            attention_probs_dropout_prob=ExpressConfig().attention_probs_dropout_prob,
        )
        config = BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=512, pad_token_id=PAD, **dims, **dropout)
        model = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    else:
        config = ExpressConfig(
            vocab_size=VOCAB_SIZE, max_position_embeddings=512, use_mcv_head=False, use_count_head=False, **dims
        )
        model = ExpressForMaskedModeling._from_config(config, attn_implementation="sdpa")
    return model.to(args.device).train()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops(kind: str, shape: str, batch: dict[str, torch.Tensor]) -> float:
    """FLOPs of one training step (forward + backward = 3x forward) that the model's algorithm needs on real tokens.

    Counts the matrix multiplies: encoder layers and attention on every real token, the MLM transform and the
    vocabulary projection on every real token for BERT (it scores all positions) but only on masked ones for Express,
    and Express's embedding projections. Padding is not counted: it is wasted work, not model FLOPs.
    """
    d = SHAPES[shape]
    h, i, n_layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    lengths = batch["attention_mask"].sum(1).double()
    n_tokens = float(lengths.sum())
    n_masked = float((batch["labels"] != -100).sum())
    layer = 2 * (4 * h * h + 2 * h * i) * n_tokens  # QKV + out + MLP, per layer
    attention = 2 * 2 * h * float((lengths**2).sum())  # QK^T and AV, per layer
    forward = n_layers * (layer + attention)
    head = 2 * (h * h + h * VOCAB_SIZE)
    if kind == "bert":
        forward += head * n_tokens
    else:
        forward += head * n_masked + 2 * (h * h + 64 * h) * n_tokens  # gene projection + value MLP
    return 3.0 * forward


# --- timing ----------------------------------------------------------------------------------------------------------


def autocast(args: Args):
    if args.dtype == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return torch.autocast(device_type=torch.device(args.device).type, enabled=False)


def train_step(model, optimizer, inputs, args: Args) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast(args):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cpu_peak_memory(kind: str, shape: str, args: Args, batches: list[dict], queue) -> None:
    """Child process: RSS high-water mark of training steps above the resident size before the first step."""
    import resource

    import psutil

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(kind, shape, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # One step first so the optimizer state exists: it is resident size, not step memory.
    train_step(model, optimizer, model_inputs(kind, batches[0], args.device), args)
    before = psutil.Process().memory_info().rss
    for batch in batches:
        train_step(model, optimizer, model_inputs(kind, batch, args.device), args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    queue.put(max(0, peak - before))


def peak_memory(kind: str, shape: str, args: Args, batches: list[dict], model=None, optimizer=None) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, optimizer, model_inputs(kind, batches[0], args.device), args)
        return float(torch.cuda.max_memory_allocated() - base)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=cpu_peak_memory, args=(kind, shape, args, batches[:1], queue))
    proc.start()
    value = queue.get()
    proc.join()
    return float(value)


def bench_shape(shape: str, args: Args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args, generator) for _ in range(args.warmup + args.steps)]
    kinds = ("express", "bert")
    models = {k: build_model(k, shape, args) for k in kinds}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for step, batch in enumerate(batches):
        order = kinds if step % 2 == 0 else kinds[::-1]  # alternate who goes first
        for kind in order:
            seconds = train_step(models[kind], optimizers[kind], model_inputs(kind, batch, args.device), args)
            if step >= args.warmup:
                times[kind].append(seconds)
        logger.info("%s step %d/%d: %s", shape, step + 1, len(batches),
                    ", ".join(f"{k} {times[k][-1]:.3f}s" if times[k] else k for k in kinds))
    timed = batches[args.warmup:]
    real_tokens = statistics.mean(float(b["attention_mask"].sum()) for b in timed)
    result = {"shape": shape, **SHAPES[shape], "vocab_size": VOCAB_SIZE, "batch_size": args.batch_size,
              "tokens_per_batch": args.batch_size * args.max_tokens, "real_tokens_per_batch": real_tokens}
    peak = args.peak_tflops
    if peak is None and args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for kind in kinds:
        median = statistics.median(times[kind])
        entry = {
            "params": count_params(models[kind]),
            "step_seconds_median": median,
            "step_seconds": times[kind],
            "real_tokens_per_s": real_tokens / median,
        }
        if args.memory:
            entry["peak_step_memory_mib"] = peak_memory(kind, shape, args, timed, models[kind], optimizers[kind]) / 2**20
        flops = statistics.mean(training_flops(kind, shape, b) for b in timed)
        entry["model_tflops_per_step"] = flops / 1e12
        entry["achieved_tflops"] = flops / median / 1e12
        if peak:
            entry["mfu"] = flops / median / (peak * 1e12)
        result[kind] = entry
    result["speedup"] = result["express"]["real_tokens_per_s"] / result["bert"]["real_tokens_per_s"]
    if args.memory:
        result["memory_ratio"] = result["express"]["peak_step_memory_mib"] / max(result["bert"]["peak_step_memory_mib"], 1e-9)
    return result


def format_table(results: list[dict]) -> str:
    header = ("| shape | model | params | step (s) | real tokens/s | Express/BERT | peak step memory (MiB) | MFU |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = [header]
    for r in results:
        for kind in ("express", "bert"):
            e = r[kind]
            mem = f"{e['peak_step_memory_mib']:.0f}" if "peak_step_memory_mib" in e else "-"
            mfu = f"{100 * e['mfu']:.1f}%" if "mfu" in e else "-"
            ratio = f"{r['speedup']:.2f}x" if kind == "express" else ""
            rows.append(f"| {r['shape']} | {kind} | {e['params'] / 1e6:.1f}M | {e['step_seconds_median']:.3f} | "
                        f"{e['real_tokens_per_s']:.0f} | {ratio} | {mem} | {mfu} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Args()
    parser.add_argument("--shapes", nargs="+", default=defaults.shapes, choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--short-fraction", type=float, default=defaults.short_fraction)
    parser.add_argument("--mask-fraction", type=float, default=defaults.mask_fraction)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=defaults.dtype)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--bert-default-dropout", action="store_true",
                        help="give BERT its own dropout defaults (0.1 hidden, 0.1 attention) instead of Express's")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="JSON output path ('' for none)")
    return Args(**vars(parser.parse_args(argv)))


def main(args: Args) -> list[dict]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is visible")
    results = [bench_shape(shape, args) for shape in args.shapes]
    table = format_table(results)
    print(table)
    if args.out:
        payload = {"args": asdict(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "results": results}
        out = Path(args.out)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, out)
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_args())
