"""Teacher summaries joined onto the training examples, file by file, as the trainer streams them.

Prepare writes every output partition by partition (users/, train/ ... ``part-<key>.parquet``: the
same users in files of the same name) and summarize writes each partition's summaries under
``summaries/part=<key>/`` (embsum/data/layout.py). So the examples of ``train/part-<key>.parquet``
need only that partition's summaries: the join is a map over the training dataset (no shuffle, the
examples keep their order), each Ray Data task loading one partition's summaries (users/P rows)
when its block comes from a new file. Nothing holds every user's summary: not the driver, not the
train workers' loop config, not a Data worker.

Each example gets ``summary_ids`` (S,) int32, EOS-only for a user without a summary (not a
training user's, or the teacher failed), and ``has_summary``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from embsum.arrow_tensors import table_tensor
from embsum.data import layout

_CACHE: dict[str, tuple[pa.Array, np.ndarray]] = {}  # per Data worker process: partition -> summaries
_CACHE_SIZE = 4


def partition_of(path: str) -> str:
    """A prepare output file -> its partition key (the file stem)."""
    return os.path.basename(str(path)).removesuffix(".parquet")


def _partition_summaries(summaries_dir: str, part: str, tokens: int) -> tuple[pa.Array, np.ndarray]:
    """(user ids, (n, S) summary ids) of one partition; none when it has no summaries folder."""
    hit = _CACHE.get(part)
    if hit is not None:
        return hit
    folder = Path(summaries_dir) / f"{layout.PART_COLUMN}={part}"
    if folder.is_dir():
        t = pads.dataset(str(folder), format="parquet").to_table(columns=["user_id", "summary_ids"])
        found = (t.column("user_id").combine_chunks(), table_tensor(t, "summary_ids", np.int32))
    else:
        found = (pa.array([], pa.string()), np.zeros((0, tokens), np.int32))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[part] = found
    return found


def attach_summaries(batch: pa.Table, summaries_dir: str, empty: np.ndarray) -> pa.Table:
    """Ray Data ``map_batches`` body over ``read_parquet(train, include_paths=True)``: adds
    ``summary_ids`` (S,) and ``has_summary`` per example; drops ``path``."""
    n, tokens = batch.num_rows, len(empty)
    summ = np.broadcast_to(empty, (n, tokens)).copy()  # (B, S)
    has = np.zeros(n, dtype=bool)
    paths = batch.column("path")
    for path in pc.unique(paths).to_pylist():  # usually one: a block comes from one file
        rows = np.flatnonzero(np.asarray(pc.equal(paths, path).to_numpy(zero_copy_only=False)))
        users, ids = _partition_summaries(summaries_dir, partition_of(path), tokens)
        idx = pc.fill_null(pc.index_in(batch.column("user_id").take(pa.array(rows)), value_set=users), -1)
        idx = np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)  # -1: no summary
        found = idx >= 0
        summ[rows[found]] = ids[idx[found]]
        has[rows[found]] = True
    out = batch.drop_columns(["path"])
    out = out.append_column("summary_ids", pa.FixedShapeTensorArray.from_numpy_ndarray(summ))
    return out.append_column("has_summary", pa.array(has))


def check_partitions(data_dir: Path) -> None:
    """Fail closed when summaries/ was not written for these prepare outputs (an older summarize, or
    a prepare rerun since): the join would silently find no summary for anyone."""
    summaries = data_dir / layout.SUMMARIES
    parts = {p.name.removeprefix(f"{layout.PART_COLUMN}=") for p in summaries.glob(f"{layout.PART_COLUMN}=*")}
    if not parts:
        raise ValueError(f"{summaries} is not partitioned like the prepared data (written by an older "
                         f"`embsum summarize`): run `embsum summarize` again")
    users = {partition_of(p) for p in (data_dir / layout.USERS).glob("*.parquet")}
    stale = sorted(parts - users)
    if stale:
        raise ValueError(f"{summaries} holds partitions that {data_dir / layout.USERS} does not ({stale[:3]} ...): "
                         f"prepare ran again after summarize; run `embsum summarize` again")


def has_summaries(data_dir: Path) -> bool:
    return any((data_dir / layout.SUMMARIES).rglob("*.parquet"))


def with_summaries(ds: Any, data_dir: Path, empty: np.ndarray) -> Any:
    """The training dataset (``read_parquet(..., include_paths=True)``) with the summaries joined."""
    return ds.map_batches(attach_summaries, fn_kwargs=dict(summaries_dir=str(data_dir / layout.SUMMARIES),
                                                           empty=empty), batch_format="pyarrow", batch_size=None)


def summaries_of(data_dir: Path, user_ids: list[str], empty: np.ndarray) -> np.ndarray:
    """(len(user_ids), S) summary ids of a few users (EOS-only when missing), by a filtered scan."""
    out = np.broadcast_to(empty, (len(user_ids), len(empty))).copy()
    if not has_summaries(data_dir):
        return out
    t = pads.dataset(str(data_dir / layout.SUMMARIES), format="parquet").to_table(
        columns=["user_id", "summary_ids"], filter=pc.field("user_id").isin(user_ids))
    ids = table_tensor(t, "summary_ids", np.int32)
    at = {u: k for k, u in enumerate(t.column("user_id").to_pylist())}
    for k, u in enumerate(user_ids):
        if u in at:
            out[k] = ids[at[u]]
    return out
