"""`embsum embed`: precompute CPE for the whole catalog and UPE (+ generated summary) for every user
with ONE Ray Data actor pool, for one registered model version. Serving then scores known users
and items with no T5 call at all (DESIGN.md 2, the offline/online split).

Writes EMBEDDINGS_ROOT/v<VERSION>/{items,users}/ + manifest.json (see embsum/embeddings.py): into a
temporary sibling folder first, renamed into place at the end, so a reader never sees half a set.

One pool for items and users: the job's input is a small dataset of calls (``Call``: a kind and a
row range of one parquet row group, planned from the footers), items first, then users, and each
model actor reads its call's rows itself, encodes them and writes one parquet part. Ray Data gives
every ``map_batches`` its own actor pool, and a pool's start-up (worker processes,
torch/transformers imports, model load: 8-10 s on 2 cores) was paid twice when items and users
were two map_batches (400 users then took 0.30x a single process's time). Reading in the actor
also keeps the plan free of read or repartition tasks that would compete with the pool for CPUs
(a union of the two read+repartition inputs in front of one pool stalled on a 2-CPU cluster), and
no input or embedding row travels through the object store. Reports items/s and users/s, the
pool's start-up and its busy time per kind, printed and logged as ``embed_*`` metrics on the
version's MLflow run.

Per-session encoder states (so that a user could be refreshed by encoding only a new session) are
not stored: the session encoder is about 15% of a user's encoding time (256 users, d_model 64:
0.41 s encoding the sessions, 1.74 s generating the summary, 0.51 s for the teacher-forced pass and
item states), and the summary has to be regenerated over all sessions on any change anyway, while
the states would take G x L x D floats per user (98 KB at G=4, L=96, D=64; 50x the UPE itself).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embsum import events
from embsum.config import Config
from embsum.data import layout
from embsum.embeddings import ITEMS_DIR, USERS_DIR, Manifest, version_dir, write_manifest
from embsum.runtime import init_ray

from .batch_inference import ModelActor, encode_items, parquet_rows, pool_options, rows_per_call

# What each kind's call reads from its input (items.parquet, users/).
COLUMNS = {ITEMS_DIR: ("item_id", "text", "token_ids"), USERS_DIR: ("user_id", "history", "session_ids")}
# A user costs about this many items (a 32-token greedy summary on top of G session encodings;
# measured 85 users/s vs 8,000 items/s in one process at d_model 64), so user calls carry this
# many times fewer rows: each call stays a few seconds, and the pool's last call ends close to
# the others.
USER_ROW_COST = 8


# ---- the plan: calls over row ranges of the inputs' row groups ------------------------------------------
@dataclass(frozen=True)
class Call:
    """One actor call: rows [offset, offset + rows) of row group ``row_group`` of one parquet file.
    ``index`` numbers the calls of a kind and names the output part, so a retried call (a lost
    actor) overwrites its own file instead of adding rows twice."""

    kind: str
    index: int
    path: str
    row_group: int
    offset: int
    rows: int


def plan_calls(kind: str, path: str | Path, rows: int) -> list[Call]:
    """Every row of the parquet file or folder ``path`` in calls of at most ``rows`` rows, in file
    and row-group order, from the footers alone (nothing is read). A call never spans two row
    groups."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    calls: list[Call] = []
    for file in sorted(pads.dataset(str(path), format="parquet").files):
        meta = pq.ParquetFile(file).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            calls += [Call(kind, len(calls) + k, file, g, s, min(rows, n - s))
                      for k, s in enumerate(range(0, n, rows))]
    return calls


class RowGroupReader:
    """Reads row ranges of parquet row groups, streaming. An actor's calls come in file order
    (offsets increase within a row group), so one open iterator per actor moves forward through a
    row group: each row group is decoded at most once per actor and never held whole in memory
    (a prepared items.parquet is a single row group of up to a million rows)."""

    def __init__(self, columns: tuple[str, ...], io_rows: int = 1024) -> None:
        self.columns, self.io_rows = list(columns), io_rows
        self._at: tuple[str, int] | None = None
        self._it: Any = None
        self._pos = 0  # row-group row of self._buf's first row
        self._buf: Any = None

    def read(self, path: str, row_group: int, offset: int, rows: int) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._at != (path, row_group) or offset < self._pos:
            self._at, self._pos, self._buf = (path, row_group), 0, None
            self._it = pq.ParquetFile(path).iter_batches(batch_size=self.io_rows, row_groups=[row_group],
                                                         columns=self.columns)
        parts, end = [], offset + rows
        while self._pos < end:
            if self._buf is None or len(self._buf) == 0:
                try:
                    self._buf = next(self._it)
                except StopIteration:
                    raise ValueError(f"{path} row group {row_group} has fewer than {end} rows: the input "
                                     f"changed while the embed job ran") from None
            n = min(len(self._buf), end - self._pos)
            skip = max(0, offset - self._pos)
            if skip < n:
                parts.append(self._buf.slice(skip, n - skip))
            self._buf, self._pos = self._buf.slice(n), self._pos + n
        return pa.Table.from_batches(parts, schema=parts[0].schema if parts else None)


