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
