"""The file-by-file summary join (no Ray): each train/ file's examples get their own summaries by
example_id from summaries/part=<stem>/, EOS-only without one, and a stale summaries/ fails closed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embsum.data import layout
from train.summaries import attach_summaries, check_partitions

S = 4
EMPTY = np.array([1, 0, 0, 0], np.int32)  # EOS-only


def _summaries(data_dir, part: str, ids: list[str], first: list[int]) -> None:
    folder = data_dir / layout.SUMMARIES / f"{layout.PART_COLUMN}={part}"
    folder.mkdir(parents=True)
    summ = np.zeros((len(ids), S), np.int32)  # (n, S)
    summ[:, 0] = first
    pq.write_table(pa.table({"example_id": ids, "summary_ids": pa.FixedShapeTensorArray.from_numpy_ndarray(summ)}),
                   folder / "0.parquet")


def test_join_is_by_example_within_the_file_partition(tmp_path):
    # Same example id in two partitions: each file sees only its own partition's summaries.
    _summaries(tmp_path, "part-a", ["u1:0", "u1:1"], [11, 12])
    _summaries(tmp_path, "part-b", ["u1:0"], [21])
    batch = pa.table({"example_id": ["u1:1", "u1:0", "u2:0", "u1:0"],
                      "user_id": ["u1", "u1", "u2", "u1"],
                      "path": [str(tmp_path / "train" / f"part-{p}.parquet") for p in "aaab"]})
    out = attach_summaries(batch, str(tmp_path / layout.SUMMARIES), EMPTY)
    assert out.column_names == ["example_id", "user_id", "summary_ids"]
    summ = out.column("summary_ids").combine_chunks().to_numpy_ndarray()  # (B, S)
    assert summ.shape == (4, S) and summ.dtype == np.int32
    assert summ[:, 0].tolist() == [12, 11, 1, 21]  # u2:0 has none: EOS-only
    np.testing.assert_array_equal(summ[2], EMPTY)


def test_a_summaries_folder_from_another_prepare_fails_closed(tmp_path):
    (tmp_path / layout.TRAIN).mkdir()
    pq.write_table(pa.table({"example_id": ["u1:0"]}), tmp_path / layout.TRAIN / "part-a.parquet")
    (tmp_path / layout.SUMMARIES).mkdir()
    pq.write_table(pa.table({"example_id": ["u1:0"]}), tmp_path / layout.SUMMARIES / "part-0.parquet")
    with pytest.raises(ValueError, match="not partitioned like the prepared data"):
        check_partitions(tmp_path)
    _summaries(tmp_path, "part-old", ["u1:0"], [5])
    with pytest.raises(ValueError, match="prepare ran again after summarize"):
        check_partitions(tmp_path)


def test_summaries_read_in_ray_datas_tensor_type_as_summarize_writes_them(tmp_path):
    """Summarize's output goes through Ray Data's hash shuffle, which writes Ray's own tensor type
    (pyarrow's fixed_shape_tensor cannot pass it in Ray 2.60): read_summaries reads it with pyarrow."""
    from ray.data.extensions import ArrowTensorArray  # importing Ray Data starts no cluster

    from train.summaries import read_summaries

    summ = np.arange(3 * S, dtype=np.int32).reshape(3, S)  # (n, S)
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"example_id": ["a", "b", "c"], "summary_ids": ArrowTensorArray.from_numpy(summ)}),
                   tmp_path / "s" / "0.parquet")
    ids, got = read_summaries(tmp_path / "s")
    assert ids.to_pylist() == ["a", "b", "c"] and got.dtype == np.int32
    np.testing.assert_array_equal(got, summ)
