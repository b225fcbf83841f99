"""Decisions that need every row, made once from a few small columns, then applied per block.

The plan stage needs all of a user's rows in one place (histories, the per-user negative sampler,
example ordinals, the per-user cap), and no row whose impression id was used before. Both are
global facts. They are computed here from the small columns the driver collects anyway (source,
line, reason, user id, impression id), with pyarrow/numpy kernels rather than Python loops, and
the result is small: the (source, line) of duplicate rows and, per user partition, its user ids.

Each plan task then reads the parsed blocks and keeps the rows of its own users (``select_rows``),
instead of a hash shuffle moving every row through per-partition aggregators. Why: on a small
machine Ray Data's ``repartition(keys=...)`` cost about 12 CPU-seconds for a no-op on 200k rows
(an aggregator actor per partition, each a fresh worker process, and a copy of every row through
it), more than a third of all the work of the single-process transforms. On one node the blocks
are read zero-copy from shared memory; on N nodes each node fetches the parsed rows once.

Which partition a user lands in does not change any output: every plan row is a pure function
of the user's own rows (``examples.plan_user``).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DUPLICATES_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64())])


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dense integer codes of a string column (equal strings, equal codes)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def duplicate_rows(small: pa.Table, mind: bool) -> pa.Table:
    """(source, line) of good rows whose impression id was already used: by an earlier row (MIND:
    one row per impression) or by another user (logs: many rows per impression). "Earlier" and
    "first" follow file order (source, line)."""
    good = small.filter(pc.and_(pc.equal(small.column("reason"), ""), pc.not_equal(small.column("impression_id"), "")))
    if good.num_rows == 0:
        return DUPLICATES_SCHEMA.empty_table()
    good = good.sort_by([("source", "ascending"), ("line", "ascending")])
    imp = _codes(good.column("impression_id"))
    codes, first_at = np.unique(imp, return_index=True)  # first_at: each id's first row
    first = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    first[codes] = first_at
    first_row = first[imp]
    if mind:
        dup = first_row != np.arange(len(imp))
    else:
        users = _codes(good.column("user_id"))
        dup = users != users[first_row]
    return good.filter(pa.array(dup)).select(DUPLICATES_SCHEMA.names).cast(DUPLICATES_SCHEMA)


def user_partition(user_id: str, parts: int) -> int:
    """Stable (crc32, the same in every process) partition of a user id."""
    return zlib.crc32(user_id.encode("utf-8")) % parts


def partition_users(users: pa.Array | pa.ChunkedArray, parts: int) -> list[pa.Array]:
    """Distinct user ids -> ``parts`` arrays of user ids, by ``user_partition``."""
    distinct = pc.unique(users)
    ids = distinct.to_pylist()
    part = np.fromiter((user_partition(u, parts) for u in ids), dtype=np.int64, count=len(ids))
    return [distinct.filter(pa.array(part == p)) for p in range(parts)]


def select_rows(block: pa.Table, users: pa.Array | None, duplicates: pa.Table) -> pa.Table:
    """A parsed block's good rows that are not duplicates and, unless ``users`` is None, belong
    to one of ``users``."""
    keep = pc.equal(block.column("reason"), "")
    if users is not None:
        keep = pc.and_(keep, pc.is_in(block.column("user_id"), value_set=users))
    if duplicates.num_rows:
        keep = pc.and_(keep, pc.invert(is_duplicate(block, duplicates)))
    return block.filter(keep)


def is_duplicate(block: pa.Table, duplicates: pa.Table) -> pa.Array:
    """Boolean mask of the block's rows listed in ``duplicates`` (source, line)."""
    maybe = pc.is_in(block.column("line"), value_set=duplicates.column("line").combine_chunks())
    mask = np.asarray(maybe.to_numpy(zero_copy_only=False), dtype=bool)
    if mask.any():  # rare: check the few candidates exactly, by (source, line)
        wanted = set(zip(duplicates.column("source").to_pylist(), duplicates.column("line").to_pylist(), strict=True))
        idx = np.flatnonzero(mask)
        cand = block.take(pa.array(idx))
        pairs = zip(cand.column("source").to_pylist(), cand.column("line").to_pylist(), strict=True)
        mask[idx] = [p in wanted for p in pairs]
    return pa.array(mask)