class EmbedWriter(ModelActor):
    """A model actor that runs whole ``Call``s: reads the rows, encodes them (CPE for items; UPE and
    the generated summary for users), writes them as one parquet part under ``out_dir/<kind>/``
    and returns only the row count and when the call ran, so the embeddings (2 x N x D floats per
    item, 0.4 GB per 200k items at d_model 64) never travel through the object store."""

    def __init__(self, out_dir: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.out_dir = out_dir.rstrip("/")
        self.readers = {kind: RowGroupReader(cols) for kind, cols in COLUMNS.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"kind": [], "rows": [], "start": [], "end": [], "pid": []}
        for j in range(len(batch["kind"])):
            call = Call(**{k: batch[k][j].item() if hasattr(batch[k][j], "item") else batch[k][j]
                           for k in Call.__dataclass_fields__})
            start = time.time()
            n = self._run(call)
            for k, v in (("kind", call.kind), ("rows", n), ("start", start), ("end", time.time()),
                         ("pid", os.getpid())):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}

    def _run(self, call: Call) -> int:
        import pyarrow.fs as pafs

        from embsum.arrow_tensors import table_tensor
        from embsum.embeddings import embedding_table, write_shard

        rows = self.readers[call.kind].read(call.path, call.row_group, call.offset, call.rows)
        if call.kind == ITEMS_DIR:
            cols = {"item_id": rows.column("item_id"), "text": rows.column("text"),
                    **encode_items(self.predictor, rows.column("token_ids").to_pylist())}
        else:
            emb = self.predictor.encode_users(table_tensor(rows, "session_ids", np.int32))  # (B, G, L) in
            cols = {"user_id": rows.column("user_id"), "history": rows.column("history"), "upe": emb.upe,
                    "summary": emb.summaries}
        target = f"{self.out_dir}/{call.kind}/part-{call.index:06d}.parquet"
        if "://" in self.out_dir:
            fs, path = pafs.FileSystem.from_uri(target)
            write_shard(embedding_table(cols), path, filesystem=fs)
        else:  # written aside, then renamed: a retried call replaces its part whole
            tmp = f"{target}.{time.time_ns()}.tmp"
            write_shard(embedding_table(cols), tmp)
            Path(tmp).replace(target)
        return rows.num_rows


# ---- the job ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KindStats:
    """What the pool did for one kind. Call times are the actors' clocks, the job start the
    driver's: on a multi-node cluster they agree to NTP's precision."""

    rows: int
    calls: int
    first_start: float  # the kind's first call started (epoch seconds)
    last_end: float  # its last call ended
    busy_s: float  # the calls' durations summed (actor-seconds)

    @property
    def span_s(self) -> float:
        return max(self.last_end - self.first_start, 1e-9)


def kind_stats(calls: list[dict[str, Any]], kind: str) -> KindStats:
    mine = [c for c in calls if str(c["kind"]) == kind]
    if not mine:
        return KindStats(rows=0, calls=0, first_start=0.0, last_end=0.0, busy_s=0.0)
    return KindStats(rows=sum(int(c["rows"]) for c in mine), calls=len(mine),
                     first_start=min(float(c["start"]) for c in mine), last_end=max(float(c["end"]) for c in mine),
                     busy_s=sum(float(c["end"]) - float(c["start"]) for c in mine))


def embed_report(t0: float, wall_s: float, items: KindStats, users: KindStats, actors: int,
                 processes: int = 0) -> dict[str, Any]:
    """The job's figures. ``startup_s``: job start -> the pool's first call (worker processes,
    imports, model load), paid once for both kinds. Items come first, so ``items_seconds`` runs
    from the job start (start-up included) to the last item call's end; ``users_seconds`` is the
    span of the user calls (the pool is running by then; while one actor finishes its last items
    the other starts on users, so this span is a little longer than users alone would take).
    ``*_steady_per_s``: rows over the kind's own call span; ``*_busy_s``: actor-seconds spent on it;
    ``actor_processes``: the distinct processes that ran calls (at most ``actors``: one pool)."""
    first = min((s.first_start for s in (items, users) if s.calls), default=t0 + wall_s)
    rep: dict[str, Any] = {"seconds": wall_s, "startup_s": max(0.0, first - t0), "actors": actors,
                           "actor_processes": processes}
    for kind, st, since in ((ITEMS_DIR, items, t0), (USERS_DIR, users, users.first_start)):
        seconds = max(st.last_end - since, 1e-9) if st.calls else 0.0
        rep.update({kind: st.rows, f"{kind}_calls": st.calls, f"{kind}_seconds": seconds,
                    f"{kind}_per_s": st.rows / seconds if st.calls else 0.0,
                    f"{kind}_steady_per_s": st.rows / st.span_s if st.calls else 0.0, f"{kind}_busy_s": st.busy_s})
    return rep


