"""Streaming reads of raw count matrices, one block of cells at a time.

An h5ad file is opened with h5py and its matrix (``X``, a named layer, or ``raw/X``) is read in row chunks: a CSR
matrix by slicing ``indptr``, ``indices`` and ``data``; a dense 2-D dataset by row blocks. The whole matrix is never
loaded, so memory stays flat however many cells a file holds. ``obs`` and ``var`` columns are small and are read whole
with anndata's element readers; the plain encodings (strings, numbers, categoricals of strings) straight into numpy
arrays, so that tokenizing an h5ad never imports pandas (a fifth of a second at every start). A ``.loom`` file
(Geneformer's other input format: genes x cells, dense) is read in column blocks by :class:`LoomSource`. An
in-memory :class:`anndata.AnnData` is wrapped behind the same interface.

Every chunk is checked as it is read: negative, NaN/inf and (unless ``allow_non_integer``) non-integer values raise
:class:`~tokenizer.errors.InvalidCountsError` naming the file, the first offending cell and gene.

The chunk pipeline used by both ``fit`` and ``tokenize`` is :func:`iter_chunks`: read -> check -> library sizes ->
map columns to a target gene index (vocabulary token ids, or the corpus gene list), summing duplicate genes. Each
block is read by a background thread while the one before is worked on (:func:`read_ahead`).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numba
import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from .errors import CorruptFileError, InputError, InvalidCountsError

logger = logging.getLogger(__name__)

_BAD_KINDS = {1: "a negative value", 2: "a NaN or infinite value", 3: "a non-integer value"}


# --- matrix sources ---------------------------------------------------------------------------------------------------
@dataclass
class RawChunk:
    """Rows ``[start, start + n_rows)`` of a matrix in CSR form (``indptr`` rebased to 0, file column indices)."""

    start: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1


class CountSource:
    """A cells x genes count matrix with its ``obs``/``var`` tables, read a block of rows at a time."""

    name: str  # what error messages call it (the file path)
    stem: str  # what the ``source`` column of a tokenized dataset holds (the file name without suffix)
    n_obs: int
    n_vars: int

    def var(self) -> pd.DataFrame:
        raise NotImplementedError

    def obs_names(self) -> np.ndarray:
        raise NotImplementedError

    def obs_keys(self) -> list[str]:
        raise NotImplementedError

    def obs_column(self, key: str) -> pd.Series:
        raise NotImplementedError

    def var_names(self) -> np.ndarray:
        """The var names as a str array."""
        return np.asarray(self.var().index).astype(str)

    def var_keys(self) -> list[str]:
        return [str(k) for k in self.var().columns]

    def var_values(self, key: str):
        """``var[key]``: a numpy array for the plain encodings (object array of str, ``None`` where missing; numbers;
        booleans), or a pandas object for anything else."""
        return self.var()[key]

    def obs_values(self, key: str):
        """``obs[key]`` as :meth:`var_values` gives var columns (no check that it exists: see :meth:`require_obs`)."""
        return self.obs_column(key)

    def read_rows(self, start: int, stop: int, reuse: bool = False, slot: int = 0) -> RawChunk:
        """Rows ``[start, stop)``. With ``reuse``, the arrays may be buffers that the next call with the same
        ``slot`` overwrites (no fresh memory per block; the chunk pipeline alternates two slots, reading one block
        while the caller works on the other)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def require_obs(self, key: str) -> pd.Series:
        """``obs[key]``, or an :class:`InputError` listing the columns there are."""
        self.check_obs_key(key)
        return self.obs_column(key)

    def require_obs_values(self, key: str):
        """:meth:`obs_values` of a column that must exist (else the error of :meth:`require_obs`)."""
        self.check_obs_key(key)
        return self.obs_values(key)

    def check_obs_key(self, key: str) -> None:
        if key not in self.obs_keys():
            available = ", ".join(self.obs_keys()) or "(none)"
            raise InputError(f"{self.name}: obs has no column {key!r}; available columns: {available}")

    def __enter__(self) -> CountSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _encoding(node) -> str:
    value = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
    value = value.decode() if isinstance(value, bytes) else str(value)
    return {"csr": "csr_matrix", "csc": "csc_matrix"}.get(value, value)


