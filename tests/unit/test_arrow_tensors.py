"""Tensor columns are pyarrow's canonical fixed_shape_tensor, written and read with pyarrow's own API:
embeddings shards and summaries round-trip through parquet exactly, any Arrow reader sees the
extension type, and a column of Ray Data's own tensor type (older files) read without Ray is
refused with a message naming the column and what to rerun."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embsum.arrow_tensors import table_tensor, tensor_array
from embsum.embeddings import embedding_table, write_shard


def test_round_trip_through_parquet_files_of_several_chunks(tmp_path) -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)  # (rows, N, D)
    for k in range(2):  # two files: a dataset read gives a column of two chunks
        pq.write_table(pa.table({"id": [f"i{k}{j}" for j in range(3)], "cpe": tensor_array(x[3 * k:3 * k + 3])}),
                       tmp_path / f"part-{k}.parquet")
    table = pads.dataset(str(tmp_path), format="parquet").to_table()
    assert table.column("cpe").num_chunks == 2
    assert table.schema.field("cpe").type == pa.fixed_shape_tensor(pa.float32(), [4, 5])
    got = table_tensor(table, "cpe")
    order = np.argsort(table.column("id").to_pylist())
    np.testing.assert_array_equal(got[order], x)
    assert got.dtype == np.float32 and table_tensor(table, "cpe", np.float64).dtype == np.float64
    empty = table_tensor(table.slice(0, 0), "cpe")
    assert empty.shape == (0, 4, 5) and empty.dtype == np.float32


def test_embedding_shards_hold_the_canonical_type(tmp_path) -> None:
    upe = np.random.default_rng(0).standard_normal((3, 2, 8), dtype=np.float32)  # (U, M, D)
    write_shard(embedding_table({"user_id": ["a", "b", "c"], "upe": upe, "summary": ["x", "y", "z"]}),
                str(tmp_path / "u.parquet"))
    read = pq.read_table(tmp_path / "u.parquet")  # plain pyarrow: no Ray type registered or needed
    assert isinstance(read.column("upe").type, pa.FixedShapeTensorType)
    assert read.schema.field("upe").type.extension_name == "arrow.fixed_shape_tensor"
    np.testing.assert_array_equal(read.column("upe").combine_chunks().to_numpy_ndarray(), upe)
    np.testing.assert_array_equal(table_tensor(read, "upe"), upe)


def test_ray_tensor_columns_without_ray_and_plain_columns_are_refused() -> None:
    storage = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))
    # What pyarrow yields for a Ray-typed parquet column where Ray has not registered its type.
    field = pa.field("upe", storage.type, metadata={b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
                                                    b"ARROW:extension:metadata": b"[2]"})
    older = pa.Table.from_arrays([storage], schema=pa.schema([field]))
    with pytest.raises(ValueError, match=r"column 'upe' holds Ray Data's tensor type \(ray.data.arrow_tensor_v2\)"
                                         r".*rerun `embsum embed`"):
        table_tensor(older, "upe")
    with pytest.raises(ValueError, match=r"column 'x' is not a tensor column \(type int64\)"):
        table_tensor(pa.table({"x": [1, 2]}), "x")
