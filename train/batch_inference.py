"""Batch inference with Ray Data, shared by `embsum evaluate` and `embsum embed`.

One model actor (how an actor gets its predictor: the driver's download where this node has it,
else the registry), one set of actor-pool settings (``infer.*``: ``pool_options``), and how rows
are cut into actor calls (``rows_per_call``, ``in_calls``). Each job's own actors (evaluate's
impression scorer, embed's writer) build on ``ModelActor``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from embsum.config import InferConfig

# Ray Data queues this many calls per actor (its default of 4 could leave one actor with a queue
# of expensive calls while the other idles at the end).
CALLS_IN_FLIGHT = 2


def pool_options(infer: InferConfig) -> dict[str, Any]:
    """The ``map_batches`` arguments of a pool of model actors: its size, calls in flight and each
    actor's CPUs and GPUs (``infer.*``)."""
    import ray.data

    return {"compute": ray.data.ActorPoolStrategy(size=infer.actors, max_tasks_in_flight_per_actor=CALLS_IN_FLIGHT),
            "num_cpus": infer.cpus, "num_gpus": infer.gpus or None}


class ModelActor:
    """A Ray Data actor holding the predictor of one registered version. ``model_dir`` is where the
    driver downloaded it; an actor on a node without that folder (a multi-node cluster) downloads
    the version from the registry itself."""

    def __init__(self, cfg_dict: dict[str, Any], version: str, model_dir: str | None = None) -> None:
        from embsum.config import config_from_dict
        from embsum.predictor import Predictor
        from embsum.registry import Registry
        from embsum.runtime import setup_env

        setup_env()
        cfg = config_from_dict(cfg_dict)
        if model_dir is None or not Path(model_dir).exists():
            model_dir = str(Registry(cfg).download(version, tempfile.mkdtemp(prefix="embsum-model-")))
        self.predictor = Predictor.from_dir(model_dir, batch_size=cfg.infer.batch_size)


def encode_items(predictor: Any, token_ids: Any) -> dict[str, np.ndarray]:
    emb = predictor.encode_item_tokens([list(t) for t in token_ids])
    return {"cpe": emb.cpe, "cpe_key": emb.key}  # (I, N, D) x2


class ItemEncoder(ModelActor):
    """Ray Data batches of items.parquet rows -> their CPE (the evaluate job's item bank)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"item_id": batch["item_id"], "text": batch["text"], **encode_items(self.predictor, batch["token_ids"])}


def rows_per_call(n_rows: int, infer: InferConfig, cost: int = 1) -> int:
    """The rows of one actor call: large (per-call overhead is paid per call, not per row), but
    split so that every actor of the pool gets work; ``cost``: how many items one row costs (fewer
    rows per call for users); never below the model batch."""
    spread = -(-max(n_rows, 1) // max(infer.actors, 1))
    return max(infer.batch_size, min(infer.rows_per_call // max(cost, 1), spread))


def in_calls(ds: Any, n_rows: int, infer: InferConfig) -> tuple[Any, int]:
    """-> (``ds`` cut into blocks of one actor call each, that call size), for jobs that read with
    Ray Data (evaluate). Without it a single-file table (one parquet row group) is one block, and
    Ray Data hands a block to ONE actor, which batches it alone while the rest of the pool idles
    (measured: 2 actors ran at 1 actor's speed)."""
    rows = rows_per_call(n_rows, infer)
    return ds.repartition(target_num_rows_per_block=rows), rows


def parquet_rows(path: str | Path) -> int:
    """Row count from the parquet footers (no Ray Data execution); Ray Data's count where pyarrow
    cannot open the path itself."""
    import pyarrow.dataset as pads

    try:
        return int(pads.dataset(str(path), format="parquet").count_rows())
    except Exception:  # noqa: BLE001 - e.g. a filesystem only Ray's resolver knows
        import ray.data

        return int(ray.data.read_parquet(str(path)).count())