class H5adSource(CountSource):
    """An h5ad file read lazily with h5py.

    Args:
        path: the h5ad file.
        layer: ``None`` for ``X``, ``"raw"`` for ``raw/X`` (with ``raw/var``), else the name of a layer.
    """

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.path = Path(path)
        self.name = str(path)
        self.stem = self.path.name.removesuffix(".h5ad") if self.path.name.endswith(".h5ad") else self.path.stem
        if not self.path.is_file():
            raise InputError(f"input file not found: {self.name}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise CorruptFileError(f"{self.name} is not a readable h5ad (HDF5) file: {err}") from None
        try:
            self._open_matrix(layer)
        except BaseException:
            self._file.close()
            raise

    def _open_matrix(self, layer: str | None) -> None:
        f = self._file
        if "obs" not in f or "var" not in f:
            raise CorruptFileError(f"{self.name} is an HDF5 file but not an h5ad (no obs/var groups)")
        if not isinstance(f["obs"], h5py.Group):
            raise CorruptFileError(
                f"{self.name} uses the pre-0.7 h5ad layout; re-save it with a recent anndata "
                "(anndata.read_h5ad(path).write_h5ad(new_path))"
            )
        self._var_path = "var"
        if layer is None:
            matrix_path = "X"
        elif layer == "raw":
            matrix_path, self._var_path = "raw/X", "raw/var"
        else:
            matrix_path = f"layers/{layer}"
            if matrix_path not in f:
                layers = ", ".join(f["layers"].keys()) if "layers" in f else "(none)"
                raise InputError(f"{self.name} has no layer {layer!r}; available layers: {layers}")
        if matrix_path not in f:
            raise CorruptFileError(f"{self.name} has no {matrix_path} matrix")
        self.matrix_path = matrix_path
        node = f[matrix_path]
        if isinstance(node, h5py.Group):
            kind = _encoding(node)
            if kind == "csc_matrix":
                raise InputError(
                    f"{self.name}: {matrix_path} is stored column-major (CSC); streaming cells needs CSR. Convert "
                    f"once with: python -c \"import anndata as ad; a = ad.read_h5ad('{self.name}'); "
                    f"a.X = a.X.tocsr(); a.write_h5ad('{self.stem}_csr.h5ad')\""
                )
            if kind != "csr_matrix" or not all(k in node for k in ("data", "indices", "indptr")):
                raise CorruptFileError(f"{self.name}: {matrix_path} is neither a CSR matrix nor a dense array")
            self.n_obs, self.n_vars = (int(n) for n in node.attrs["shape"])
            self._data, self._indices, self._indptr = node["data"], node["indices"], node["indptr"]
            self._dense = None
            self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            if self._indptr.shape[0] != self.n_obs + 1:
                raise CorruptFileError(f"{self.name}: {matrix_path}/indptr has {self._indptr.shape[0]} entries "
                                       f"for {self.n_obs} cells")
        elif isinstance(node, h5py.Dataset) and node.ndim == 2:
            self.n_obs, self.n_vars = node.shape
            self._dense = node
        else:
            raise CorruptFileError(f"{self.name}: {matrix_path} is neither a CSR matrix nor a 2-D array")
        obs_index = self._index_key("obs")
        n_obs = len(f["obs"][obs_index])
        n_vars = len(f[self._var_path][self._index_key(self._var_path)])
        if (n_obs, n_vars) != (self.n_obs, self.n_vars):
            raise CorruptFileError(f"{self.name}: {matrix_path} is {self.n_obs} x {self.n_vars} but obs/var have "
                                   f"{n_obs} x {n_vars} entries")

    def _index_key(self, group: str) -> str:
        key = self._file[group].attrs.get("_index", "_index")
        return key.decode() if isinstance(key, bytes) else str(key)

    def _read(self, path: str):
        """An obs/var element as anndata reads it: the common encodings directly with h5py (no anndata import,
        several times faster), anything else through anndata."""
        try:
            node = self._file[path]
            value = _read_plain(node)
            if value is not None:
                return value
            import anndata as ad

            return ad.io.read_elem(node)
        except Exception as err:  # h5py and anndata raise several types for damaged elements
            raise CorruptFileError(f"{self.name}: cannot read {path} ({err})") from None

    def _read_values(self, path: str):
        """An obs/var column: numpy for the plain encodings (:func:`_read_numpy`), else as :meth:`_read` reads it."""
        try:
            value = _read_numpy(self._file[path])
        except Exception as err:  # h5py raises several types for damaged elements
            raise CorruptFileError(f"{self.name}: cannot read {path} ({err})") from None
        return value if value is not None else self._read(path)

    def var(self) -> pd.DataFrame:
        return self._read(self._var_path)

    def var_names(self) -> np.ndarray:
        return np.asarray(self._read_values(f"{self._var_path}/{self._index_key(self._var_path)}")).astype(str)

    def var_keys(self) -> list[str]:
        return self._column_keys(self._var_path)

    def var_values(self, key: str):
        return self._read_values(f"{self._var_path}/{key}")

    def obs_values(self, key: str):
        return self._read_values(f"obs/{key}")

    def obs_names(self) -> np.ndarray:
        return np.asarray(self._read_values(f"obs/{self._index_key('obs')}")).astype(str)

    def _column_keys(self, group: str) -> list[str]:
        index = self._index_key(group)
        stored = [k for k in self._file[group].keys() if k != index and not k.startswith("__")]
        order = [k.decode() if isinstance(k, bytes) else str(k)
                 for k in self._file[group].attrs.get("column-order", [])]
        return [k for k in order if k in stored] + [k for k in stored if k not in order]

    def obs_keys(self) -> list[str]:
        return self._column_keys("obs")

    def obs_column(self, key: str) -> pd.Series:
        import pandas as pd

        return pd.Series(self._read(f"obs/{key}"))

    def read_rows(self, start: int, stop: int, reuse: bool = False, slot: int = 0) -> RawChunk:
        if self._dense is not None:
            return _dense_to_chunk(start, np.asarray(self._dense[start:stop]))
        indptr = self._indptr[start:stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        if not reuse or hi == lo:
            return RawChunk(start, indptr - lo, self._indices[lo:hi], self._data[lo:hi])
        # read straight into buffers kept across calls: no fresh pages to fault in and zero for every block, which
        # also leaves the caches to the work done on the block
        buffers = self._buffers.get(slot)
        if buffers is None or len(buffers[0]) < hi - lo:
            size = int((hi - lo) * 1.25)
            buffers = self._buffers[slot] = (np.empty(size, dtype=self._indices.dtype),
                                             np.empty(size, dtype=self._data.dtype))
        indices, data = buffers[0][: hi - lo], buffers[1][: hi - lo]
        self._indices.read_direct(indices, np.s_[lo:hi])
        self._data.read_direct(data, np.s_[lo:hi])
        return RawChunk(start, indptr - lo, indices, data)

    def close(self) -> None:
        self._file.close()


def _attr(node, name: str, default=None):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _read_numpy(node):
    """An obs/var column in a plain encoding as a numpy array, without pandas: a string array (object array of str), a
    numeric or boolean array, or a categorical whose categories are strings (object array, ``None`` where the code is
    -1, as pandas' ``astype(object)`` gives ``NaN``); None for anything else."""
    kind = _attr(node, "encoding-type")
    if isinstance(node, h5py.Dataset):
        return _read_plain(node)
    if kind == "categorical" and "codes" in node and "categories" in node:
        codes, categories = _read_plain(node["codes"]), _read_plain(node["categories"])
        if codes is None or categories is None or codes.dtype.kind not in "iu" or categories.dtype != object:
            return None
        values = np.append(categories, None)  # code -1 (missing) picks the None at the end
        return values[np.where(codes >= 0, codes, len(categories))]
    return None


def _read_plain(node):
    """The anndata encodings obs/var elements usually have (string arrays, numeric and boolean arrays, categoricals,
    nullable integers and booleans, data frames of those), read as anndata reads them; None for anything else."""
    kind = _attr(node, "encoding-type")
    if isinstance(node, h5py.Dataset):
        if kind == "string-array" and node.ndim == 1 and h5py.check_string_dtype(node.dtype) is not None:
            return np.asarray(node.asstr()[...], dtype=object)
        if kind == "array" and node.ndim == 1 and node.dtype.kind in "biuf":
            return node[...]
        return None
    import pandas as pd  # the other encodings are pandas objects

    if kind == "categorical" and "codes" in node and "categories" in node:
        codes, categories = _read_plain(node["codes"]), _read_plain(node["categories"])
        if codes is None or categories is None or codes.dtype.kind not in "iu":
            return None
        return pd.Categorical.from_codes(codes, categories=categories, ordered=bool(_attr(node, "ordered", False)))
    if kind in ("nullable-integer", "nullable-boolean") and "values" in node and "mask" in node:
        values, mask = node["values"][...], node["mask"][...].astype(bool)
        if kind == "nullable-integer" and values.dtype.kind in "iu":
            return pd.arrays.IntegerArray(values, mask)
        if kind == "nullable-boolean" and values.dtype.kind == "b":
            return pd.arrays.BooleanArray(values, mask)
        return None
    if kind == "dataframe":
        index_key = str(_attr(node, "_index", "_index"))
        order = [k.decode() if isinstance(k, bytes) else str(k) for k in _attr(node, "column-order", [])]
        if index_key not in node or any(k not in node for k in order):
            return None
        columns = {k: _read_plain(node[k]) for k in [index_key, *order]}
        if any(v is None for v in columns.values()):
            return None
        index = pd.Index(columns.pop(index_key), name=None if index_key == "_index" else index_key)
        return pd.DataFrame({k: columns[k] for k in order}, index=index)
    return None


class AnnDataSource(CountSource):
    """An in-memory (or backed) :class:`anndata.AnnData` behind the :class:`CountSource` interface."""

    def __init__(self, adata, layer: str | None = None, name: str = "<AnnData>"):
        self.adata = adata
        self.name = name
        self.stem = name
        if layer is None:
            matrix, self._var = adata.X, adata.var
        elif layer == "raw":
            if adata.raw is None:
                raise InputError(f"{name} has no .raw")
            matrix, self._var = adata.raw.X, adata.raw.var
        else:
            if layer not in adata.layers:
                raise InputError(f"{name} has no layer {layer!r}; available layers: "
                                 f"{', '.join(adata.layers.keys()) or '(none)'}")
            matrix, self._var = adata.layers[layer], adata.var
        if matrix is None:
            raise InputError(f"{name} has no count matrix (X is None)")
        import scipy.sparse as sp  # only in-memory AnnData needs it: files are read with h5py

        if sp.issparse(matrix) and matrix.format == "csc":
            logger.warning("%s: converting a CSC matrix to CSR in memory to read cells", name)
            matrix = matrix.tocsr()
        self._matrix = matrix
        self.n_obs, self.n_vars = adata.n_obs, self._var.shape[0]

    def var(self) -> pd.DataFrame:
        return self._var

    def obs_names(self) -> np.ndarray:
        return np.asarray(self.adata.obs_names).astype(str)

    def obs_keys(self) -> list[str]:
        return [str(k) for k in self.adata.obs.columns]

    def obs_column(self, key: str) -> pd.Series:
        return self.adata.obs[key].reset_index(drop=True)

    def read_rows(self, start: int, stop: int, reuse: bool = False, slot: int = 0) -> RawChunk:
        import scipy.sparse as sp

        m = self._matrix
        if sp.issparse(m) and m.format == "csr":
            lo, hi = int(m.indptr[start]), int(m.indptr[stop])
            return RawChunk(start, m.indptr[start:stop + 1].astype(np.int64) - lo, m.indices[lo:hi], m.data[lo:hi])
        block = m[start:stop]
        if sp.issparse(block):
            block = block.tocsr()
            return RawChunk(start, block.indptr.astype(np.int64), block.indices, block.data)
        return _dense_to_chunk(start, np.asarray(block))


class LoomSource(CountSource):
    """A ``.loom`` file as Geneformer reads it, opened lazily with h5py: genes in rows with their Ensembl ids in the
    row attribute ``ensembl_id``, cells in columns, the column attributes as obs (``n_counts`` among them, optionally;
    ``CellID`` names the cells when present, as loompy writes it). ``layer`` reads ``layers/<layer>`` instead of
    ``matrix``.

    The loom format stores a dense genes x cells matrix, so a block of cells is read as column blocks of at most
    ``COLUMNS`` cells (memory: genes x ``COLUMNS`` values) and turned into CSR rows. Attributes are decoded as loompy
    decodes them (bytes as text, XML character references unescaped). loompy itself (the ``loom`` extra) is not needed
    to read: importing it compiles numba code and takes seconds.
    """

    GENE_ID = "ensembl_id"
    CELL_ID = "CellID"
    COLUMNS = 256

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.path = Path(path)
        self.name = str(path)
        self.stem = self.path.stem
        if not self.path.is_file():
            raise InputError(f"input file not found: {self.name}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise CorruptFileError(f"{self.name} is not a readable loom (HDF5) file: {err}") from None
        try:
            self._open(layer)
        except BaseException:
            self._file.close()
            raise

    def _open(self, layer: str | None) -> None:
        f = self._file
        if not isinstance(f.get("matrix"), h5py.Dataset) or "row_attrs" not in f or "col_attrs" not in f:
            raise CorruptFileError(f"{self.name} is an HDF5 file but not a loom file (no matrix, row_attrs and "
                                   "col_attrs)")
        if layer is None:
            self._matrix = f["matrix"]
        else:
            layers = f.get("layers", {})
            if layer not in layers:
                raise InputError(f"{self.name} has no layer {layer!r}; available layers: "
                                 f"{', '.join(layers.keys()) or '(none)'}")
            self._matrix = layers[layer]
        if self._matrix.ndim != 2:
            raise CorruptFileError(f"{self.name}: its matrix is not 2-D")
        self.n_vars, self.n_obs = (int(n) for n in self._matrix.shape)
        self._rows, self._cols = f["row_attrs"], f["col_attrs"]
        if self.GENE_ID not in self._rows:
            raise InputError(f"{self.name} has no row attribute {self.GENE_ID!r}; express reads loom files as "
                             "Geneformer does: genes in rows with their Ensembl ids in row attribute "
                             f"{self.GENE_ID!r}, cells in columns (row attributes here: "
                             f"{', '.join(self._rows.keys()) or '(none)'})")

    def _attr(self, group, key: str) -> np.ndarray:
        try:
            values = group[key][...]
        except (OSError, KeyError, ValueError, TypeError) as err:  # what h5py raises for damaged datasets
            raise CorruptFileError(f"{self.name}: cannot read {group.name}/{key} ({err})") from None
        if values.dtype.kind in "SO":  # text, as loompy decodes it
            text = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
            return np.array([html.unescape(t) if "&" in t else t for t in text], dtype=object)
        return values

    def _keys(self, group, n: int) -> list[str]:
        return [k for k in group if isinstance(group[k], h5py.Dataset) and group[k].shape == (n,)]

    def var(self) -> pd.DataFrame:
        import pandas as pd

        columns = {k: self._attr(self._rows, k) for k in self._keys(self._rows, self.n_vars)}
        return pd.DataFrame(columns, index=pd.Index(np.asarray(columns[self.GENE_ID]).astype(str)))

    def obs_names(self) -> np.ndarray:
        if self.CELL_ID in self._keys(self._cols, self.n_obs):
            return np.asarray(self._attr(self._cols, self.CELL_ID)).astype(str)
        return np.arange(self.n_obs).astype(str)

    def obs_keys(self) -> list[str]:
        return [k for k in self._keys(self._cols, self.n_obs) if k != self.CELL_ID]

    def var_names(self) -> np.ndarray:
        return np.asarray(self._attr(self._rows, self.GENE_ID)).astype(str)

    def var_keys(self) -> list[str]:
        return self._keys(self._rows, self.n_vars)

    def var_values(self, key: str):
        return self._attr(self._rows, key)

    def obs_values(self, key: str):
        return self._attr(self._cols, key)

    def obs_column(self, key: str) -> pd.Series:
        import pandas as pd

        return pd.Series(self._attr(self._cols, key))

    def read_rows(self, start: int, stop: int, reuse: bool = False, slot: int = 0) -> RawChunk:
        parts = [_dense_to_chunk(a, np.ascontiguousarray(self._matrix[:, a:min(a + self.COLUMNS, stop)].T))
                 for a in range(start, stop, self.COLUMNS)]
        if len(parts) == 1:
            return parts[0]
        sizes = np.array([len(p.data) for p in parts])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, np.cumsum(sizes) - sizes)])
        return RawChunk(start, indptr.astype(np.int64), np.concatenate([p.indices for p in parts]),
                        np.concatenate([p.data for p in parts]))

    def close(self) -> None:
        self._file.close()


