#!/usr/bin/env bash
# The main job on the built-in default data (scanpy's pbmc68k_reduced, turned back into raw counts), end to end:
# set up .venv on first run, tokenize, pretrain a small encoder with the default recipe (MLM + MCV + contrastive),
# fine-tune it for cell types on a fixed 80/20 split with the default fine-tuning recipe (and the transformer alone,
# without a wide path), and compare with L1 logistic regression. Every setting is the library's default; only the
# data, the output folders and the pretraining length (150 steps, express-pretrain's own default) are given. A few
# minutes on a 2-core CPU once set up.
# Outputs go to ./express_demo (override with EXPRESS_DEMO_DIR); every step overwrites its previous output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
OUT="${EXPRESS_DEMO_DIR:-express_demo}"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

echo "== 1/4 tokenize the built-in data =="
express-tokenize demo-data --out "$OUT/pbmc68k_counts.h5ad" --overwrite
express-tokenize fit "$OUT/pbmc68k_counts.h5ad" --out "$OUT/stats" --total_counts_key n_counts --overwrite
express-tokenize tokenize "$OUT/pbmc68k_counts.h5ad" --stats "$OUT/stats" --out "$OUT/tokens" \
  --total_counts_key n_counts --obs_keys cell_type,split --keep_counts --overwrite
express-tokenize inspect "$OUT/tokens" --cell 0 --n_tokens 12

echo "== 2/4 pretrain (default recipe: MLM + MCV + contrastive) =="
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  pretrain/run.py --dataset "$OUT/tokens" --output_dir "$OUT/pretrain" \
  --max_steps 150 --overwrite_output_dir

echo "== 3/4 fine-tune cell types from the pretrained encoder (test: the held-out 20%) =="
express-finetune --task cell-type --model "$OUT/pretrain/final" --data "$OUT/pbmc68k_counts.h5ad" \
  --split_key split --test_values test --label_key cell_type --output_dir "$OUT/celltype" --overwrite
# the same without a wide path (the default adds an L1-penalised linear model on HVGs): the transformer alone
express-finetune --task cell-type --model "$OUT/pretrain/final" --data "$OUT/pbmc68k_counts.h5ad" \
  --split_key split --test_values test --label_key cell_type --output_dir "$OUT/celltype_transformer" --overwrite \
  --wide_path false

echo "== 4/4 results =="
python scripts/quickstart_report.py "$OUT"
