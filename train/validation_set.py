"""The in-loop validation set: the same examples at every checkpoint, read once per worker.

Each rank reads the first ``eval_batches x eval_batch_size x world`` rows of the validation
examples (in file order, straight from the parquet files, as the driver reads its probe rows)
and keeps every world-th of them: the ranks' parts are disjoint, of equal size (so ZeRO-3's
lockstep forwards match), and the same at every validation. Checkpoints are then ranked by their
AUC on one fixed set. Before, "valid" was a Ray Train dataset split between the workers: the rows
each rank validated on were whichever blocks the streaming split dealt it that time, different at
each checkpoint; every validation started a Ray Data execution; and the split held a coordinator
actor (a worker process, ~120 MB) for the whole fit. The rows are collated once and kept (a few MB
at the default sizes). The directory is the one the train data is read from, so it is on storage
every node reads already.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("session_ids", "candidate_ids", "labels")  # what the collate of a validation batch reads


def read_rows(valid_dir: Path, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` validation examples (fewer where fewer exist), in file order: session_ids
    (n, G, L), candidate_ids (n, C, Lc) and labels (n,) of per-example arrays."""
    import pyarrow.dataset as pads

    from embsum.arrow_tensors import table_tensor

    table = pads.dataset(str(valid_dir), format="parquet").head(n, columns=list(COLUMNS), use_threads=False)
    return {"session_ids": table_tensor(table, "session_ids"), "candidate_ids": table_tensor(table, "candidate_ids"),
            "labels": table.column("labels").to_numpy(zero_copy_only=False)}


def rank_rows(rows: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Rows ``rank, rank + world, ...`` of ``rows``, ``floor(n / world)`` of them: every rank keeps
    the same number, and together the ranks keep each of the first ``world x floor(n / world)``
    rows once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    n = len(next(iter(rows.values()))) if rows else 0
    return {k: v[rank::world][: n // world] for k, v in rows.items()}


def collated_batches(rows: dict[str, np.ndarray], batch_size: int,
                     collate: Callable[[dict[str, np.ndarray]], dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` in consecutive batches of ``batch_size`` (the last may be smaller), each collated."""
    n = len(next(iter(rows.values()))) if rows else 0
    return [collate({k: v[i:i + batch_size] for k, v in rows.items()}) for i in range(0, n, batch_size)]


def fixed_batches(valid_dir: Path, rank: int, world: int, eval_batches: int, batch_size: int,
                  collate: Callable[[dict[str, np.ndarray]], dict[str, Any]]) -> list[dict[str, Any]]:
    """This rank's validation batches: at most ``eval_batches`` of ``batch_size`` rows."""
    rows = read_rows(valid_dir, eval_batches * batch_size * world)
    return collated_batches(rank_rows(rows, rank, world), batch_size, collate)
