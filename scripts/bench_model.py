"""Training-step throughput and peak memory: ExpressForMaskedModeling (MLM only) vs transformers' BertForMaskedLM.

Both models get the same layers, hidden size, heads, intermediate size and vocabulary, and train on the same token
batches (cells of up to 307 tokens, most full length, 15% of gene tokens masked), interleaved step by step in one
process so machine noise hits both alike. Reported per shape: median step time, real (non-pad) tokens per second,
the Express / BERT ratio, and peak memory of a training step. With ``--device cuda`` also model FLOPs utilisation
(MFU = FLOPs the model's own algorithm needs on the real tokens / step time / peak FLOP/s).

Wall-clock time on a shared machine is noisy, so three ratios are given: of median step times, of best (fastest)
step times, and of process CPU time per step. Memory: on CUDA the allocator's peak during a step above what was
allocated before it; on CPU (no allocator statistics) the resident-set high-water mark of a child process running one
training step for one model, above its resident size just before the step (weights, optimizer state, batch).

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
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modeling import ExpressConfig, ExpressForMaskedModeling
from tokenizer.output import write_bytes

logger = logging.getLogger("bench_model")

SHAPES = {
    # Geneformer V1 (gf-6L-30M): 6 layers, hidden 256, 4 heads, intermediate 512, 25,426 tokens.
    "gf-v1": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "large": dict(num_hidden_layers=12, hidden_size=512, num_attention_heads=8, intermediate_size=1024),
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),  # smoke test
}
PAD, MASK, CLS = 0, 1, 2
N_SPECIAL = 4
# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU; first match wins (--peak-tflops overrides).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Args:
    shapes: list[str] = field(default_factory=lambda: ["gf-v1", "large"])
    vocab_size: int = 25_426  # Geneformer V1's token dictionary
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
        genes = torch.randperm(args.vocab_size - N_SPECIAL, generator=generator)[: n - 1] + N_SPECIAL
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
    random_genes = torch.randint(N_SPECIAL, args.vocab_size, (b, t), generator=generator)
    input_ids = torch.where(masked & (roll < 0.8), torch.full_like(input_ids, MASK), input_ids)
    input_ids = torch.where(masked & (roll >= 0.8) & (roll < 0.9), random_genes, input_ids)
    values = torch.where(masked, torch.zeros_like(values), values)
    return {"input_ids": input_ids, "values": values, "is_zero": is_zero, "attention_mask": attention_mask,
            "labels": labels}


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
        config = BertConfig(vocab_size=args.vocab_size, max_position_embeddings=512, pad_token_id=PAD,
                            **dims, **dropout)
        model = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    else:
        config = ExpressConfig(
            vocab_size=args.vocab_size, max_position_embeddings=512, use_mcv_head=False, use_count_head=False, **dims
        )
        model = ExpressForMaskedModeling._from_config(config, attn_implementation="sdpa")
        zero_fraction = torch.rand(args.vocab_size, generator=torch.Generator().manual_seed(args.seed))
        zero_fraction[:N_SPECIAL] = 0
        model.set_gene_statistics(zero_fraction)
    return model.to(args.device).train()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops(kind: str, shape: str, batch: dict[str, torch.Tensor], vocab_size: int) -> float:
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
    head = 2 * (h * h + h * vocab_size)
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


def train_step(model, optimizer, inputs, args: Args) -> tuple[float, float]:
    """One optimizer step; returns (wall seconds, process CPU seconds)."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    with autocast(args):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def init_optimizer_state(model, optimizer) -> None:
    """Create AdamW's moment buffers up front, so they count as resident size rather than as step memory."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak CPU memory needs Linux (or pass --no-memory)")


def cpu_peak_memory(kind: str, shape: str, args: Args, batch: dict, queue) -> None:
    """Child process: resident-set high-water mark (VmHWM) of one training step above the resident size just before
    it (weights, optimizer state and the batch already in memory). A fresh process, because freed memory kept by the
    allocator from earlier steps would hide part of the peak; VmHWM, not getrusage, because ru_maxrss survives exec
    and would report the parent's size."""
    model = build_model(kind, shape, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    init_optimizer_state(model, optimizer)
    inputs = model_inputs(kind, batch, args.device)
    try:  # reset the high-water mark to the current size (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _status_kib("VmRSS")
    train_step(model, optimizer, inputs, args)
    queue.put(max(0, _status_kib("VmHWM") - before) * 1024)


def peak_memory(kind: str, shape: str, args: Args, batch: dict, model=None, optimizer=None) -> float:
    """Peak extra memory of one training step, in bytes (see the module docstring for how, per device)."""
    if args.device.startswith("cuda"):
        inputs = model_inputs(kind, batch, args.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, optimizer, inputs, args)
        return float(torch.cuda.max_memory_allocated() - base)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=cpu_peak_memory, args=(kind, shape, args, batch, queue))
    proc.start()
    proc.join()  # the child sends one small integer: it cannot block on a full pipe
    if proc.exitcode != 0:
        raise RuntimeError(f"the memory-measuring child process for {kind}/{shape} failed (exit code {proc.exitcode})")
    return float(queue.get(timeout=30))


