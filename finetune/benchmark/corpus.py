"""The benchmark's pretraining corpus: every real file with one vocabulary, the fine-tuning test cells left out.

1. The built-in default data is written as raw counts; every file's statistics are fitted on its own (each with its
   library sizes) and merged exactly into one vocabulary keyed by gene **symbol** (``var['gene_symbol']``: most
   files are keyed by symbol and Ensembl ids would drop genes); genes detected in fewer than ``min_cells`` cells are
   left out.
2. Cells that a fine-tuning split tests on are left out of pretraining *and* of the statistics
   (:func:`~finetune.benchmark.splits.held_out_mask`; filtered copies go to ``OUT/inputs/pretrain``, with the same
   file names so the ``source`` column is unchanged).
3. Every file is tokenized with kept counts (MCV needs them) into ``OUT/tokens/<name>``; files that lost test cells
   are also tokenized whole into ``OUT/tokens_eval/<name>`` for the evaluations, which read every labelled cell.

Everything is cached: a second call with the same settings reuses the folders (``corpus.json`` records them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tokenizer import TokenizationSpec

from .splits import DEFAULT_DATA, BenchmarkData, held_out_mask

logger = logging.getLogger(__name__)

GENE_ID_KEY = "gene_symbol"


@dataclass
class BenchmarkCorpus:
    """Where the corpus is: the shared statistics, the pretraining folders, and complete folders per file."""

    stats: Path
    pretraining: list[Path]
    complete: dict[str, Path]  # dataset name -> tokenized folder of every cell of the file
    files: dict[str, Path]  # dataset name -> h5ad the folders were made from (complete file)
    left_out: dict[str, dict] = field(default_factory=dict)


def write_default_data(path: Path) -> Path:
    """The built-in default data (pbmc68k_reduced as raw counts), written once."""
    from tokenizer.data import pbmc68k_counts
    from tokenizer.output import staged_file

    if not path.is_file():
        with staged_file(path, overwrite=True) as tmp:
            pbmc68k_counts().write_h5ad(tmp)
    return path


def _filtered_copy(path: Path, out: Path, datasets: dict[str, BenchmarkData]) -> tuple[Path, dict | None]:
    """``path`` without the fine-tuning test cells (a copy under ``out``), or ``path`` itself when it has none."""
    import anndata as ad

    from tokenizer.output import staged_file

    adata = ad.read_h5ad(path, backed="r")
    mask = held_out_mask(adata.obs, datasets)
    if not mask.any():
        adata.file.close()
        return path, None
    record = {"n_cells": int(adata.n_obs), "n_left_out": int(mask.sum())}
    target = out / path.name
    if not target.is_file() or ad.read_h5ad(target, backed="r").n_obs != int((~mask).sum()):
        with staged_file(target, overwrite=True) as tmp:
            adata[~mask].to_memory().write_h5ad(tmp)
    adata.file.close()
    logger.info("%s: %d of %d cells left out of pretraining (fine-tuning test cells)", path.stem,
                record["n_left_out"], record["n_cells"])
    return target, record


def _subsample(path: Path, out: Path, max_cells: int) -> Path:
    """``path`` cut to ``max_cells`` random cells (seeded, in file order), or ``path`` when it is that small."""
    import anndata as ad
    import numpy as np

    from tokenizer.output import staged_file

    adata = ad.read_h5ad(path, backed="r")
    if adata.n_obs <= max_cells:
        adata.file.close()
        return path
    target = out / path.name
    if not target.is_file():
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, max_cells, replace=False))
        with staged_file(target, overwrite=True) as tmp:
            adata[rows].to_memory().write_h5ad(tmp)
    adata.file.close()
    return target


def _with_symbols(path: Path, out: Path) -> Path:
    """``path``, or a copy with ``var['gene_symbol']`` = its var_names when it has no such column (a user's file)."""
    import anndata as ad

    from tokenizer.output import staged_file

    adata = ad.read_h5ad(path, backed="r")
    if GENE_ID_KEY in adata.var.columns:
        adata.file.close()
        return path
    target = out / path.name
    if not target.is_file():
        memory = adata.to_memory()
        memory.var[GENE_ID_KEY] = memory.var_names.astype(str)
        with staged_file(target, overwrite=True) as tmp:
            memory.write_h5ad(tmp)
    adata.file.close()
    return target


def build_corpus(datasets: dict[str, BenchmarkData], data_dir: Path, out: Path, *, spec: TokenizationSpec,
                 min_cells: int = 10, exclude_test_cells: bool = True, max_cells: int | None = None,
                 overwrite: bool = False) -> BenchmarkCorpus:
    """Tokenize ``datasets`` into one corpus under ``out`` (see the module docstring); cached. ``max_cells``: each
    file is first cut to that many random cells (the quick benchmark), and every task reads the cut files."""
    import tokenizer

    out = Path(out)
    files = {}
    for name, data in datasets.items():
        files[name] = write_default_data(out / "inputs" / DEFAULT_DATA) if data.file == DEFAULT_DATA \
            else data.path(data_dir)
        if not files[name].is_file():
            raise FileNotFoundError(f"benchmark data {files[name]} is missing")
        files[name] = _with_symbols(files[name], out / "inputs" / "symbols")
        if max_cells is not None:
            files[name] = _subsample(files[name], out / "inputs" / "subsample", max_cells)
    record = {"files": {k: str(v) for k, v in files.items()}, "spec": spec.to_dict(), "min_cells": min_cells,
              "exclude_test_cells": exclude_test_cells, "gene_id_key": GENE_ID_KEY, "max_cells": max_cells}
    record_file = out / "corpus.json"
    cached = not overwrite and record_file.is_file() and json.loads(record_file.read_text()).get("record") == record
    inputs, left_out = {}, {}
    for name, path in files.items():
        if exclude_test_cells:
            inputs[name], info = _filtered_copy(path, out / "inputs" / "pretrain", datasets)
            if info:
                left_out[name] = info
        else:
            inputs[name] = path
    stats = out / "stats" / "merged"
    if not cached:
        parts = []
        for name, path in inputs.items():
            part = out / "stats" / name
            tokenizer.fit_statistics([path], part, gene_id_key=GENE_ID_KEY, overwrite=True, progress=False,
                                     total_counts_key=datasets[name].total_counts_key)
            parts.append(part)
        tokenizer.merge_statistics(parts, stats, min_cells=min_cells, overwrite=True)

    def tokenize(name: str, path: Path, folder: Path) -> Path:
        if not cached or not folder.is_dir():
            data = datasets[name]
            keys = [k for k in (data.label_key, data.batch_key, data.donor_key, data.test_key) if k]
            tokenizer.tokenize_files([path], stats, folder, spec=spec, gene_id_key=GENE_ID_KEY, keep_counts=True,
                                     total_counts_key=data.total_counts_key, obs_keys=sorted(set(keys)) or None,
                                     overwrite=True, progress=False)
        return folder

    pretraining = [tokenize(name, path, out / "tokens" / name) for name, path in inputs.items()]
    complete = {name: (tokenize(name, files[name], out / "tokens_eval" / name) if name in left_out
                       else out / "tokens" / name) for name in datasets}
    record_file.write_text(json.dumps({"record": record, "left_out": left_out}, indent=2))
    return BenchmarkCorpus(stats, pretraining, complete, files, left_out)
