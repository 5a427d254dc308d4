"""Arrow arrays built from numpy buffers (tokenizer/arrow.py) equal pyarrow.array's; obs columns read without pandas
give the columns the pandas path gave; a tokenize run imports neither pandas nor pyarrow.compute."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tokenizer.arrow import (
    list_array,
    numeric_array,
    repeated_string,
    string_array,
    table,
)
from tokenizer.synthetic import synthetic_adata
from tokenizer.tokenize import tokenize_files


@pytest.mark.parametrize("values", [
    np.array([1, -2, 3], dtype=np.int8), np.array([1, 2**31 - 1], dtype=np.int32), np.arange(5, dtype=np.int64),
    np.array([0.5, -1.25], dtype=np.float32), np.array([1.0, 2.5, 1e300]), np.array([True, False, True, True]),
    np.zeros(0, dtype=np.int64), np.arange(20)[::3],
])
def test_numeric_arrays_equal_pyarrow(values):
    got = numeric_array(values)
    got.validate(full=True)
    assert got.equals(pa.array(values)) and got.type == pa.array(values).type


def test_nan_is_null_and_casts_as_from_pandas():
    values = np.array([1.0, np.nan, 3.0, np.nan])
    got = numeric_array(values, pa.float64(), nan_is_null=True)
    got.validate(full=True)
    assert got.null_count == 2 and got.equals(pa.array(values, from_pandas=True))
    assert numeric_array(values).null_count == 0  # NaN stays a value unless asked
    ints = np.array([3, 4], dtype=np.int32)
    assert numeric_array(ints, pa.int64()).equals(pa.array(ints, type=pa.int64()))
    assert numeric_array(ints, pa.float64()).to_pylist() == [3.0, 4.0]
    bools = np.array([True, False, True])
    assert numeric_array(bools, pa.bool_(), nan_is_null=True).equals(pa.array(bools))


@pytest.mark.parametrize("values", [["a", None, "héllo", ""], [], [None, None], ["x" * 1000, "ÿ"]])
def test_string_arrays_equal_pyarrow(values):
    got = string_array(values)
    got.validate(full=True)
    assert got.equals(pa.array(values, type=pa.string()))


def test_repeated_lists_and_tables():
    assert repeated_string("cells", 3).to_pylist() == ["cells"] * 3
    assert repeated_string("x", 0).to_pylist() == []
    got = list_array(np.array([0, 2, 2, 5]), np.array([1, 2, 3, 4, 5], dtype=np.int32))
    got.validate(full=True)
    assert got.to_pylist() == [[1, 2], [], [3, 4, 5]] and got.type == pa.list_(pa.int32())
    got = table({"n": np.arange(3), "name": ["a", "b", None], "f": np.array([0.5, 1.5, 2.5], dtype=np.float32)})
    expected = pa.table({"n": pa.array(np.arange(3)), "name": pa.array(["a", "b", None]),
                         "f": pa.array(np.array([0.5, 1.5, 2.5], dtype=np.float32))})
    assert got.equals(expected)


@pytest.fixture
def obs_file(tmp_path, shared):
    """An h5ad whose obs holds the encodings anndata writes: strings, categoricals of strings (with a missing value)
    and of numbers, integers, floats with NaN, booleans and nullable integers; its genes are Geneformer's first 50."""
    adata = synthetic_adata(n_cells=40, n_genes=50, seed=5)
    tokens = json.loads((shared("geneformer/gc95M") / "token_dictionary.json").read_text())
    adata.var["ensembl_id"] = [g for g in sorted(tokens, key=tokens.get) if not g.startswith("<")][:50]
    n = adata.n_obs
    rng = np.random.default_rng(0)
    adata.obs["label"] = pd.Categorical(rng.choice(["T cell", "B cell", "NK"], n))
    adata.obs.loc[adata.obs_names[3], "label"] = np.nan
    adata.obs["name"] = np.array([f"cell-{i}-é" for i in range(n)], dtype=object)
    adata.obs["count"] = rng.integers(0, 100, n)
    adata.obs["score"] = rng.normal(size=n)
    adata.obs.loc[adata.obs_names[5], "score"] = np.nan
    adata.obs["flag"] = rng.random(n) > 0.5
    adata.obs["maybe"] = pd.array(rng.integers(0, 5, n), dtype="Int64")
    adata.obs.loc[adata.obs_names[7], "maybe"] = pd.NA
    adata.obs["level"] = pd.Categorical(rng.choice([1, 2, 3], n))
    path = tmp_path / "obs.h5ad"
    adata.write_h5ad(path)
    return path, ad.read_h5ad(path).obs


def test_obs_columns_come_through_as_before(tmp_path, obs_file, shared):
    """Each obs column gets the Arrow type and values the pandas conversion gave: text (categoricals too) as strings
    with nulls where missing, integers as int64, floats as float64 with NaN as null, booleans, nullable integers."""
    path, obs = obs_file
    keys = ["label", "name", "count", "score", "flag", "maybe", "level"]
    out = tokenize_files([path], None, tmp_path / "gf", geneformer_dicts=shared("geneformer/gc95M"),
                         gene_id_key="ensembl_id", obs_keys=keys, progress=False)
    state = json.loads((out / "state.json").read_text())
    got = pa.concat_tables([pa.ipc.open_stream(pa.OSFile(str(out / e["filename"]))).read_all()
                            for e in state["_data_files"]])
    rows = [list(obs.index).index(c) for c in got.column("cell_id").to_pylist()]
    obs = obs.iloc[rows]
    assert got.schema.field("label").type == pa.string() and got.schema.field("level").type == pa.string()
    assert got.column("label").to_pylist() == [None if pd.isna(v) else str(v) for v in obs["label"]]
    assert got.column("name").to_pylist() == list(obs["name"])
    assert got.column("level").to_pylist() == [str(v) for v in obs["level"]]
    assert got.schema.field("count").type == pa.int64() and got.column("count").to_pylist() == list(obs["count"])
    assert got.schema.field("score").type == pa.float64()
    assert got.column("score").to_pylist() == [None if np.isnan(v) else v for v in obs["score"]]
    assert got.schema.field("flag").type == pa.bool_() and got.column("flag").to_pylist() == list(obs["flag"])
    assert got.schema.field("maybe").type == pa.int64()
    assert got.column("maybe").to_pylist() == [None if pd.isna(v) else int(v) for v in obs["maybe"]]


def test_a_tokenize_run_imports_neither_pandas_nor_pyarrow_compute(tmp_path, obs_file, shared):
    """Importing pandas costs a fifth of a second of CPU at every start, pyarrow.compute a twentieth: an h5ad with
    plain obs columns is tokenized without either (as a new process does it)."""
    path, _ = obs_file
    code = (
        "import sys; from tokenizer.cli import main; "
        f"code = main(['tokenize', {str(path)!r}, '--geneformer_dicts', {str(shared('geneformer/gc95M'))!r}, "
        f"'--gene_id_key', 'ensembl_id', '--obs_keys', 'label,name,count,score,flag', '--out', "
        f"{str(tmp_path / 'out')!r}, '--quiet']); "
        "print(code, 'pandas' in sys.modules, 'pyarrow.compute' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-3:] == ["0", "False", "False"], result.stdout + result.stderr