def bench_shape(shape: str, args: Args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args, generator) for _ in range(args.warmup + args.steps)]
    kinds = ("express", "bert")
    models = {k: build_model(k, shape, args) for k in kinds}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu_times: dict[str, list[float]] = {k: [] for k in kinds}
    for step, batch in enumerate(batches):
        order = kinds if step % 2 == 0 else kinds[::-1]  # alternate who goes first
        for kind in order:
            wall, cpu = train_step(models[kind], optimizers[kind], model_inputs(kind, batch, args.device), args)
            if step >= args.warmup:
                times[kind].append(wall)
                cpu_times[kind].append(cpu)
        logger.info("%s step %d/%d: %s", shape, step + 1, len(batches),
                    ", ".join(f"{k} {times[k][-1]:.3f}s" if times[k] else k for k in kinds))
    timed = batches[args.warmup:]
    real_tokens = statistics.mean(float(b["attention_mask"].sum()) for b in timed)
    result = {"shape": shape, **SHAPES[shape], "vocab_size": args.vocab_size, "batch_size": args.batch_size,
              "tokens_per_batch": args.batch_size * args.max_tokens, "real_tokens_per_batch": real_tokens}
    peak = args.peak_tflops
    if peak is None and args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for kind in kinds:
        median, best = statistics.median(times[kind]), min(times[kind])
        entry = {
            "params": count_params(models[kind]),
            "step_seconds": times[kind],
            "step_cpu_seconds": cpu_times[kind],
            "step_seconds_median": median,
            "step_seconds_best": best,
            "real_tokens_per_s": real_tokens / median,
            "real_tokens_per_s_best": real_tokens / best,
            "real_tokens_per_cpu_s": real_tokens / statistics.median(cpu_times[kind]),
        }
        if args.memory:
            peak_bytes = peak_memory(kind, shape, args, timed[0], models[kind], optimizers[kind])
            entry["peak_step_memory_mib"] = peak_bytes / 2**20
        flops = statistics.mean(training_flops(kind, shape, b, args.vocab_size) for b in timed)
        entry["model_tflops_per_step"] = flops / 1e12
        entry["achieved_tflops"] = flops / median / 1e12
        if peak:
            entry["mfu"] = flops / median / (peak * 1e12)
        result[kind] = entry
    express, bert = result["express"], result["bert"]
    result["speedup"] = express["real_tokens_per_s"] / bert["real_tokens_per_s"]
    result["speedup_best"] = express["real_tokens_per_s_best"] / bert["real_tokens_per_s_best"]
    result["speedup_cpu_time"] = express["real_tokens_per_cpu_s"] / bert["real_tokens_per_cpu_s"]
    if args.memory:
        result["memory_ratio"] = express["peak_step_memory_mib"] / max(bert["peak_step_memory_mib"], 1e-9)
    return result


def format_table(results: list[dict]) -> str:
    header = ("| shape | model | params | step s (median) | real tokens/s (median) | Express/BERT (median) "
              "| Express/BERT (best step) | Express/BERT (CPU time) | peak step memory (MiB) | MFU |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    rows = [header]
    for r in results:
        for kind in ("express", "bert"):
            e = r[kind]
            mem = f"{e['peak_step_memory_mib']:.0f}" if "peak_step_memory_mib" in e else "-"
            mfu = f"{100 * e['mfu']:.1f}%" if "mfu" in e else "-"
            ratios = (f"{r['speedup']:.2f}x | {r['speedup_best']:.2f}x | {r['speedup_cpu_time']:.2f}x"
                      if kind == "express" else " | | ")
            rows.append(f"| {r['shape']} | {kind} | {e['params'] / 1e6:.1f}M | {e['step_seconds_median']:.3f} | "
                        f"{e['real_tokens_per_s']:.0f} | {ratios} | {mem} | {mfu} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Args()
    parser.add_argument("--shapes", nargs="+", default=defaults.shapes, choices=sorted(SHAPES))
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--n-zeros", type=int, default=defaults.n_zeros, help="sampled zeros per cell")
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
    if args.max_tokens // 2 < args.n_zeros + 2:
        raise SystemExit(f"--max-tokens {args.max_tokens} leaves short cells no detected genes after "
                         f"--n-zeros {args.n_zeros}: use max_tokens >= 2 * (n_zeros + 2)")
    results = [bench_shape(shape, args) for shape in args.shapes]
    table = format_table(results)
    print(table)
    if args.out:
        payload = {"args": asdict(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "results": results}
        write_bytes(Path(args.out), json.dumps(payload, indent=2).encode())
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_args())
