#!/usr/bin/env bash
# The main job on the built-in default data (scanpy's pbmc68k_reduced, as raw counts): set up .venv on first run,
# then tokenize and show the result. Outputs go to ./express_demo (override with EXPRESS_DEMO_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
OUT="${EXPRESS_DEMO_DIR:-express_demo}"
mkdir -p "$OUT"
express-tokenize demo-data --out "$OUT/pbmc68k_counts.h5ad" --overwrite
express-tokenize fit "$OUT/pbmc68k_counts.h5ad" --out "$OUT/stats" --total_counts_key n_counts --overwrite
express-tokenize tokenize "$OUT/pbmc68k_counts.h5ad" --stats "$OUT/stats" --out "$OUT/tokens" \
  --total_counts_key n_counts --obs_keys cell_type --keep_counts --overwrite
express-tokenize inspect "$OUT/tokens" --cell 0
