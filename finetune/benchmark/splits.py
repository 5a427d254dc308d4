"""The real datasets of ``../shared/data`` the benchmarks read, and the cells each fine-tuning split holds out.

``SPLITS``: name -> ``(file, obs column, held-out values)``. Pretraining for the benchmark leaves every cell whose obs
column holds one of those values out of its corpus (:func:`held_out_mask`), in any file that has the column, so the
pretrained arm never sees its test cells, even unlabelled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = {
    "cite": ("bmmc_cite_600.h5ad", "batch", ["s1d2"]),
    "cellbench": ("cellbench_lung_1408.h5ad", "batch", ["sc_celseq2_5cl_p3", "sc_dropseq"]),
    "kang": ("kang2018_pbmc_12261.h5ad", "donor", ["1244", "1256"]),
}


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (``EXPRESS_SHARED_DATA`` overrides it)."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("EXPRESS_SHARED_DATA", default))


def held_out_mask(obs: pd.DataFrame) -> np.ndarray:
    """True for cells any fine-tuning split tests on: their value of a split column is one of its test values."""
    mask = np.zeros(len(obs), dtype=bool)
    for _, column, values in SPLITS.values():
        if column in obs.columns:
            mask |= obs[column].astype(str).isin([str(v) for v in values]).to_numpy()
    return mask
