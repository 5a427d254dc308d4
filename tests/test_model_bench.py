"""The model benchmark script runs end to end (a tiny shape; the real numbers come from running it by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_model.py"


def test_bench_model_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--vocab-size", "200", "--batch-size", "3",
         "--max-tokens", "40", "--n-zeros", "5", "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tiny | express |" in result.stdout and "| tiny | bert |" in result.stdout
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert row["vocab_size"] == 200 and row["batch_size"] == 3
    assert 0 < row["real_tokens_per_batch"] <= 3 * 40
    for kind in ("express", "bert"):
        entry = row[kind]
        assert len(entry["step_seconds"]) == 2 and entry["real_tokens_per_s"] > 0
        assert entry["peak_step_memory_mib"] > 0
        assert entry["model_tflops_per_step"] > 0
    # Express scores only masked positions; BERT scores all of them, so it needs more FLOPs for the same batch
    assert row["express"]["model_tflops_per_step"] < row["bert"]["model_tflops_per_step"]
    assert row["speedup"] > 0 and "mfu" not in row["express"]  # no MFU without a known peak
