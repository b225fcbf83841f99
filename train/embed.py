"""`embsum embed`: precompute CPE for the whole catalog and UPE (+ generated summary) for every user
with a Ray Data actor pool, for one registered model version. Serving then scores known users and
items with no T5 call at all (DESIGN.md 2, the offline/online split).

Writes EMBEDDINGS_ROOT/v<VERSION>/{items,users}/ + manifest.json (see embsum/embeddings.py): into a
temporary sibling folder first, renamed into place at the end, so a reader never sees half a set.
Reports items/s and users/s end to end and once the actor pool runs (and the pool's start-up:
worker processes, torch/transformers imports, model load), printed and logged as ``embed_*``
metrics on the version's MLflow run.

Per-session encoder states (so that a user could be refreshed by encoding only a new session) are
not stored: the session encoder is about 15% of a user's encoding time (256 users, d_model 64:
0.41 s encoding the sessions, 1.74 s generating the summary, 0.51 s for the teacher-forced pass and
item states), and the summary has to be regenerated over all sessions on any change anyway, while
the states would take G x L x D floats per user (98 KB at G=4, L=96, D=64; 50x the UPE itself).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embsum import events
from embsum.config import Config
from embsum.data import layout
from embsum.embeddings import ITEMS, USERS, Manifest, version_dir, write_manifest
from embsum.runtime import init_ray


class _ModelActor:
    """Downloads the version from the registry once per actor (works on any node of a cluster)."""

    def __init__(self, cfg_dict: dict[str, Any], version: str, model_dir: str | None = None) -> None:
        from embsum.config import config_from_dict
        from embsum.predictor import Predictor
        from embsum.registry import Registry
        from embsum.runtime import setup_env

        setup_env()
        cfg = config_from_dict(cfg_dict)
        if model_dir is None or not Path(model_dir).exists():
            model_dir = str(Registry(cfg).download(version, tempfile.mkdtemp(prefix="embsum-model-")))
        self.predictor = Predictor.from_dir(model_dir, batch_size=cfg.train.infer_batch_size)


class ItemEncoder(_ModelActor):
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        emb = self.predictor.encode_item_tokens([list(t) for t in batch["token_ids"]])
        return {"item_id": batch["item_id"], "text": batch["text"], "cpe": emb.cpe, "cpe_key": emb.key}


class UserEncoder(_ModelActor):
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        emb = self.predictor.encode_users(np.asarray(batch["session_ids"]))
        return {"user_id": batch["user_id"], "history": batch["history"], "upe": emb.upe,
                "summary": np.asarray(emb.summaries, dtype=object)}


class _WritesItsOutput:
    """Mixin for an encoder actor: writes each encoded batch as one parquet file under ``out_dir``
    from the actor itself and returns only its row count and when the call ran, so the embeddings
    (2 x N x D floats per item, 0.4 GB per 200k items at d_model 64) never travel through the
    object store to separate write tasks. Files are named by a uuid: a restarted actor's retry
    never collides with a file."""

    def __init__(self, out_dir: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.out_dir = out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import uuid

        import pyarrow.fs as pafs

        from embsum.embeddings import embedding_table, write_shard

        start = time.time()
        table = embedding_table(super().__call__(batch))
        fs, root = pafs.FileSystem.from_uri(self.out_dir) if "://" in self.out_dir else (None, self.out_dir)
        write_shard(table, f"{root.rstrip('/')}/part-{uuid.uuid4().hex}.parquet", filesystem=fs)
        return {"rows": np.asarray([table.num_rows]), "start": np.asarray([start]), "end": np.asarray([time.time()])}


class ItemWriter(_WritesItsOutput, ItemEncoder):
    pass


class UserWriter(_WritesItsOutput, UserEncoder):
    pass


def parquet_rows(path: str | Path) -> int:
    """Row count from the parquet footers (no Ray Data execution); Ray Data's count where pyarrow
    cannot open the path itself."""
    import pyarrow.dataset as pads

    try:
        return int(pads.dataset(str(path), format="parquet").count_rows())
    except Exception:  # noqa: BLE001 - e.g. a filesystem only Ray's resolver knows
        import ray.data

        return int(ray.data.read_parquet(str(path)).count())


def in_calls(ds: Any, n_rows: int, t: Any) -> tuple[Any, int]:
    """-> (``ds`` cut into blocks of one actor call each, that call size). Without it a single-file
    table (one parquet row group) is one block, and Ray Data hands a block to ONE actor, which
    batches it alone while the rest of the pool idles (measured: 2 actors ran at 1 actor's speed)."""
    rows = rows_per_call(n_rows, t)
    return ds.repartition(target_num_rows_per_block=rows), rows


def rows_per_call(n_rows: int, t: Any) -> int:
    """The Ray Data batch: large (per-call overhead is paid per batch, not per row), but split so that
    every actor of the pool gets work; never below the model batch."""
    spread = -(-max(n_rows, 1) // max(t.infer_actors, 1))
    return max(t.infer_batch_size, min(t.infer_rows_per_call, spread))


def resolve_version(cfg: Config, version: str | None) -> tuple[Any, str]:
    """-> (registry, version number) for an explicit version, serve.model_version, or the alias."""
    from embsum.registry import Registry

    registry = Registry(cfg)
    ref = version or cfg.serve.model_version or cfg.mlflow.alias
    return registry, registry.version(ref).version


@dataclass(frozen=True)
class PhaseStats:
    """One encode phase (items or users). Call times are the actors' clocks, the phase start the
    driver's: on a multi-node cluster they agree to NTP's precision."""

    rows: int
    seconds: float  # wall time: read -> encode -> write, actor start-up included
    startup_s: float  # phase start -> the first actor call (worker start, imports, model load)
    steady_per_s: float  # rows / (first call start -> last call end): the pool once it runs

    @property
    def per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def run_phase(ds: Any, writer: type, n_rows: int, out_dir: Path, pool: dict[str, Any],
              model_kw: dict[str, Any], t: Any, what: str = "rows") -> PhaseStats:
    """Encode ``ds`` with an actor pool of ``writer``s that write their parquet parts to ``out_dir``."""
    t0 = time.time()
    ds, rows = in_calls(ds, n_rows, t)
    out_dir.mkdir()
    events.progress(f"encoding {what}", 0, n_rows, what)
    calls, done = [], 0
    for c in ds.map_batches(writer, batch_size=rows, **pool,
                            fn_constructor_kwargs={"out_dir": str(out_dir), **model_kw}).iter_rows():
        calls.append(c)  # one row per actor call, as each finishes
        done += int(c["rows"])
        events.progress(f"encoding {what}", done, n_rows, what)
    seconds = time.time() - t0
    if not calls:
        return PhaseStats(rows=0, seconds=seconds, startup_s=seconds, steady_per_s=0.0)
    n = sum(int(c["rows"]) for c in calls)
    first, last = min(float(c["start"]) for c in calls), max(float(c["end"]) for c in calls)
    return PhaseStats(rows=n, seconds=seconds, startup_s=max(0.0, first - t0), steady_per_s=n / max(last - first, 1e-9))


def run_embed(cfg: Config, version: str | None = None) -> dict[str, Any]:
    import ray.data

    t0 = time.perf_counter()
    data_dir = cfg.data_dir
    for need in (layout.ITEMS, layout.USERS):
        if not (data_dir / need).exists():
            raise ValueError(f"{data_dir / need} not found: run `embsum prepare` first")
    registry, version = resolve_version(cfg, version)
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = True
    local_model = registry.download(version, cfg.workdir_path / "models" / f"v{version}")
    meta = json.loads((local_model / "embsum.json").read_text())
    t = cfg.train
    model_kw = {"cfg_dict": cfg.to_dict(), "version": version, "model_dir": str(local_model)}
    pool = dict(compute=ray.data.ActorPoolStrategy(size=t.infer_actors),
                num_cpus=t.infer_cpus, num_gpus=t.infer_gpus or None, batch_format="numpy")

    out = version_dir(cfg.embeddings_dir, version)
    tmp = out.parent / f".tmp-{out.name}-{int(time.time())}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        items = ray.data.read_parquet(str(data_dir / layout.ITEMS)).select_columns(["item_id", "text", "token_ids"])
        st_items = run_phase(items, ItemWriter, parquet_rows(data_dir / layout.ITEMS), tmp / ITEMS, pool, model_kw, t,
                             "items")
        users = ray.data.read_parquet(str(data_dir / layout.USERS)).select_columns(
            ["user_id", "history", "session_ids"])
        st_users = run_phase(users, UserWriter, parquet_rows(data_dir / layout.USERS), tmp / USERS, pool, model_kw, t,
                             "users")
        manifest = Manifest(
            model_name=registry.name, model_version=str(version),
            model_fingerprint=str(meta.get("metadata", {}).get("model_fingerprint", "")),
            items=st_items.rows, users=st_users.rows, dtype="float32", user_codes=int(meta["embsum"]["user_codes"]),
            content_codes=int(meta["embsum"]["content_codes"]), d_model=int(meta["t5"]["d_model"]),
            seconds=time.perf_counter() - t0)
        write_manifest(tmp, manifest)  # last: a folder with a manifest is complete
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report: dict[str, Any] = {"version": version, "path": str(out), "seconds": time.perf_counter() - t0}
    for kind, st in ((ITEMS, st_items), (USERS, st_users)):
        report.update({kind: st.rows, f"{kind}_per_s": st.per_s, f"{kind}_steady_per_s": st.steady_per_s,
                       f"{kind}_startup_s": st.startup_s, f"{kind}_seconds": st.seconds})
    print(f"[embed] v{version}: {st_items.rows} items ({st_items.per_s:.1f}/s; {st_items.steady_per_s:.1f}/s once "
          f"the pool ran, start-up {st_items.startup_s:.1f}s), {st_users.rows} users ({st_users.per_s:.1f}/s; "
          f"{st_users.steady_per_s:.1f}/s once running, start-up {st_users.startup_s:.1f}s) -> {out}", flush=True)
    from embsum.console import shown_path

    events.summary(f"v{version}: {st_items.rows:,} items ({st_items.per_s:.1f}/s), {st_users.rows:,} users "
                   f"({st_users.per_s:.1f}/s) -> {shown_path(out)}")
    _log_to_registry(registry, version, report)
    return report


def _log_to_registry(registry: Any, version: str, report: dict[str, Any]) -> None:
    """The throughput figures on the version's training run (beside evaluate's metrics). The
    embeddings are complete and in place by now: a tracking-server failure is a warning."""
    try:
        figures = {f"embed_{k}": float(v) for k, v in report.items() if k not in ("version", "path")}
        registry.log_metrics(registry.version(version).run_id, figures)
    except Exception as e:  # noqa: BLE001 - never undo a finished embed job over its metrics
        print(f"[embed] warning: could not log the embed metrics to MLflow: {type(e).__name__}: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    def add(p: Any) -> None:
        p.add_argument("--version", default=None, help="version (default: serve.model_version or the alias)")

    return stage_main("python -m train.embed", __doc__, lambda cfg, a: run_embed(cfg, a.version), argv, add)


if __name__ == "__main__":
    sys.exit(main())
