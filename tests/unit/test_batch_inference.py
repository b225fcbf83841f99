"""Sizing of the batch-inference calls (evaluate, embed): pure functions, no cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embsum.config import config_from_dict
from train.embed import parquet_rows, rows_per_call


def _train(tmp_path: Path, **kw: object):
    return config_from_dict({"workdir": str(tmp_path), "train": kw}).train


def test_rows_per_call_feeds_every_actor_and_caps_the_call(tmp_path: Path) -> None:
    t = _train(tmp_path, infer_actors=2, infer_batch_size=64, infer_rows_per_call=2048)
    assert rows_per_call(600, t) == 300  # both actors get half
    assert rows_per_call(200_000, t) == 2048  # capped: bounded memory per call
    assert rows_per_call(10, t) == 64  # never below the model batch
    assert rows_per_call(0, t) == 64
    one = _train(tmp_path, infer_actors=1, infer_batch_size=64, infer_rows_per_call=2048)
    assert rows_per_call(600, one) == 600 and rows_per_call(5000, one) == 2048


def test_parquet_rows_reads_the_footers_of_a_folder_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"a": list(range(7))}), tmp_path / "d" / "part-0.parquet")
    pq.write_table(pa.table({"a": list(range(5))}), tmp_path / "d" / "part-1.parquet")
    assert parquet_rows(tmp_path / "d") == 12
    assert parquet_rows(tmp_path / "d" / "part-1.parquet") == 5