def _dense_to_chunk(start: int, block: np.ndarray) -> RawChunk:
    rows, cols = np.nonzero(block)  # NaN counts as non-zero, so it is caught by the checks
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=block.shape[0]), out=indptr[1:])
    return RawChunk(start, indptr, cols.astype(np.int32), block[rows, cols])


def open_source(item, layer: str | None = None) -> CountSource:
    """A :class:`CountSource` for a path (``.loom``: :class:`LoomSource`, anything else h5ad) or an AnnData object."""
    if isinstance(item, CountSource):
        return item
    if isinstance(item, (str, os.PathLike)):
        if str(item).lower().endswith(".loom"):
            return LoomSource(item, layer=layer)
        return H5adSource(item, layer=layer)
    if hasattr(item, "obs") and hasattr(item, "var") and hasattr(item, "X"):
        return AnnDataSource(item, layer=layer)
    raise TypeError(f"expected an h5ad path or an AnnData, got {type(item).__name__}")


def file_key(name: str) -> int:
    """A stable 64-bit key for a source (its file name), mixed with row numbers into per-cell keys."""
    return int.from_bytes(hashlib.blake2b(Path(name).name.encode(), digest_size=8).digest(), "little")


def cell_keys(source_key: int, rows: np.ndarray) -> np.ndarray:
    """Per-cell keys ``source_key + row`` (uint64, wrapping): unique within a file, independent of chunking."""
    return np.uint64(source_key) + np.asarray(rows, dtype=np.uint64)


