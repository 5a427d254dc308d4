"""Arrow arrays built straight from numpy buffers.

``pyarrow.array`` (and ``pyarrow.scalar``) import pandas the first time they run, when it is installed, to recognise
pandas objects: a fifth of a second of CPU at the start of every ``tokenize`` run, which otherwise never needs
pandas. The few array kinds a tokenized dataset is made of are assembled here from their buffers instead
(``pyarrow.Array.from_buffers``, which imports nothing), with the same types and values ``pyarrow.array`` gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_TYPES = {np.dtype(t): pa.from_numpy_dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                                       np.uint32, np.uint64, np.float32, np.float64)}


def _validity(valid: np.ndarray | None) -> tuple[pa.Buffer | None, int]:
    """Arrow's validity bitmap (bit i set: entry i is valid) and the number of nulls."""
    if valid is None or valid.all():
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), int(len(valid) - valid.sum())


def numeric_array(values: np.ndarray, arrow_type: pa.DataType | None = None, *, nan_is_null: bool = False) -> pa.Array:
    """A 1-D numpy array of numbers or booleans as an Arrow array (cast to ``arrow_type`` when given, e.g. int64 for
    any integer); ``nan_is_null``: NaN entries become nulls, as ``pyarrow.array(..., from_pandas=True)`` does."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {values.shape}")
    if arrow_type is not None:
        values = values.astype(arrow_type.to_pandas_dtype() if arrow_type != pa.bool_() else np.bool_, copy=False)
    valid = ~np.isnan(values) if nan_is_null and values.dtype.kind == "f" else None
    validity, nulls = _validity(valid)
    if values.dtype == np.bool_:
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(values), [validity, data], null_count=nulls)
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(_TYPES[values.dtype], len(values), [validity, pa.py_buffer(values)], null_count=nulls)


def string_array(values: Sequence[str | None]) -> pa.Array:
    """Strings (``None``: null) as an Arrow string array."""
    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("more than 2 GiB of text in one column")
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(encoded))
    validity, nulls = _validity(valid)
    buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers, null_count=nulls)


def repeated_string(value: str, n: int) -> pa.Array:
    """``value`` ``n`` times, as an Arrow string array."""
    data = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """Rows ``values[offsets[i]:offsets[i + 1]]`` as an Arrow list array (int32 offsets)."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int32)
    return pa.ListArray.from_arrays(numeric_array(offsets), numeric_array(values))


def table(columns: dict[str, np.ndarray | list]) -> pa.Table:
    """A table of numeric numpy columns and lists of strings."""
    arrays = [string_array(c) if isinstance(c, list) else numeric_array(c) for c in columns.values()]
    return pa.Table.from_arrays(arrays, names=list(columns))
