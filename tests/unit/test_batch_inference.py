"""Batch-inference calls (evaluate, embed): their sizing, the embed job's plan over parquet row groups, its
reader and its report. Pure functions and pyarrow files, no cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embsum.config import config_from_dict
from train.batch_inference import parquet_rows, rows_per_call
from train.embed import RowGroupReader, embed_report, kind_stats, plan_calls


def _infer(tmp_path: Path, **kw: object):
    return config_from_dict({"workdir": str(tmp_path), "infer": kw}).infer


def test_rows_per_call_feeds_every_actor_and_caps_the_call(tmp_path: Path) -> None:
    t = _infer(tmp_path, actors=2, batch_size=64, rows_per_call=2048)
    assert rows_per_call(600, t) == 300  # both actors get half
    assert rows_per_call(200_000, t) == 2048  # capped: bounded memory per call
    assert rows_per_call(10, t) == 64  # never below the model batch
    assert rows_per_call(0, t) == 64
    one = _infer(tmp_path, actors=1, batch_size=64, rows_per_call=2048)
    assert rows_per_call(600, one) == 600 and rows_per_call(5000, one) == 2048


def test_parquet_rows_reads_the_footers_of_a_folder_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"a": list(range(7))}), tmp_path / "d" / "part-0.parquet")
    pq.write_table(pa.table({"a": list(range(5))}), tmp_path / "d" / "part-1.parquet")
    assert parquet_rows(tmp_path / "d") == 12
    assert parquet_rows(tmp_path / "d" / "part-1.parquet") == 5


def test_user_calls_carry_fewer_rows_than_item_calls(tmp_path: Path) -> None:
    t = _infer(tmp_path, actors=2, batch_size=64, rows_per_call=2048)
    assert rows_per_call(20_000, t, cost=8) == 256  # a user costs about 8 items' worth per row
    assert rows_per_call(300, t, cost=8) == 150 and rows_per_call(20, t, cost=8) == 64


def _parquet(path: Path, n: int, row_group: int) -> None:
    ids = [f"i{k}" for k in range(n)]
    pq.write_table(pa.table({"item_id": ids, "text": [f"text {k}" for k in range(n)],
                             "token_ids": [[k, k + 1] for k in range(n)]}), path, row_group_size=row_group)


def test_plan_covers_every_row_once_within_row_groups(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    _parquet(tmp_path / "d" / "part-0.parquet", 10, row_group=4)  # row groups 4, 4, 2
    _parquet(tmp_path / "d" / "part-1.parquet", 3, row_group=100)
    calls = plan_calls("items", tmp_path / "d", rows=3)
    assert [(Path(c.path).name, c.row_group, c.offset, c.rows) for c in calls] == [
        ("part-0.parquet", 0, 0, 3), ("part-0.parquet", 0, 3, 1), ("part-0.parquet", 1, 0, 3),
        ("part-0.parquet", 1, 3, 1), ("part-0.parquet", 2, 0, 2), ("part-1.parquet", 0, 0, 3)]
    assert [c.index for c in calls] == list(range(6)) and {c.kind for c in calls} == {"items"}
    assert sum(c.rows for c in calls) == parquet_rows(tmp_path / "d") == 13


def test_row_group_reader_streams_forward_and_rewinds(tmp_path: Path) -> None:
    _parquet(tmp_path / "items.parquet", 50, row_group=50)  # one row group, as prepare writes items
    reader = RowGroupReader(("item_id", "token_ids"), io_rows=7)  # reads of 7 rows: slices cross them
    path = str(tmp_path / "items.parquet")

    def ids(offset: int, rows: int) -> list[str]:
        got = reader.read(path, 0, offset, rows)
        assert got.column_names == ["item_id", "token_ids"]
        return got.column("item_id").to_pylist()

    assert ids(0, 10) == [f"i{k}" for k in range(10)]
    assert ids(20, 10) == [f"i{k}" for k in range(20, 30)]  # the other actor took 10-19: skipped
    assert ids(45, 5) == [f"i{k}" for k in range(45, 50)]
    assert ids(5, 3) == ["i5", "i6", "i7"]  # behind the stream: it starts the row group again
    with pytest.raises(ValueError, match="fewer than 60 rows"):
        reader.read(path, 0, 55, 5)


def test_report_charges_the_one_start_up_to_items_and_spans_to_users() -> None:
    calls = [{"kind": "items", "rows": 100, "start": 110.0, "end": 112.0},
             {"kind": "items", "rows": 100, "start": 110.5, "end": 113.0},
             {"kind": "users", "rows": 10, "start": 112.0, "end": 117.0},
             {"kind": "users", "rows": 10, "start": 113.0, "end": 118.0}]
    items, users = kind_stats(calls, "items"), kind_stats(calls, "users")
    rep = embed_report(100.0, 19.0, items, users, actors=2, processes=2)
    assert rep["startup_s"] == 10.0 and rep["items"] == 200 and rep["users"] == 20
    assert rep["items_seconds"] == 13.0 and rep["items_per_s"] == pytest.approx(200 / 13)  # start-up included
    assert rep["items_steady_per_s"] == pytest.approx(200 / 3)  # 110 -> 113
    assert rep["users_seconds"] == 6.0 and rep["users_per_s"] == pytest.approx(20 / 6)  # 112 -> 118
    assert rep["users_busy_s"] == 10.0 and rep["items_calls"] == 2 and rep["actor_processes"] == 2
    empty = embed_report(100.0, 1.0, kind_stats([], "items"), kind_stats([], "users"), actors=2)
    assert empty["items"] == 0 and empty["users_per_s"] == 0.0 and empty["startup_s"] == 1.0