def run_calls(plan: list[Call], infer: Any, writer_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Every call of ``plan`` through ONE pool of ``EmbedWriter``s -> one row per call (kind, rows,
    start, end, pid), collected as each call finishes, with a progress event per kind."""
    import ray.data

    if not plan:
        return []
    totals = {kind: sum(c.rows for c in plan if c.kind == kind) for kind in (ITEMS_DIR, USERS_DIR)}
    done = dict.fromkeys(totals, 0)
    for kind, n in totals.items():
        events.progress(f"encoding {kind}", 0, n, kind)
    calls = []
    for c in ray.data.from_items([asdict(c) for c in plan], override_num_blocks=len(plan)).map_batches(
            EmbedWriter, batch_size=1, batch_format="numpy", fn_constructor_kwargs=writer_kw,
            **pool_options(infer)).iter_rows():
        calls.append(c)
        kind = str(c["kind"])
        done[kind] += int(c["rows"])
        events.progress(f"encoding {kind}", done[kind], totals[kind], kind)
    return calls


def run_embed(cfg: Config, version: str | None = None) -> dict[str, Any]:
    import ray.data

    from embsum.checkpoint import read_meta
    from embsum.registry import Registry

    t_start = time.perf_counter()
    data_dir = cfg.data_dir
    for need in (layout.ITEMS, layout.USERS):
        if not (data_dir / need).exists():
            raise ValueError(f"{data_dir / need} not found: run `embsum prepare` first")
    registry = Registry(cfg)
    version = registry.resolve(version).version
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = True
    local_model = registry.download(version, cfg.workdir_path / "models" / f"v{version}")
    meta = read_meta(local_model)
    infer = cfg.infer

    out = version_dir(cfg.embeddings_dir, version)
    tmp = out.parent / f".tmp-{out.name}-{int(time.time())}"
    try:
        for kind in (ITEMS_DIR, USERS_DIR):
            (tmp / kind).mkdir(parents=True, exist_ok=True)
        plan = [*plan_calls(ITEMS_DIR, data_dir / layout.ITEMS,
                            rows_per_call(parquet_rows(data_dir / layout.ITEMS), infer)),
                *plan_calls(USERS_DIR, data_dir / layout.USERS,
                            rows_per_call(parquet_rows(data_dir / layout.USERS), infer, cost=USER_ROW_COST))]
        t0 = time.time()
        calls = run_calls(plan, infer, {"out_dir": str(tmp), "cfg_dict": cfg.to_dict(), "version": version,
                                        "model_dir": str(local_model)})
        items, users = kind_stats(calls, ITEMS_DIR), kind_stats(calls, USERS_DIR)
        report = {"version": version, "path": str(out),
                  **embed_report(t0, time.time() - t0, items, users, infer.actors,
                                 len({int(c["pid"]) for c in calls}))}
        write_manifest(tmp, _manifest(registry.name, version, meta, items.rows, users.rows,
                                      time.perf_counter() - t_start))  # last: a folder with a manifest is complete
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["seconds"] = time.perf_counter() - t_start
    print(f"[embed] v{version}: one pool of {infer.actors} (start-up {report['startup_s']:.1f}s): "
          f"{items.rows} items ({report['items_per_s']:.1f}/s incl. start-up, {report['items_steady_per_s']:.1f}/s "
          f"running), {users.rows} users ({report['users_per_s']:.1f}/s) -> {out}", flush=True)
    from embsum.console import shown_path

    events.summary(f"v{version}: {items.rows:,} items ({report['items_per_s']:.1f}/s), {users.rows:,} users "
                   f"({report['users_per_s']:.1f}/s) -> {shown_path(out)}")
    _log_to_registry(registry, version, report)
    return report


def _manifest(model_name: str, version: str, meta: dict[str, Any], items: int, users: int,
              seconds: float) -> Manifest:
    """What the embeddings were made by (the model's ``read_meta``) and hold."""
    return Manifest(
        model_name=model_name, model_version=str(version),
        model_fingerprint=str(meta.get("metadata", {}).get("model_fingerprint", "")),
        items=items, users=users, dtype="float32", user_codes=int(meta["embsum"]["user_codes"]),
        content_codes=int(meta["embsum"]["content_codes"]), d_model=int(meta["t5"]["d_model"]), seconds=seconds)


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
