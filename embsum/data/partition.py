"""Grouping parsed records by user across blocks and nodes, and the one check that needs more
than a user: duplicate impression ids.

The plan stage needs all of a user's rows in one place (histories, the per-user negative sampler,
example ordinals, the per-user cap), and none of the rows whose impression id was used before.
Both are global facts. Both are settled by hash shuffles (Ray Data's ``repartition(keys=...)``),
so that every task sees its share of the rows and no task, and not the driver, sees them all:

1. duplicate impression ids (only when the data has impression ids): the good rows' small columns
   (``impression_keys``: source, line, user id, impression id) are hash-partitioned by impression
   id. A partition then holds every row of its impression ids, so ``duplicate_rows`` on it finds
   exactly the rows a whole-data check would. Each becomes a *marker* (``duplicate_markers``): a
   record-shaped row with the duplicate's source, line and user id and the reason
   ``DUPLICATE_IMPRESSION``, which the parsers never emit.
2. users: every parsed row and every marker is hash-partitioned by ``route`` (``with_route``): the
   user id for good rows and markers, so a marker lands with the row it marks; a file position
   for quarantined rows (they may have no user id, and must not all land in one partition). One
   task per partition then splits its block (``split_partition``) into the records to plan (good,
   unmarked), the quarantine rows (bad, or marked), and the counts for the report.

Which partition a user lands in changes no output: every plan row is a pure function of the
user's own rows (``examples.plan_user``), so the job writes the same rows on 1 worker or 40.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embsum.data.records import DUPLICATE_IMPRESSION, RECORD_SCHEMA

DUPLICATES_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("user_id", pa.string())])
IMPRESSION_KEYS = ["source", "line", "reason", "user_id", "impression_id"]
ROUTE = "route"  # the column the user shuffle partitions on
COUNTER_COLUMNS = ["n_candidates", "n_clicks", "n_missing_candidates", "n_history", "n_missing_history", "n_ignored"]


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dense integer codes of a string column (equal strings, equal codes)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def impression_keys(block: pa.Table) -> pa.Table:
    """The small columns of a parsed block's good rows that have an impression id."""
    keep = pc.and_(pc.equal(block.column("reason"), ""), pc.not_equal(block.column("impression_id"), ""))
    return block.filter(keep).select(IMPRESSION_KEYS)


def duplicate_rows(small: pa.Table, mind: bool) -> pa.Table:
    """(source, line, user id) of good rows whose impression id was already used: by an earlier row
    (MIND: one row per impression) or by another user (logs: many rows per impression). "Earlier"
    and "first" follow file order (source, line). ``small`` must hold every row of its impression
    ids (the whole data, or one partition of the impression shuffle)."""
    good = impression_keys(small)
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


def duplicate_markers(small: pa.Table, mind: bool) -> pa.Table:
    """``duplicate_rows`` as record-shaped marker rows (reason ``DUPLICATE_IMPRESSION``)."""
    dups = duplicate_rows(small, mind)
    n = dups.num_rows
    columns = {"source": dups.column("source"), "line": dups.column("line"), "user_id": dups.column("user_id"),
               "reason": pa.array([DUPLICATE_IMPRESSION] * n, pa.string())}
    return pa.table([columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in RECORD_SCHEMA],
                    schema=RECORD_SCHEMA)


def with_route(block: pa.Table) -> pa.Table:
    """The block with its ``route`` column: the user id for good rows and markers, else the row's
    line number (spreads quarantined rows over the partitions)."""
    reason = block.column("reason")
    by_user = pc.or_(pc.equal(reason, ""), pc.equal(reason, DUPLICATE_IMPRESSION))
    by_line = pc.binary_join_element_wise("\x00", pc.cast(block.column("line"), pa.string()), "")
    return block.append_column(ROUTE, pc.if_else(by_user, block.column("user_id"), by_line))


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
    reason, raw), counts over its parsed rows: 'input.rows', 'input.good', 'input.reason.<r>',
    'input.sum.<counter column>')."""
    reason = block.column("reason")
    is_marker = pc.equal(reason, DUPLICATE_IMPRESSION)
    markers = block.filter(is_marker)
    rows = block.filter(pc.invert(is_marker))
    good_mask = pc.equal(rows.column("reason"), "")
    bad = rows.filter(pc.invert(good_mask))
    good = rows.filter(good_mask)
    quarantine = [bad.select(["source", "line", "reason", "raw"])]
    if markers.num_rows:
        dup = is_duplicate(good, markers)
        marked = good.filter(dup)
        good = good.filter(pc.invert(dup))
        quarantine.append(marked.select(["source", "line", "raw"]).add_column(
            2, "reason", pa.array([DUPLICATE_IMPRESSION] * marked.num_rows, pa.string())))
    counts = {"input.rows": rows.num_rows, "input.good": good.num_rows}
    if bad.num_rows:
        vc = pc.value_counts(bad.column("reason"))
        for value, count in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            counts[f"input.reason.{value}"] = count
    if markers.num_rows:
        counts[f"input.reason.{DUPLICATE_IMPRESSION}"] = quarantine[-1].num_rows
    for c in COUNTER_COLUMNS:  # over every parsed row, quarantined ones included
        counts[f"input.sum.{c}"] = int(pc.sum(rows.column(c)).as_py() or 0)
    return good, pa.concat_tables(quarantine), counts


def partition_key(block: pa.Table) -> str:
    """A name for a partition's output files that is the same when the task is retried: a hash of
    its smallest route (routes never repeat across partitions)."""
    if block.num_rows == 0:
        return "empty"
    return hashlib.sha1(str(pc.min(block.column(ROUTE)).as_py()).encode()).hexdigest()[:16]
