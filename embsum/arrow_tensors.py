"""Tensor columns: pyarrow's canonical ``fixed_shape_tensor`` extension type (``arrow.fixed_shape_tensor``).

The tensor columns the platform writes itself (prepare's token ids, the trainer's joined summary
ids, embed's UPE/CPE) are ``pa.fixed_shape_tensor``: parquet keeps it, any Arrow reader understands
it, and ``ray.data.read_parquet`` streams it. They are built and read back with pyarrow's own API
(``FixedShapeTensorArray.from_numpy_ndarray`` / ``to_numpy_ndarray``), so the serving and driver
paths need only pyarrow. The exception is summarize's output: Ray Data writes it through a hash
shuffle that cannot carry pyarrow's type (train/summaries.py, ``read_summaries``), so it holds Ray
Data's own tensor type, which pyarrow reads once ``ray.data`` is imported (it registers the type).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

# Ray Data's own tensor types (ray.data.arrow_tensor, ray.data.arrow_tensor_v2): what older
# versions wrote for summaries and embeddings.
_RAY_TENSOR = b"ray.data.arrow_tensor"


def writable(a: Any, dtype: Any) -> np.ndarray:
    """``a`` as a C-contiguous, writable ``dtype`` array: ``a`` itself when it already is one, else a
    copy. Ray Data batches are often read-only views of Arrow buffers, and ``torch.from_numpy`` /
    ``torch.as_tensor`` share a numpy array's memory, so on a read-only one torch warns that a write
    through the tensor would be undefined ('The given NumPy array is not writable'). A copy is
    what converting the dtype costs anyway."""
    return np.require(a, dtype=dtype, requirements=["C", "W"])


def tensor_array(a: np.ndarray) -> pa.FixedShapeTensorArray:
    """numpy (rows, *shape) -> a ``fixed_shape_tensor`` column of ``rows`` tensors of ``shape``."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(a))


def table_tensor(table: pa.Table, name: str, dtype: Any = None) -> np.ndarray:
    """A ``fixed_shape_tensor`` column of a table -> numpy (rows, *shape) (``dtype``: converted to).

    A column of Ray Data's own tensor type (summaries; embeddings of older versions) is read where
    ``ray.data`` is imported (which registers the type); elsewhere it is refused, naming the column."""
    col = table.column(name)
    if isinstance(col.type, pa.FixedShapeTensorType):
        empty = np.zeros((0, *col.type.shape), dtype=col.type.value_type.to_pandas_dtype())
    elif getattr(col.type, "extension_name", "").encode().startswith(_RAY_TENSOR):
        empty = np.zeros((0, *col.type.shape))
    else:
        _refuse(table, name)
    chunks = [c.to_numpy_ndarray() for c in col.chunks]  # pyarrow's API (Ray's type has the same method)
    out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0] if chunks else empty
    return out.astype(dtype, copy=False) if dtype is not None else out


def _refuse(table: pa.Table, name: str) -> None:
    written_as = (table.schema.field(name).metadata or {}).get(b"ARROW:extension:name", b"")
    if written_as.startswith(_RAY_TENSOR):
        raise ValueError(f"column {name!r} holds Ray Data's tensor type ({written_as.decode()}), which pyarrow "
                         f"reads only once ray.data is imported: embeddings of an older version (rerun `embsum "
                         f"embed` for it: it writes pyarrow's fixed_shape_tensor), or summaries (read them with "
                         f"train.summaries.read_summaries)")
    raise ValueError(f"column {name!r} is not a tensor column (type {table.column(name).type}); expected "
                     f"pyarrow's fixed_shape_tensor")
