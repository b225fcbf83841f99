"""Teacher summaries joined onto the training examples, file by file, as the trainer streams them.

Prepare writes every output partition by partition (users/, train/ ... ``part-<key>.parquet``: the
same users in files of the same name) and summarize writes the summaries of the examples in
``train/part-<key>.parquet`` under ``summaries/part=part-<key>/`` (embsum/data/layout.py). So the
examples of one train/ file need only that partition's summaries: the join is a map over the
training dataset (no shuffle, the examples keep their order), each Ray Data task loading one
partition's summaries (about its file's rows) when its block comes from a new file. Nothing holds
every example's summary: not the driver, not the train workers' loop config, not a Data worker.

Summaries are per training example (of the example's own history, train/summarize.py), joined on
``example_id``. Each example gets ``summary_ids`` (S,) int32, EOS-only when it has none (the
teacher failed, or no history item was in the catalog).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from embsum.arrow_tensors import table_tensor, tensor_array
from embsum.data import layout

_CACHE: dict[str, tuple[pa.Array, np.ndarray]] = {}  # per Data worker process: partition -> summaries
_CACHE_SIZE = 4


def partition_of(path: str | os.PathLike[str]) -> str:
    """A prepare output file -> its partition key (the file stem)."""
    return os.path.basename(str(path)).removesuffix(".parquet")


def _partition_summaries(summaries_dir: str, part: str, tokens: int) -> tuple[pa.Array, np.ndarray]:
    """(example ids, (n, S) summary ids) of one partition; none when it has no summaries folder."""
    key = f"{summaries_dir}/{part}"
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    folder = Path(summaries_dir) / f"{layout.PART_COLUMN}={part}"
    if folder.is_dir():
        found = read_summaries(folder)
    else:
        found = (pa.array([], pa.string()), np.zeros((0, tokens), np.int32))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = found
    return found


def read_summaries(path: str | Path) -> tuple[pa.Array, np.ndarray]:
    """(example ids, (n, S) int32 summary ids) of a summaries folder (or one partition of it).

    Summarize writes summary_ids through Ray Data's hash shuffle, which cannot carry pyarrow's
    fixed_shape_tensor in Ray 2.60 (its empty-partition table fails: pyarrow cannot build an empty
    array of that type), so the column holds Ray Data's tensor type: importing ray.data registers
    it, and ``table_tensor`` reads it with the type's own ``to_numpy_ndarray``."""
    import ray.data  # noqa: F401 - registers Ray Data's tensor types with pyarrow

    t = pads.dataset(str(path), format="parquet").to_table(columns=["example_id", "summary_ids"])
    return t.column("example_id").combine_chunks(), table_tensor(t, "summary_ids", np.int32)


def attach_summaries(batch: pa.Table, summaries_dir: str, empty: np.ndarray) -> pa.Table:
    """Ray Data ``map_batches`` body over ``read_parquet(train, include_paths=True)``: adds
    ``summary_ids`` (S,) per example (EOS-only without one); drops ``path``."""
    n, tokens = batch.num_rows, len(empty)
    summ = np.broadcast_to(empty, (n, tokens)).copy()  # (B, S)
    paths = batch.column("path")
    for path in pc.unique(paths).to_pylist():  # usually one: a block comes from one file
        rows = np.flatnonzero(np.asarray(pc.equal(paths, path).to_numpy(zero_copy_only=False)))
        examples, ids = _partition_summaries(summaries_dir, partition_of(path), tokens)
        idx = pc.fill_null(pc.index_in(batch.column("example_id").take(pa.array(rows)), value_set=examples), -1)
        idx = np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)  # -1: no summary
        found = idx >= 0
        summ[rows[found]] = ids[idx[found]]
    out = batch.drop_columns(["path"])
    return out.append_column("summary_ids", tensor_array(summ))


def check_partitions(data_dir: Path) -> None:
    """Fail closed when summaries/ was not written for these prepare outputs (an older summarize, or
    a prepare rerun since): the join would silently find no summary for anyone."""
    summaries = data_dir / layout.SUMMARIES
    parts = {p.name.removeprefix(f"{layout.PART_COLUMN}=") for p in summaries.glob(f"{layout.PART_COLUMN}=*")}
    if not parts:
        raise ValueError(f"{summaries} is not partitioned like the prepared data (written by an older "
                         f"`embsum summarize`): run `embsum summarize` again")
    train = {partition_of(p) for p in (data_dir / layout.TRAIN).glob("*.parquet")}
    stale = sorted(parts - train)
    if stale:
        raise ValueError(f"{summaries} holds partitions that {data_dir / layout.TRAIN} does not ({stale[:3]} ...): "
                         f"prepare ran again after summarize; run `embsum summarize` again")


def has_summaries(data_dir: Path) -> bool:
    return any((data_dir / layout.SUMMARIES).rglob("*.parquet"))


def with_summaries(ds: Any, data_dir: Path, empty: np.ndarray) -> Any:
    """The training dataset (``read_parquet(..., include_paths=True)``) with the summaries joined."""
    return ds.map_batches(attach_summaries, fn_kwargs=dict(summaries_dir=str(data_dir / layout.SUMMARIES),
                                                           empty=empty), batch_format="pyarrow", batch_size=None)
