"""Ray Data tensor columns read without Ray (the serving and driver paths need only pyarrow).

Ray writes fixed-shape tensor columns as an Arrow extension type; pyarrow without Ray's types
registered sees its storage, a (large_)list of scalars, or a fixed_size_list. Either way the
values are one contiguous buffer, reshaped here without a Python loop.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa


def writable(a: Any, dtype: Any) -> np.ndarray:
    """``a`` as a C-contiguous, writable ``dtype`` array: ``a`` itself when it already is one, else a
    copy. Ray Data batches are often read-only views of Arrow buffers, and ``torch.from_numpy`` /
    ``torch.as_tensor`` share a numpy array's memory, so on a read-only one torch warns that a write
    through the tensor would be undefined ('The given NumPy array is not writable'). A copy is
    what converting the dtype costs anyway."""
    return np.require(a, dtype=dtype, requirements=["C", "W"])


def table_tensor(table: pa.Table, name: str, dtype: Any = None) -> np.ndarray:
    """A tensor column of a table read from parquet -> numpy (rows, *shape)."""
    return tensor_to_numpy(table.column(name), dtype, shape=column_shape(table.schema.field(name)))


def tensor_to_numpy(col: Any, dtype: Any = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(Chunked) Arrow column of equal-shape tensors -> numpy (rows, *shape)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if hasattr(col, "to_numpy_ndarray"):  # Ray's extension array (ray imported)
        out = np.asarray(col.to_numpy_ndarray())
        return out.astype(dtype, copy=False) if dtype is not None else out
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    n = len(col)
    arr = col
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    flat = arr.to_numpy(zero_copy_only=False)
    if n == 0:
        return np.zeros((0,), dtype=dtype or flat.dtype)
    shape = shape or _shape_from_type(col.type) or (len(flat) // n,)
    out = flat.reshape(n, *shape)
    return out.astype(dtype, copy=False) if dtype is not None else out


def _shape_from_type(tp: Any) -> tuple[int, ...] | None:
    meta = getattr(tp, "__arrow_ext_serialize__", None)
    if meta is not None:
        try:
            return tuple(json.loads(meta().decode()))
        except (ValueError, AttributeError):
            return None
    return None


def column_shape(field: pa.Field) -> tuple[int, ...] | None:
    """The tensor shape Ray recorded in a parquet field's metadata (None if not a tensor column)."""
    md = field.metadata or {}
    raw = md.get(b"ARROW:extension:metadata")
    if raw is None:
        return None
    try:
        shape = json.loads(raw.decode())
    except ValueError:
        return None
    return tuple(shape) if isinstance(shape, list) else None
