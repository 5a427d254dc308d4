"""``express-tokenize``: corpus statistics, tokenization and inspection from the command line.

Each subcommand is a thin wrapper over the Python API (:mod:`tokenizer`). ``main(argv)`` returns the exit code:
0 on success, 2 for bad input or usage (one-line message, no traceback), 1 for an unexpected error (rerun with
``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
from collections.abc import Sequence

from .errors import InputError, run_cli
from .spec import TokenizationSpec

logger = logging.getLogger("tokenizer")

EXAMPLES = {
    "fit": """examples:
  express-tokenize fit corpus/*.h5ad --out stats --num_workers 4
  express-tokenize fit pbmc.h5ad --out stats --total_counts_key n_counts --donor_key donor --n_groups 64,8
  express-tokenize fit big.h5ad --out stats_0 --shard 0/2   # then --shard 1/2 elsewhere, then `merge`""",
    "merge": """examples:
  express-tokenize merge stats_0 stats_1 --out stats""",
    "tokenize": """examples:
  express-tokenize tokenize pbmc.h5ad --stats stats --out tokens --obs_keys cell_type,donor --keep_counts
  express-tokenize tokenize pbmc.h5ad --geneformer_dicts geneformer/gc95M --model_input_size 4096 \\
      --gene_id_key ensembl_id --out tokens_gf
  express-tokenize tokenize cells.loom --geneformer_dicts geneformer/gc95M --total_counts_key n_counts \\
      --out tokens_gf   # loom: genes in rows (row attribute ensembl_id), cells in columns""",
    "inspect": """examples:
  express-tokenize inspect tokens --cell 0
  express-tokenize inspect stats""",
    "demo-data": """examples:
  express-tokenize demo-data --out pbmc68k_counts.h5ad""",
}


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--name_with_underscores`` with ``--name-with-dashes`` as an alias."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _common_input_flags(p: argparse.ArgumentParser, chunk_size: int | None = 2048,
                        chunk_help: str = "cells read at a time (default 2048)") -> None:
    _flag(p, "gene_id_key", default=None, help="var column with gene ids (default: var_names)")
    _flag(p, "gene_map", default=None, metavar="JSON",
          help="JSON object mapping the data's gene ids to vocabulary ids, e.g. symbol -> Ensembl "
               "(genes it lacks are left out)")
    _flag(p, "layer", default=None, help="read layers[LAYER] instead of X ('raw' reads raw/X)")
    _flag(p, "total_counts_key", default=None,
          help="obs column with each cell's library size (needed when the matrix holds a subset of genes; "
               "default: row sums)")
    _flag(p, "allow_non_integer", action="store_true",
          help="accept non-integer values (negative, NaN and inf values are always refused)")
    _flag(p, "num_workers", type=int, default=1, help="parallel workers (default 1)")
    _flag(p, "chunk_size", type=int, default=chunk_size, help=chunk_help)
    _flag(p, "overwrite", action="store_true", help="replace an existing output")
    _flag(p, "quiet", action="store_true", help="no progress bar")


def _hierarchy_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "min_cells", type=int, default=1, help="leave out genes detected in fewer cells (default 1)")
    _flag(p, "n_groups", default="auto",
          help="groups per hierarchy level derived from the corpus, fine to coarse, e.g. 64,8; 'auto' (about "
               "sqrt(n_genes), then its square root) or 0 for none")
    _flag(p, "hierarchy", default=None, metavar="TSV",
          help="take the groups from a TSV instead (header row; gene_id, then one column per level)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="express-tokenize",
        description="Rank tokenizer for single-cell raw counts: corpus statistics (fit, merge), tokenization into "
                    "Hugging Face datasets (tokenize), and inspection.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(EXAMPLES[k] for k in ("fit", "tokenize", "inspect")),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of unexpected errors")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name], parents=[debug],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("fit", "Stream h5ad files once and write gene statistics and the vocabulary to --out.")
    p.add_argument("inputs", nargs="+", help="h5ad (or loom) files of raw counts")
    _flag(p, "out", required=True, help="statistics folder to write")
    _flag(p, "donor_key", default=None, help="obs column with donors/samples (adds donor_zero_fraction)")
    _hierarchy_flags(p)
    _flag(p, "relative_accuracy", type=float, default=0.005,
          help="relative error bound of the median sketch (default 0.005)")
    _flag(p, "sketch_dim", type=int, default=128, help="size of the per-gene projection sketch (default 128)")
    _flag(p, "seed", type=int, default=0, help="seed of the projection sketch and of k-means (default 0)")
    _flag(p, "shard", default=None, metavar="I/N", help="fit only the I-th of N interleaved row-block shards")
    _common_input_flags(p)

    p = command("merge", "Merge statistics folders fitted on shards into the one-pass result.")
    p.add_argument("stats_dirs", nargs="+", help="folders written by `fit`")
    _flag(p, "out", required=True, help="statistics folder to write")
    _hierarchy_flags(p)
    _flag(p, "overwrite", action="store_true", help="replace an existing output")

    p = command("tokenize", "Tokenize h5ad (or loom) files into a Hugging Face dataset folder.")
    p.add_argument("inputs", nargs="+", help="h5ad files of raw counts, or loom files as Geneformer reads them "
                                             "(genes in rows with row attribute ensembl_id, cells in columns)")
    _flag(p, "stats", default=None, help="statistics folder from `fit`, or a model folder (its vocabulary, and its "
                                         "tokenization.json for the defaults of --top_k, --n_zeros, --seed)")
    _flag(p, "geneformer_dicts", default=None, metavar="DIR",
          help="Geneformer mode: folder with token_dictionary.json and gene_median_dictionary.json")
    _flag(p, "model_input_size", type=int, default=None,
          help="Geneformer mode: 2048 (V1, no special tokens) or 4096 (V2, <cls> ... <eos>)")
    _flag(p, "out", required=True, help="dataset folder to write")
    _flag(p, "obs_keys", default=None, help="obs columns to carry, comma-separated (e.g. cell_type,donor)")
    spec = TokenizationSpec()
    _flag(p, "top_k", type=int, default=None, help=f"detected genes kept per cell (default {spec.top_k})")
    _flag(p, "n_zeros", type=int, default=None, help=f"zero-count genes sampled per cell (default {spec.n_zeros})")
    _flag(p, "seed", type=int, default=None, help=f"seed of the per-cell zero sampling (default {spec.seed})")
    _flag(p, "keep_counts", action="store_true", help="also store each cell's raw counts (counts_ids, counts)")
    _common_input_flags(p, chunk_size=None, chunk_help="cells read at a time (default 2048; 384 in Geneformer mode)")

    p = command("inspect", "Summarise a tokenized dataset (and show one cell) or a statistics folder.")
    p.add_argument("path", help="dataset or statistics folder")
    _flag(p, "cell", type=int, default=0, help="row of the cell to show (default 0)")
    _flag(p, "n_tokens", type=int, default=20, help="tokens to show (default 20)")

    p = command("demo-data", "Write the built-in default data (scanpy's pbmc68k_reduced as raw counts) to an h5ad.")
    _flag(p, "out", required=True, help="h5ad file to write")
    _flag(p, "overwrite", action="store_true", help="replace an existing file")
    return parser


# --- subcommands ------------------------------------------------------------------------------------------------------
def _input_kwargs(args) -> dict:
    return dict(gene_id_key=args.gene_id_key, gene_map=args.gene_map, layer=args.layer,
                total_counts_key=args.total_counts_key, allow_non_integer=args.allow_non_integer,
                num_workers=args.num_workers, chunk_size=args.chunk_size, progress=not args.quiet)


def run_fit(args) -> None:
    from .stats import fit_statistics

    vocab = fit_statistics(
        args.inputs, args.out, donor_key=args.donor_key, min_cells=args.min_cells, n_groups=args.n_groups,
        hierarchy=args.hierarchy, relative_accuracy=args.relative_accuracy, sketch_dim=args.sketch_dim,
        seed=args.seed, shard=args.shard, overwrite=args.overwrite, **_input_kwargs(args),
    )
    print(f"fit: {vocab.n_genes:,} genes from {vocab.meta['cells_used']:,} cells -> {args.out} "
          f"(hierarchy table sizes {vocab.n_groups})")


def run_merge(args) -> None:
    from .stats import merge_statistics

    vocab = merge_statistics(args.stats_dirs, args.out, min_cells=args.min_cells, n_groups=args.n_groups,
                             hierarchy=args.hierarchy, overwrite=args.overwrite)
    print(f"merge: {vocab.n_genes:,} genes from {vocab.meta['cells_used']:,} cells -> {args.out}")


def run_tokenize(args) -> None:
    import json

    from .tokenize import MANIFEST_FILE, tokenize_files

    if args.stats is None and args.geneformer_dicts is None:
        raise InputError("tokenize needs --stats STATS_DIR (from `express-tokenize fit`) or --geneformer_dicts DIR")
    given = {k: getattr(args, k) for k in ("top_k", "n_zeros", "seed") if getattr(args, k) is not None}
    if given and args.geneformer_dicts is not None:
        raise InputError(f"Geneformer mode takes its encoding from --model_input_size; drop --{', --'.join(given)}")
    spec = None
    if args.geneformer_dicts is None:
        # a model folder's own tokenization (tokenization.json) is the default, so new cells encode as its corpus did
        from pathlib import Path

        from .spec import TOKENIZATION_FILE

        own = Path(args.stats) / TOKENIZATION_FILE
        base = TokenizationSpec.load(args.stats).replace(measured_genes={}) if own.is_file() else TokenizationSpec()
        spec = base.replace(**given)
    out = tokenize_files(
        args.inputs, args.stats, args.out, spec=spec, obs_keys=args.obs_keys, keep_counts=args.keep_counts,
        geneformer_dicts=args.geneformer_dicts,
        model_input_size=args.model_input_size, overwrite=args.overwrite, **_input_kwargs(args),
    )
    counts = json.loads((out / MANIFEST_FILE).read_text())["counts"]
    skipped = counts["cells_skipped"]
    print(f"tokenize: {counts['cells_written']:,} cells -> {out} (skipped {skipped['zero_counts']:,} with zero "
          f"counts, {skipped['no_vocabulary_genes']:,} without vocabulary genes)")


def run_inspect(args) -> None:
    from pathlib import Path

    from .summary import describe_cell, describe_dataset, describe_stats, is_dataset

    path = Path(args.path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if is_dataset(path):
        print(describe_dataset(path))
        print()
        print(describe_cell(path, args.cell, n_tokens=args.n_tokens))
    elif (path / "gene_stats.parquet").is_file():
        print(describe_stats(path))
    else:
        raise InputError(f"{path} is neither a tokenized dataset nor a statistics folder")


def run_demo_data(args) -> None:
    from .data import pbmc68k_counts
    from .output import staged_file

    adata = pbmc68k_counts()
    with staged_file(args.out, overwrite=args.overwrite) as tmp:
        adata.write_h5ad(tmp)
    print(f"demo-data: {adata.n_obs} cells x {adata.n_vars} genes -> {args.out} (library sizes in obs['n_counts'])")


COMMANDS = {"fit": run_fit, "merge": run_merge, "tokenize": run_tokenize, "inspect": run_inspect,
            "demo-data": run_demo_data}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``express-tokenize`` with ``argv`` and return its exit code.

    Run as the program itself (``argv`` None: the ``express-tokenize`` command, ``python -m tokenizer.cli``), it
    ends the process once its output is flushed and its files are closed, without the interpreter's teardown:
    unloading numba's compiled code, LLVM and pandas takes about half a second, as long as tokenizing 10,000 cells.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 for --help
        return int(exit_.code or 0)
    _setup_logging()
    if argv is None and args.command == "tokenize":
        # As the program, tokenize runs without the cyclic garbage collector: its passes over the objects of numba,
        # pandas and pyarrow (hundreds of thousands, alive to the end) cost about 0.2 s of CPU per run, while a run
        # leaves only about 540 objects in cycles, however many cells it tokenizes (measured), so memory stays flat.
        gc.disable()
    code = run_cli(f"express-tokenize {args.command}", lambda: COMMANDS[args.command](args), debug=args.debug)
    if argv is None and threading.active_count() == 1:  # nothing else running that teardown would wait for
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # a closed pipe (| head): nothing more to say
                pass
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
