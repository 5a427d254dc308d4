"""The real datasets the benchmark reads, their keys, and the cells each fine-tuning split holds out.

Every file is in ``../shared/data`` (``EXPRESS_SHARED_DATA`` overrides the folder) except the built-in default data,
which the benchmark writes. ``--data FILE:label=KEY,batch=KEY,donor=KEY,test=KEY:V1|V2`` adds another raw-count h5ad
(:func:`parse_extra`).

Pretraining for the benchmark leaves every cell whose split column holds one of a split's test values out of its
corpus (:func:`held_out_mask`), in any file that has the column, so the pretrained arm never sees its test cells,
even unlabelled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

NOT_A_LABEL = frozenset({"doublet", "unlabelled", "unknown", "nan", "none", ""})


@dataclass(frozen=True)
class BenchmarkData:
    """One h5ad of the benchmark and how to read it.

    Args:
        name: short name in the report.
        file: file name in the shared data folder, or a path.
        label_key, batch_key, donor_key: obs columns (None where the file has none).
        test_key, test_values: the fine-tuning split: cells whose ``obs[test_key]`` is one of ``test_values`` are
            the held-out test cells (None: no fine-tuning split).
        protein_key: obsm key of raw protein counts (CITE-seq).
        total_counts_key: obs column of library sizes when the matrix holds a subset of genes.
    """

    name: str
    file: str
    label_key: str | None = None
    batch_key: str | None = None
    donor_key: str | None = None
    test_key: str | None = None
    test_values: tuple[str, ...] = ()
    protein_key: str | None = None
    total_counts_key: str | None = None
    extra_keys: dict = field(default_factory=dict, compare=False)

    def path(self, data_dir: Path) -> Path:
        candidate = Path(self.file)
        return candidate if candidate.is_absolute() or candidate.exists() else Path(data_dir) / self.file

    def labels(self, obs: pd.DataFrame) -> np.ndarray | None:
        """The cell-type labels as strings, or None without a label column."""
        return None if self.label_key is None else obs[self.label_key].astype(str).to_numpy()

    def labelled(self, obs: pd.DataFrame) -> np.ndarray:
        """Cells with a real label (not 'doublet', 'unlabelled', missing, ...)."""
        labels = self.labels(obs)
        if labels is None:
            return np.zeros(len(obs), dtype=bool)
        return ~np.isin(np.char.lower(labels.astype(str)), list(NOT_A_LABEL))

    def test_mask(self, obs: pd.DataFrame) -> np.ndarray:
        if self.test_key is None:
            return np.zeros(len(obs), dtype=bool)
        return obs[self.test_key].astype(str).isin(self.test_values).to_numpy()


DEFAULT_DATA = "pbmc68k_counts.h5ad"  # written by the benchmark: the built-in default data as raw counts
DATASETS: dict[str, BenchmarkData] = {
    "kang": BenchmarkData("kang", "kang2018_pbmc_12261.h5ad", "cell_type", "donor", "donor", "donor",
                          ("1244", "1256")),
    "cellbench": BenchmarkData("cellbench", "cellbench_lung_1408.h5ad", "cell_type", "batch", None, "batch",
                               ("sc_celseq2_5cl_p3", "sc_dropseq"), extra_keys={"protocol": "protocol"}),
    "cite": BenchmarkData("cite", "bmmc_cite_600.h5ad", "cell_type", "batch", "donor", "batch", ("s1d2",),
                          protein_key="protein_counts"),
    "pbmc68k": BenchmarkData("pbmc68k", DEFAULT_DATA, "cell_type", total_counts_key="n_counts"),
    "chemistries": BenchmarkData("chemistries", "pbmc_3chemistries_2860.h5ad", None, "batch"),
    "kang_stim": BenchmarkData("kang_stim", "kang2018_ctrlstim_2000.h5ad", "cell_type", "condition", "donor"),
    "citefuse": BenchmarkData("citefuse", "citefuse_eccite_500.h5ad", None, None, protein_key="protein_counts"),
}
# The fine-tuning splits: name -> (file, column, held-out values)
SPLITS = {name: (d.file, d.test_key, list(d.test_values)) for name, d in DATASETS.items() if d.test_key}


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (``EXPRESS_SHARED_DATA`` overrides it)."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("EXPRESS_SHARED_DATA", default))


def held_out_mask(obs: pd.DataFrame, datasets: dict[str, BenchmarkData] | None = None) -> np.ndarray:
    """True for cells any fine-tuning split tests on: their value of a split column is one of its test values."""
    mask = np.zeros(len(obs), dtype=bool)
    for data in (datasets or DATASETS).values():
        if data.test_key is not None and data.test_key in obs.columns:
            mask |= obs[data.test_key].astype(str).isin([str(v) for v in data.test_values]).to_numpy()
    return mask


def parse_extra(text: str) -> BenchmarkData:
    """``FILE[:label=KEY,batch=KEY,donor=KEY,test=KEY:V1|V2,proteins=KEY]`` -> a :class:`BenchmarkData`."""
    path, _, options = text.partition(":")
    keys: dict[str, str] = {}
    for item in filter(None, options.split(",")):
        name, _, value = item.partition("=")
        if name not in ("label", "batch", "donor", "test", "proteins", "total_counts"):
            raise ValueError(f"--data {text!r}: unknown key {name!r} (label, batch, donor, test, proteins, "
                             "total_counts)")
        keys[name] = value
    test_key, _, values = keys.get("test", "").partition(":")
    return BenchmarkData(Path(path).stem, path, keys.get("label"), keys.get("batch"), keys.get("donor"),
                         test_key or None, tuple(v for v in values.split("|") if v), keys.get("proteins"),
                         keys.get("total_counts"))
