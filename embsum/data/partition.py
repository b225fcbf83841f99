"""Grouping parsed records by user across blocks and nodes, and the one check that needs more
than a user: duplicate impression ids.

The plan stage needs all of a user's rows in one place (histories, the per-user negative sampler,
example ordinals, the per-user cap), and none of the rows whose impression id was used before.
Both are global facts. Both are settled by hash shuffles (Ray Data's ``repartition(keys=...)``),
chained, so that every task sees its share of the rows and no task, and not the driver, sees them
all; each shuffle partitions on a ``route`` column:

1. duplicate impression ids (only when the data has impression ids): ``impression_route`` is the
   impression id of a good row (a file position for the others, which spreads them). A partition
   then holds every row of its impression ids, so ``mark_duplicates`` on it finds exactly the rows
   a whole-data check would, and marks them quarantined (reason ``DUPLICATE_IMPRESSION``).
2. users: ``user_route`` is the user id of a good row (a file position for quarantined rows: they
   may have no user id, and must not all land in one partition). One task per partition then
   splits its block (``split_partition``) into the records to plan (whole users), the quarantine
   rows, and the counts for the report.

Chained shuffles stream: a block leaves the object store once the next stage has taken it, so a
node holds about its share of the parsed rows at a time, not the parsed input plus copies.

Which partition a user lands in changes no output: every plan row is a pure function of the
user's own rows (``examples.plan_user``), so the job writes the same rows on 1 worker or 40.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embsum.data.records import DUPLICATE_IMPRESSION

DUPLICATES_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64())])
ROUTE = "route"  # the column each shuffle partitions on
COUNTER_COLUMNS = ["n_candidates", "n_clicks", "n_missing_candidates", "n_history", "n_missing_history", "n_ignored"]


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dense integer codes of a string column (equal strings, equal codes)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def duplicate_rows(small: pa.Table, mind: bool) -> pa.Table:
    """(source, line) of good rows whose impression id was already used: by an earlier row
    (MIND: one row per impression) or by another user (logs: many rows per impression). "Earlier"
    and "first" follow file order (source, line). ``small`` must hold every row of its impression
    ids (the whole data, or one partition of the impression shuffle)."""
    keep = pc.and_(pc.equal(small.column("reason"), ""), pc.not_equal(small.column("impression_id"), ""))
    good = small.filter(keep).select(["source", "line", "user_id", "impression_id"])
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


def _route(block: pa.Table, key: str, by_key: pa.Array) -> pa.Table:
    """The block with its ``route``: ``key``'s value where ``by_key``, else NUL + the line number."""
    by_line = pc.binary_join_element_wise("\x00", pc.cast(block.column("line"), pa.string()), "")
    route = pc.if_else(by_key, block.column(key), by_line)
    if ROUTE in block.column_names:
        return block.set_column(block.schema.get_field_index(ROUTE), ROUTE, route)
    return block.append_column(ROUTE, route)


def impression_route(block: pa.Table) -> pa.Table:
    """Route good rows with an impression id by that id (the duplicate check's shuffle)."""
    good = pc.and_(pc.equal(block.column("reason"), ""), pc.not_equal(block.column("impression_id"), ""))
    return _route(block, "impression_id", good)


def user_route(block: pa.Table) -> pa.Table:
    """Route good rows by user id (the plan's shuffle), quarantined ones by line."""
    return _route(block, "user_id", pc.equal(block.column("reason"), ""))


def mark_duplicates(block: pa.Table, mind: bool) -> pa.Table:
    """One partition of the impression shuffle with its duplicate rows' reason set."""
    dups = duplicate_rows(block, mind)
    if dups.num_rows == 0:
        return block
    reason = pc.if_else(is_duplicate(block, dups), DUPLICATE_IMPRESSION, block.column("reason"))
    return block.set_column(block.schema.get_field_index("reason"), "reason", reason)


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


def split_partition(block: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """One partition of the user shuffle -> (records to plan, quarantine rows (source, line,
    reason, raw), counts over its rows: 'input.rows', 'input.good', 'input.bytes' (as parsed),
    'input.reason.<r>', 'input.sum.<counter column>')."""
    good_mask = pc.equal(block.column("reason"), "")
    bad = block.filter(pc.invert(good_mask))
    good = block.filter(good_mask)
    counts = {"input.rows": block.num_rows, "input.good": good.num_rows,
              "input.bytes": block.nbytes - block.column(ROUTE).nbytes}
    if bad.num_rows:
        vc = pc.value_counts(bad.column("reason"))
        for value, count in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            counts[f"input.reason.{value}"] = count
    for c in COUNTER_COLUMNS:  # over every parsed row, quarantined ones included
        counts[f"input.sum.{c}"] = int(pc.sum(block.column(c)).as_py() or 0)
    return good, bad.select(["source", "line", "reason", "raw"]), counts


def partition_key(block: pa.Table) -> str:
    """A name for a partition's output files that is the same when the task is retried: a hash of
    its smallest route (routes never repeat across partitions)."""
    if block.num_rows == 0:
        return "empty"
    return hashlib.sha1(str(pc.min(block.column(ROUTE)).as_py()).encode()).hexdigest()[:16]