# --- gene ids ---------------------------------------------------------------------------------------------------------
def load_gene_map(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object ``{id in the data: vocabulary id}`` (e.g. gene symbol -> Ensembl id)."""
    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"gene map not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not a JSON file ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise CorruptFileError(f"{path} must hold a JSON object mapping gene ids to gene ids (strings)")
    return mapping


@dataclass
class GeneColumns:
    """The gene id of every column of a matrix after mapping (``''`` where the column is dropped)."""

    ids: np.ndarray  # (n_vars,) str
    symbols: np.ndarray  # (n_vars,) str, '' where unknown
    labels: np.ndarray  # (n_vars,) str, the original var name (for messages)
    n_empty: int  # columns with an empty id
    n_unmapped: int  # columns the gene map had no entry for


def read_gene_columns(source: CountSource, *, gene_id_key: str | None = None,
                      gene_map: dict[str, str] | None = None) -> GeneColumns:
    """Gene ids from ``var[gene_id_key]`` (or ``var_names``), mapped through ``gene_map`` when given.

    Ids not found in ``gene_map`` (tried as is, then upper-cased) become ``''``; empty ids are dropped by callers.
    """
    labels = source.var_names()
    keys = source.var_keys()
    if gene_id_key is None:
        raw = labels.tolist()
    else:
        if gene_id_key not in keys:
            raise InputError(f"{source.name}: var has no column {gene_id_key!r}; available columns: "
                             f"{', '.join(map(str, keys)) or '(none)'} (or leave --gene_id_key out to use "
                             "var_names)")
        raw = _as_text(source.var_values(gene_id_key)).tolist()
    raw = [r.strip() for r in raw]
    empty = np.array([r == "" or r.lower() in ("nan", "none") for r in raw], dtype=bool)
    n_unmapped = 0
    if gene_map is not None:
        mapped = [_lookup(gene_map, r) for r in raw]
        mapped = [m if m is not None else _lookup(gene_map, r.upper()) for m, r in zip(mapped, raw)]
        n_unmapped = sum(1 for m, e in zip(mapped, empty) if m is None and not e)
        ids = ["" if m is None else str(m) for m in mapped]
    else:
        ids = ["" if e else r for r, e in zip(raw, empty)]
    if "gene_symbol" in keys:
        symbols = _as_text(source.var_values("gene_symbol"))
    elif gene_id_key is not None or gene_map is not None:
        symbols = labels
    else:
        symbols = np.full(len(labels), "", dtype=object).astype(str)
    return GeneColumns(np.asarray(ids, dtype=str).reshape(-1), symbols, labels, int(empty.sum()), n_unmapped)


def is_missing(value) -> bool:
    """Whether a value of an object column is missing (None or NaN), as pandas' ``isna`` sees it."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _lookup(mapping: dict, key: str):
    """``mapping[key]``, None where it is absent or missing, as ``Series.map`` reads a dict."""
    value = mapping.get(key)
    return None if is_missing(value) else value


def _as_text(values) -> np.ndarray:
    """A column as a str array, ``''`` where a value is missing: ``Series(values).astype(object).fillna('')
    .astype(str)``, done without pandas for an object array (the plain string encodings)."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return np.array(["" if is_missing(v) else str(v) for v in values.tolist()], dtype=str).reshape(-1)
    import pandas as pd

    return np.asarray(pd.Series(values).astype(object).fillna("")).astype(str)


def column_map(ids: np.ndarray, target: Sequence[str]) -> np.ndarray:
    """``(n_vars,)`` int64 position of each column's gene id in ``target`` (unique ids, e.g. a vocabulary's genes or
    a ``pandas.Index``), ``-1`` where absent or empty."""
    position = {g: i for i, g in enumerate(target)}
    ids = np.asarray(ids)
    col_map = np.fromiter((position.get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))
    col_map[ids == ""] = -1
    return col_map


def duplicated_targets(col_map: np.ndarray) -> np.ndarray:
    """Target positions that more than one column maps to."""
    mapped = col_map[col_map >= 0]
    counts = np.bincount(mapped) if len(mapped) else np.zeros(0, dtype=np.int64)
    return np.flatnonzero(counts > 1)


# --- numba kernels ----------------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _scan(indptr, indices, data, n_cols, allow_non_integer):
    """Row sums over all genes, whether every stored value is positive, and the position and kind of the first bad
    entry (-1, 0 when all are fine; kind 4: a column index outside the matrix)."""
    n = indptr.shape[0] - 1
    totals = np.zeros(n, dtype=np.float64)
    positive = True
    for i in range(n):
        s = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            if indices[j] < 0 or indices[j] >= n_cols:
                return totals, positive, j, 4
            v = np.float64(data[j])
            if not v >= 0.0:  # negative or NaN
                return totals, positive, j, 2 if v != v else 1
            if v == np.inf:
                return totals, positive, j, 2
            if not allow_non_integer and v != np.floor(v):
                return totals, positive, j, 3
            positive &= v > 0.0
            s += v
        totals[i] = s
    return totals, positive, -1, 0


@numba.njit(cache=True, nogil=True)
def _scan_integers(indptr, indices, data, n_cols):
    """:func:`_scan` for integer counts of at most 32 bits: only negative values can be bad, and the sums are exact
    integers (so summing them as int64 gives the float64 sums bit for bit), in loops the compiler vectorises."""
    n = indptr.shape[0] - 1
    totals = np.zeros(n, dtype=np.float64)
    positive = True
    for i in range(n):
        s = 0
        low = 1
        first_col = 0
        last_col = 0
        for j in range(indptr[i], indptr[i + 1]):
            v = np.int64(data[j])
            s += v
            low = min(low, v)
            c = np.int64(indices[j])
            first_col = min(first_col, c)
            last_col = max(last_col, c)
        if low < 0 or first_col < 0 or last_col >= n_cols:
            for j in range(indptr[i], indptr[i + 1]):
                if indices[j] < 0 or indices[j] >= n_cols:
                    return totals, positive, j, 4
                if data[j] < 0:
                    return totals, positive, j, 1
        positive &= low > 0
        totals[i] = np.float64(s)
    return totals, positive, -1, 0


_NARROW_INTEGERS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32)}


def scan_counts(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int,
                allow_non_integer: bool) -> tuple[np.ndarray, bool, int, int]:
    """Library sizes of a CSR block, whether all its stored values are positive, and its first bad entry (position
    and kind; ``-1, 0`` when all are fine)."""
    if data.dtype in _NARROW_INTEGERS:
        return _scan_integers(indptr, indices, data, n_cols)
    return _scan(indptr, indices, data, n_cols, allow_non_integer)


# Position of the lowest set bit of a uint64 by de Bruijn multiplication (numba has no count-trailing-zeros).
_DEBRUIJN_INT = 0x022FDD63CC95386D
_DEBRUIJN = np.uint64(_DEBRUIJN_INT)
_DEBRUIJN_TABLE = np.zeros(64, dtype=np.int64)
for _i in range(64):
    _DEBRUIJN_TABLE[(((1 << _i) * _DEBRUIJN_INT) & 0xFFFFFFFFFFFFFFFF) >> 58] = _i


@numba.njit(cache=True, nogil=True)
def _remap(indptr, indices, data, col_map, n_target, merge, table):
    """Map columns to target ids, dropping unmapped columns (col_map -1) and explicitly stored zeros.

    With ``merge``, entries that map to the same target in a row are summed and each row comes out in ascending target
    order (a scratch accumulator plus a bitmap of touched targets, so no per-row sort).
    """
    n = indptr.shape[0] - 1
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    nnz = 0
    for j in range(indptr[n]):
        if col_map[indices[j]] >= 0 and data[j] != 0:
            nnz += 1
    out_idx = np.empty(nnz, dtype=np.int64)
    out_val = np.empty(nnz, dtype=np.float64)
    pos = 0
    if not merge:
        for i in range(n):
            for j in range(indptr[i], indptr[i + 1]):
                t = col_map[indices[j]]
                if t >= 0 and data[j] != 0:
                    out_idx[pos] = t
                    out_val[pos] = data[j]
                    pos += 1
            out_indptr[i + 1] = pos
        return out_indptr, out_idx, out_val
    scratch = np.zeros(n_target, dtype=np.float64)
    n_words = (n_target + 63) // 64
    bits = np.zeros(n_words, dtype=np.uint64)
    one = np.uint64(1)
    for i in range(n):
        for j in range(indptr[i], indptr[i + 1]):
            t = col_map[indices[j]]
            if t >= 0 and data[j] != 0:
                scratch[t] += data[j]
                bits[t >> 6] |= one << np.uint64(t & 63)
        for w in range(n_words):
            word = bits[w]
            while word != 0:
                low = word & (~word + one)  # lowest set bit
                t = w * 64 + table[(low * _DEBRUIJN) >> np.uint64(58)]
                out_idx[pos] = t
                out_val[pos] = scratch[t]
                scratch[t] = 0.0
                pos += 1
                word ^= low
            bits[w] = 0
        out_indptr[i + 1] = pos
    return out_indptr, out_idx[:pos], out_val[:pos]


# --- the chunk pipeline -----------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """Rows ``[start, start + n_rows)`` of one source with library sizes.

    Normally ``indices`` are target ids (ascending per row when the plan merges) and ``data`` float64 counts, and
    ``col_map`` is the identity; with ``remap=False`` they are the file's own columns and values, to be read through
    ``col_map`` (which saves a copy when the consumer can do the lookup itself).
    """

    start: int
    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) target ids, or file columns
    data: np.ndarray  # (nnz,) counts
    totals: np.ndarray  # (n_rows,) float64 library size; 0 for cells with no counts at all
    col_map: np.ndarray  # indices -> target ids (-1: not a target); every index lies within it (checked)
    positive: bool = False  # every stored value is > 0

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.n_rows, dtype=np.int64)


@dataclass
class SourcePlan:
    """How one source's columns map to the target index, and where its library sizes come from."""

    col_map: np.ndarray  # (n_vars,) int64 target id or -1
    merge: bool  # sum duplicate targets / emit ascending ids
    n_target: int
    obs_totals: np.ndarray | None = None  # (n_obs,) library sizes from obs, when a key was given
    allow_non_integer: bool = False

    def __post_init__(self) -> None:
        self.identity = np.arange(self.n_target, dtype=np.int64)


