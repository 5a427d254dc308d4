"""Write a realistic synthetic raw-count h5ad, chunk by chunk (never the whole matrix in memory).

Negative-binomial genes with heavy-tailed means, cell-type gene modules, log-normal library sizes, ~8% of 20,000
genes detected per cell (10x-like); see ``tokenizer/synthetic.py`` for the model. Seeded: the same arguments always
give the same file.

    python scripts/make_synthetic.py --out /tmp/synthetic_200k.h5ad --n_cells 200000
    python scripts/make_synthetic.py --out small.h5ad --n_cells 5000 --n_genes 2000 --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokenizer.synthetic import write_synthetic_h5ad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="h5ad file to write")
    parser.add_argument("--n_cells", "--n-cells", type=int, default=50_000)
    parser.add_argument("--n_genes", "--n-genes", type=int, default=20_000)
    parser.add_argument("--depth", type=float, default=3000.0, help="median library size (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=5000, help="cells generated at a time")
    parser.add_argument("--compression", default=None, choices=[None, "gzip", "lzf"], help="HDF5 compression")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"make_synthetic: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    start = time.perf_counter()
    write_synthetic_h5ad(out, args.n_cells, args.n_genes, chunk_size=args.chunk_size, seed=args.seed,
                         depth=args.depth, compression=args.compression, progress=not args.quiet)
    seconds = time.perf_counter() - start
    import h5py

    with h5py.File(out, "r") as f:
        nnz = int(f["X/indptr"][-1])
    summary = {"path": str(out), "n_cells": args.n_cells, "n_genes": args.n_genes, "nnz": nnz,
               "detected_fraction": nnz / args.n_cells / args.n_genes, "bytes": out.stat().st_size,
               "seed": args.seed, "depth": args.depth, "seconds": round(seconds, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
