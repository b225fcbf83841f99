"""The in-loop validation set: the same examples at every checkpoint, read once per worker.

Each rank reads the first ``eval_batches x eval_batch_size x world`` rows of the validation
examples (in file order, straight from the parquet files, as the driver reads its probe rows)
and keeps every world-th of them: the ranks' parts are disjoint, of equal size (so ZeRO-3's
lockstep forwards match), and the same at every validation. Checkpoints are then ranked by their
AUC on one fixed set. Before, "valid" was a Ray Train dataset split between the workers: the rows
each rank validated on were whichever blocks the streaming split dealt it that time, different at
each checkpoint; every validation started a Ray Data execution; and the split held a coordinator
actor (a worker process, ~120 MB) for the whole fit.

Memory: a rank keeps its own rows only, as the files' int32 token ids (``eval_batches x
eval_batch_size`` examples; a few MB at the default sizes), read a record batch at a time, and
collates them batch by batch at each validation. The directory is the one the train data is read
from, so it is on storage every node reads already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("session_ids", "candidate_ids", "labels")  # what the collate of a validation batch reads
READ_ROWS = 1024  # rows per record batch read


def read_batches(valid_dir: Path, batch_rows: int = READ_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The validation examples in file order, as numpy column batches: session_ids (b, G, L),
    candidate_ids (b, C, Lc) int32 and labels (b,) of per-example arrays."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from embsum.arrow_tensors import table_tensor

    scanner = pads.dataset(str(valid_dir), format="parquet").scanner(columns=list(COLUMNS), batch_size=batch_rows,
                                                                     use_threads=False)  # one thread: file order
    for rb in scanner.to_batches():
        if rb.num_rows:
            table = pa.Table.from_batches([rb])
            yield {"session_ids": table_tensor(table, "session_ids"),  # (b, G, L)
                   "candidate_ids": table_tensor(table, "candidate_ids"),  # (b, C, Lc)
                   "labels": table.column("labels").to_numpy(zero_copy_only=False)}  # (b,) of (C,)


def rank_rows(batches: Iterable[dict[str, np.ndarray]], rank: int, world: int, limit: int) -> dict[str, np.ndarray]:
    """Of the first ``limit`` rows of ``batches`` (numpy column batches, in order), rows ``rank,
    rank + world, ...``, ``floor(n / world)`` of them (n: the rows read, at most ``limit``): every
    rank keeps the same number, and together the ranks keep each of the first ``world x floor(n /
    world)`` rows once. Holds this rank's rows only; reads no further than it needs."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    mine: list[dict[str, np.ndarray]] = []
    seen = 0  # rows read so far: the global index of the next batch's first row
    for batch in batches:
        size = min(len(next(iter(batch.values()))), limit - seen)
        first = (rank - seen) % world  # this rank's first row in the batch
        mine.append({k: v[first:size:world] for k, v in batch.items()})
        seen += size
        if seen >= limit:
            break
    if not mine:
        return {}
    return {k: np.concatenate([m[k] for m in mine])[: seen // world] for k in mine[0]}  # (per, ...) each


def collated(rows: dict[str, np.ndarray], batch_size: int,
             collate: Callable[[dict[str, np.ndarray]], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``rows`` in consecutive batches of ``batch_size`` (the last may be smaller), each collated."""
    n = len(next(iter(rows.values()))) if rows else 0
    for i in range(0, n, batch_size):
        yield collate({k: v[i:i + batch_size] for k, v in rows.items()})


def fixed_rows(valid_dir: Path, rank: int, world: int, eval_batches: int, batch_size: int) -> dict[str, np.ndarray]:
    """This rank's validation rows: at most ``eval_batches x batch_size`` examples."""
    return rank_rows(read_batches(valid_dir), rank, world, eval_batches * batch_size * world)