def read_obs_totals(source: CountSource, key: str) -> np.ndarray:
    """``obs[key]`` as float64 library sizes, checked to be finite and non-negative."""
    column = source.require_obs_values(key)
    if isinstance(column, np.ndarray) and column.dtype.kind in "biuf":
        totals = column.astype(np.float64)
    else:
        import pandas as pd

        try:
            totals = pd.to_numeric(pd.Series(column), errors="raise").to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{source.name}: obs[{key!r}] is not numeric, so it cannot be the library size") \
                from None
    bad = ~np.isfinite(totals) | (totals < 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{source.name}: obs[{key!r}] is {totals[row]} for cell {str(source.obs_names()[row])!r} "
                         f"(row {row}); library sizes must be finite and >= 0")
    return totals


def read_ahead(source: CountSource, blocks: list[tuple[int, int]]) -> Iterator[RawChunk]:
    """``source.read_rows(a, b, reuse=True)`` for every block ``(a, b)``, each block read by a background thread
    while the caller works on the one before.

    On a file that is not in the page cache, reading waits on the disk for about as long as checking and encoding
    the block takes; overlapped, the two no longer add up. h5py releases the GIL while it reads and the kernels that
    consume a block release it while they run, so the thread and the caller really run at once. Blocks alternate
    between two buffer slots of the source: a block stays valid until the caller asks for the next one, when the
    read of the one after starts into its buffers. Exceptions of a read (a damaged file) are raised where the block
    would have been yielded; leaving the loop early waits for the read in flight.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="express-read") as pool:
        pending = pool.submit(source.read_rows, *blocks[0], True, 0) if blocks else None
        for k in range(len(blocks)):
            raw = pending.result()
            if k + 1 < len(blocks):
                pending = pool.submit(source.read_rows, *blocks[k + 1], True, (k + 1) % 2)
            yield raw


def iter_chunks(source: CountSource, plan: SourcePlan, start: int, stop: int, chunk_size: int,
                labels: np.ndarray | None = None, remap: bool = True) -> Iterator[Chunk]:
    """Read, check and map rows ``[start, stop)`` in chunks of ``chunk_size`` cells.

    ``labels`` (gene names per column) make error messages name the gene; they default to the column number.
    ``remap=False`` leaves the columns unmapped (see :class:`Chunk`); it needs a plan without duplicates to merge.
    A chunk's ``indices`` and ``data`` may be buffers the next chunk is read into: use (or copy) them before asking
    for the next one.
    """
    if not remap and plan.merge:
        raise ValueError("duplicate genes must be merged: iterate with remap=True")
    blocks = [(a, min(a + chunk_size, stop)) for a in range(start, stop, chunk_size)]
    for raw, (a, b) in zip(read_ahead(source, blocks), blocks):  # the reader first: it runs to its end and joins
        totals, positive, bad, kind = scan_counts(raw.indptr, raw.indices, raw.data, len(plan.col_map),
                                                  plan.allow_non_integer)
        if bad >= 0:
            _raise_bad_value(source, raw, int(bad), int(kind), labels)
        if plan.obs_totals is not None:
            obs_totals = plan.obs_totals[a:b]
            short = obs_totals < totals * (1.0 - 1e-6)
            if short.any():
                i = int(np.argmax(short))
                raise InputError(
                    f"{source.name}: the library size in obs ({obs_totals[i]:g}) is smaller than the counts in the "
                    f"matrix ({totals[i]:g}) for cell {str(source.obs_names()[a + i])!r} (row {a + i}); the obs column "
                    "is not the total count of each cell (leave --total_counts_key out to use row sums)"
                )
            totals = np.where(totals > 0, obs_totals, 0.0)
        if not remap:
            yield Chunk(a, raw.indptr, raw.indices, raw.data, totals, plan.col_map, positive)
            continue
        indptr, indices, data = _remap(raw.indptr, raw.indices, raw.data, plan.col_map, plan.n_target, plan.merge,
                                       _DEBRUIJN_TABLE)
        yield Chunk(a, indptr, indices, data, totals, plan.identity, True)  # remapping drops stored zeros


def _raise_bad_value(source: CountSource, raw: RawChunk, pos: int, kind: int, labels: np.ndarray | None) -> None:
    row_in_chunk = int(np.searchsorted(raw.indptr, pos, side="right")) - 1
    row = raw.start + row_in_chunk
    col = int(raw.indices[pos])
    if kind == 4:
        raise CorruptFileError(
            f"{source.name}: the count matrix stores column index {col} at cell {str(source.obs_names()[row])!r} "
            f"(row {row}), outside its {source.n_vars} columns; the file is damaged"
        )
    gene = f"{str(labels[col])!r} (column {col})" if labels is not None else f"column {col}"
    cell = str(source.obs_names()[row])
    hint = (
        "express expects raw UMI counts; if this matrix is normalised or log-transformed, point to the raw counts "
        "(e.g. --layer counts or --layer raw)"
    )
    if kind == 3:
        hint += ", or pass --allow_non_integer (allow_non_integer=True) to use non-integer values anyway"
    raise InvalidCountsError(
        f"{source.name}: the count matrix holds {_BAD_KINDS[kind]} ({float(raw.data[pos]):g}) at cell {cell!r} "
        f"(row {row}), gene {gene}; {hint}"
    )


def read_floor(path: str | os.PathLike, chunk_size: int = 2048, layer: str | None = None) -> int:
    """Read every row of a file in chunks and do nothing else (the I/O floor benchmarks compare against).

    Returns the number of stored entries read."""
    nnz = 0
    with H5adSource(path, layer=layer) as source:
        for a in range(0, source.n_obs, chunk_size):
            chunk = source.read_rows(a, min(a + chunk_size, source.n_obs), reuse=True)
            nnz += len(chunk.data)
    return nnz


def write_floor(path: str | os.PathLike, n_bytes: int, block: int = 16 << 20) -> int:
    """Write ``n_bytes`` to a new file in blocks and do nothing else (the floor for writing a tokenized dataset of
    that size, which benchmarks compare against). Returns the number of bytes written."""
    buffer = memoryview(bytearray(block))
    written = 0
    with open(path, "wb", buffering=0) as f:
        while written < n_bytes:
            written += f.write(buffer[: min(block, n_bytes - written)])
    return written
