"""The prepare stage: raw engagement logs + item catalog -> tokenized parquet, as a Ray Data job.

    python -m train.prepare --config ray_config.yaml data.format=mind \
        data.interactions=../shared/data/mind/MINDsmall_train_sample/behaviors.tsv \
        data.items=../shared/data/mind/MINDsmall_train_sample/news.tsv

Writes WORKDIR/data/ as embsum/data/layout.py describes: items.parquet, users/, train/,
valid_examples/, valid/, test/, quarantine/ and prepare_report.json. The pure transforms live in
embsum/data/; this module is the glue that runs them on Ray Data:

1. preflight (driver): list the files, fail at once on files wrong as a whole.
2. catalog: read_binary_files -> numbered lines -> parse + tokenize (tasks) -> driver dedupes,
   writes items.parquet and puts the CatalogIndex in the object store for every later task.
3. interactions: read_binary_files -> numbered lines -> streaming repartition (so one big file
   is parsed by many tasks) -> parse/validate -> materialize.
4. global checks (driver, on a few small columns): duplicate impression ids, counts.
5. plan: hash-repartition by user_id (every user's rows in one block, the guarantee
   ``map_groups`` relies on) -> per-user histories, examples, impressions -> materialize.
6. write: per output, filter -> tensorize (tasks) -> write_parquet, into a staging folder that
   replaces the old outputs only when everything succeeded: a rerun never mixes in stale shards.

Outputs are written under WORKDIR (a local path of the driver and the workers): on a multi-node
cluster WORKDIR must be shared storage, as ``train.storage_path`` must. Inputs may be any URI.

Cost on small machines (bench/prepare_bench.py, 2 cores): the Ray job spends roughly 1.6-2x the
CPU of the same transforms in one process, mostly in Ray worker start-ups (each hash-shuffle
starts one aggregator actor per partition, and the pool refills after they exit) and in the
executor; hence few, large partitions here (ROWS_PER_PARTITION) and one write at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embsum.config import Config
from embsum.data import layout, synth
from embsum.data.catalog import QUARANTINE_SCHEMA, CatalogIndex, build_catalog, cached_tokenizer
from embsum.data.examples import KINDS, PLAN_INPUT_COLUMNS, PlanSpec, plan_batch
from embsum.data.records import (
    CATALOG_SCHEMA,
    DUPLICATE_IMPRESSION,
    MIND_BEHAVIOR_COLUMNS,
    MIND_NEWS_COLUMNS,
    RECORD_SCHEMA,
    CatalogSpec,
    LogSpec,
    parse_behaviors,
    parse_catalog,
    parse_logs,
    preflight,
)
from embsum.data.sources import Source, detect_format, estimate_rows, explode_batch, fingerprint, resolve
from embsum.data.tensorize import output_schema, tensorize
from embsum.runtime import init_ray

BLOCKS_PER_CPU = 2  # parse blocks per cluster CPU, so a single big file is parsed by all of them
ROWS_PER_BLOCK = (10_000, 50_000)  # ... within these bounds (smaller blocks cost more than they give)
ROWS_PER_PARTITION = 50_000  # records per user partition of the plan stage (at most one per CPU)
OUTPUTS = {"train": layout.TRAIN, "valid_examples": layout.VALID_EXAMPLES, "valid": layout.VALID,
           "test": layout.TEST, "users": layout.USERS}
COUNTER_COLUMNS = ["n_candidates", "n_clicks", "n_missing_candidates", "n_history", "n_missing_history", "n_ignored"]

_OBJECTS: dict[str, Any] = {}  # per worker process: object-store values already fetched


def _fetch(ref: Any) -> Any:
    """``ray.get`` once per worker process (tasks reuse workers; the catalog is fetched once)."""
    import ray

    key = ref.hex()
    if key not in _OBJECTS:
        if len(_OBJECTS) >= 4:
            _OBJECTS.clear()
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


# ---- task bodies (module level: Ray pickles them by reference) --------------------------------

def _parse_catalog_task(batch: pa.Table, spec: CatalogSpec, headers: dict, model: Any) -> pa.Table:
    return parse_catalog(batch, spec, headers, cached_tokenizer(model))


def _parse_interactions_task(batch: pa.Table, mind: bool, spec: LogSpec | None, headers: dict,
                             index_ref: Any) -> pa.Table:
    index: CatalogIndex = _fetch(index_ref)
    if mind:
        return parse_behaviors(batch, index.position)
    assert spec is not None
    return parse_logs(batch, spec, headers, index.position, keep_raw=bool(spec.impression_col))


def _mark_duplicates_task(batch: pa.Table, dups_ref: Any) -> pa.Table:
    dups: set[tuple[str, int]] = _fetch(dups_ref)
    reasons = batch.column("reason").to_pylist()
    for k, (s, n) in enumerate(zip(batch.column("source").to_pylist(), batch.column("line").to_pylist(), strict=True)):
        if (s, n) in dups:
            reasons[k] = DUPLICATE_IMPRESSION
    return batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))


def _plan_task(batch: pa.Table, spec: PlanSpec, index_ref: Any) -> pa.Table:
    return plan_batch(batch, spec, _fetch(index_ref))


def _tensorize_task(batch: pa.Table, kind: str, index_ref: Any, negatives: int) -> pa.Table:
    return tensorize(batch, kind, _fetch(index_ref), negatives)


# ---- driver ---------------------------------------------------------------------------------

def resolve_inputs(cfg: Config) -> tuple[bool, Source, str, Source, str]:
    """-> (is_mind, interactions, their format, items, their format). Synthetic data is generated
    under WORKDIR/data/synthetic first (reused when its parameters match) and read as MIND."""
    d = cfg.data
    if d.format == "synthetic":
        beh, news = synth.ensure(cfg.data_dir / "synthetic", d.synth_users, d.synth_items, d.synth_impressions, d.seed)
        return True, resolve(str(beh), "data.interactions"), "tsv", resolve(str(news), "data.items"), "mind"
    inter, items = resolve(d.interactions, "data.interactions"), resolve(d.items, "data.items")
    if d.format == "mind":
        return True, inter, "tsv", items, "mind"
    return (False, inter, detect_format(d.interactions_format, inter, "data.interactions"),
            items, detect_format(d.items_format, items, "data.items"))


def _lines(src: Source, fmt: str, headed: bool) -> Any:
    """Numbered lines of every file, in blocks sized so that all CPUs parse (one file is one read)."""
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    lo, hi = ROWS_PER_BLOCK
    rows = min(hi, max(lo, math.ceil(estimate_rows(src) / (BLOCKS_PER_CPU * cpus))))
    ds = ray.data.read_binary_files(src.paths, include_paths=True, filesystem=src.filesystem)
    ds = ds.map_batches(explode_batch, fn_kwargs=dict(fmt=fmt, headed=headed, prefix=src.prefix),
                        batch_size=1, batch_format="pyarrow")
    # strict: otherwise 2.60 fuses explode -> repartition -> parse into one task per file
    return ds.repartition(target_num_rows_per_block=rows, strict=True)


def _collect(ds: Any, schema: pa.Schema) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def _duplicates(small: pa.Table, mind: bool) -> set[tuple[str, int]]:
    """(source, line) of good rows whose impression id was already used: by an earlier row (MIND:
    one row per impression) or by another user (logs: many rows per impression)."""
    good = small.filter(pc.and_(pc.equal(small.column("reason"), ""), pc.not_equal(small.column("impression_id"), "")))
    good = good.sort_by([("source", "ascending"), ("line", "ascending")])
    first: dict[str, str] = {}
    dups: set[tuple[str, int]] = set()
    columns = (good.column(c).to_pylist() for c in ("source", "line", "impression_id", "user_id"))
    for s, n, imp, user in zip(*columns, strict=True):
        if imp not in first:
            first[imp] = user
        elif mind or first[imp] != user:
            dups.add((s, n))
    return dups


def _write(ds: Any, out: Path, schema: pa.Schema) -> None:
    ds.write_parquet(str(out))
    if not out.exists() or not any(out.glob("*.parquet")):  # no rows: still a readable dataset
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(schema.empty_table(), out / "part-empty.parquet")


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Run the prepare job on ``cfg.ray``'s cluster; returns the report (also written to
    WORKDIR/data/prepare_report.json). Raises ``ValueError`` for inputs wrong as a whole."""
    import ray
    import ray.data
    from ray.data.expressions import col

    d = cfg.data
    mind, inter, inter_fmt, items, items_fmt = resolve_inputs(cfg)
    cspec = CatalogSpec.from_config(d, items_fmt)
    lspec = None if mind else LogSpec.from_config(d, inter_fmt)
    item_headers = preflight(items, items_fmt, cspec.required, "data.items",
                             MIND_NEWS_COLUMNS if items_fmt == "mind" else None)
    if mind:
        inter_headers = preflight(inter, "mind", (), "data.interactions", MIND_BEHAVIOR_COLUMNS)
    else:
        assert lspec is not None
        inter_headers = preflight(inter, inter_fmt, lspec.required, "data.interactions")
    model_keys = ("tokenizer", "backbone", "sos_token", "num_sessions", "items_per_session", "session_tokens",
                  "content_tokens")
    shaping = {k: v for k, v in asdict(d).items() if k != "teacher"}  # the teacher does not shape these outputs
    fp = fingerprint([inter, items], {"data": shaping, "model": {k: getattr(cfg.model, k) for k in model_keys}},
                     mtimes=d.format != "synthetic")  # synthetic files are a pure function of the config

    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = True
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = round(time.perf_counter() - t0 - sum(stages.values()), 3)

    data_dir = cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        # 2. catalog
        tok = cached_tokenizer(cfg.model)
        cat_ds = _lines(items, items_fmt, headed=items_fmt in ("csv", "tsv")).map_batches(
            _parse_catalog_task, fn_kwargs=dict(spec=cspec, headers=item_headers, model=cfg.model),
            batch_format="pyarrow", batch_size=None)
        catalog = build_catalog(_collect(cat_ds, CATALOG_SCHEMA), tok)
        if len(catalog.index) == 0:
            raise ValueError(f"data.items: no valid item in {[f.uri for f in items.files]} "
                             f"({catalog.quarantine.num_rows} rows quarantined: "
                             f"{dict(Counter(catalog.quarantine.column('reason').to_pylist()))})")
        pq.write_table(catalog.items, staging / layout.ITEMS)
        index_ref = ray.put(catalog.index)
        lap("catalog")

        # 3. interactions
        parsed = _lines(inter, inter_fmt, headed=not mind and inter_fmt in ("csv", "tsv")).map_batches(
            _parse_interactions_task, fn_kwargs=dict(mind=mind, spec=lspec, headers=inter_headers, index_ref=index_ref),
            batch_format="pyarrow", batch_size=None).materialize()
        lap("parse")

        # 4. global checks on small columns
        small_cols = ["source", "line", "reason", "user_id", "impression_id", *COUNTER_COLUMNS]
        small = _collect(parsed.select_columns(small_cols), pa.schema([RECORD_SCHEMA.field(c) for c in small_cols]))
        dups = _duplicates(small, mind)
        if dups:
            parsed = parsed.map_batches(_mark_duplicates_task, fn_kwargs=dict(dups_ref=ray.put(dups)),
                                        batch_format="pyarrow", batch_size=None).materialize()
        reasons = Counter(r for r in small.column("reason").to_pylist() if r)
        if dups:
            reasons[DUPLICATE_IMPRESSION] += len(dups)
        good = small.filter(pc.equal(small.column("reason"), ""))
        columns = (good.column(c).to_pylist() for c in ("user_id", "source", "line"))
        n_users = len({u for u, s, n in zip(*columns, strict=True) if (s, n) not in dups})

        lap("checks")

        # 5. plan
        spec = PlanSpec.from_config(cfg, mind)
        n_parts = max(1, min(int(ray.cluster_resources().get("CPU", 1)), math.ceil(good.num_rows / ROWS_PER_PARTITION)))
        plan = (parsed.filter(expr=col("reason") == "").select_columns(PLAN_INPUT_COLUMNS)
                .repartition(n_parts, keys=["user_id"])
                .map_batches(_plan_task, fn_kwargs=dict(spec=spec, index_ref=index_ref),
                             batch_format="pyarrow", batch_size=None)
                .materialize())
        stats: Counter = Counter()
        for s in plan.filter(expr=col("kind") == "stats").select_columns(["stats"]).take_all():
            stats.update(json.loads(s["stats"]))
        users_out = sum(v for k, v in stats.items() if k.startswith("users."))
        if users_out != n_users:
            raise AssertionError(f"plan saw {users_out} users, the records hold {n_users}: a user was split "
                                 f"across blocks by the repartition")

        lap("plan")

        # 6. write (one execution at a time: side by side in threads they contend and were 3-6x slower)
        writes = [(plan.filter(expr=col("kind") == kind).map_batches(
            _tensorize_task, fn_kwargs=dict(kind=kind, index_ref=index_ref, negatives=d.negatives),
            batch_format="pyarrow"), staging / OUTPUTS[kind], output_schema(kind, cfg.model, d.negatives))
            for kind in KINDS]
        quarantine = parsed.filter(expr=col("reason") != "").select_columns(QUARANTINE_SCHEMA.names)
        if catalog.quarantine.num_rows:
            quarantine = quarantine.union(ray.data.from_arrow(catalog.quarantine))
        writes.append((quarantine, staging / layout.QUARANTINE, QUARANTINE_SCHEMA))
        for w in writes:
            _write(*w)
        lap("write")
        seconds = time.perf_counter() - t0

        report = _report(cfg, fp, mind, inter, items, small, catalog, reasons, stats, seconds)
        report["stage_seconds"] = stages
        report["cluster_cpus"] = ray.cluster_resources().get("CPU")
        (staging / layout.REPORT).write_text(json.dumps(report, indent=2, sort_keys=True))
        for name in (layout.ITEMS, layout.QUARANTINE, layout.REPORT, *OUTPUTS.values()):
            _replace(staging / name, data_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(_summary_line(report), flush=True)
    return report


def _replace(new: Path, old: Path) -> None:
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    os.replace(new, old)


def _report(cfg: Config, fp: str, mind: bool, inter: Source, items: Source, small: pa.Table, catalog: Any,
            reasons: Counter, stats: Counter, seconds: float) -> dict[str, Any]:
    good = small.filter(pc.equal(small.column("reason"), ""))
    sums = {c: int(pc.sum(small.column(c)).as_py() or 0) for c in COUNTER_COLUMNS}  # over every parsed row
    cat_reasons = Counter(catalog.quarantine.column("reason").to_pylist())
    examples = {k: stats.get(f"examples.{k}", 0) for k in ("train", "valid_examples")}
    n_examples = sum(examples.values())
    rows_out = good.num_rows - reasons[DUPLICATE_IMPRESSION]
    return {
        "status": "ok",
        "format": cfg.data.format,
        "fingerprint": fp,
        "inputs": {s.field: [{"uri": f.uri, "size": f.size, "mtime_ns": f.mtime_ns} for f in s.files]
                   for s in (inter, items)},
        "data_config": asdict(cfg.data),
        "rows_in": small.num_rows,
        "rows_out": rows_out,
        "quarantined": sum(reasons.values()) + sum(cat_reasons.values()),
        "quarantined_by_reason": dict(sorted((reasons + cat_reasons).items())),
        "interactions": {"rows_in": small.num_rows, "rows_out": rows_out, "quarantined": sum(reasons.values()),
                         "quarantined_by_reason": dict(sorted(reasons.items()))},
        "items": {"rows_in": catalog.rows_in, "items": len(catalog.index), "quarantined": sum(cat_reasons.values()),
                  "quarantined_by_reason": dict(sorted(cat_reasons.items()))},
        "candidates": {"in": sums["n_candidates"], "clicked": sums["n_clicks"],
                       "dropped_not_in_catalog": sums["n_missing_candidates"]},
        "history_items": {"in": sums["n_history"], "dropped_not_in_catalog": sums["n_missing_history"]},
        "labels": {"positive": sums["n_clicks"], "ignored": sums["n_ignored"]},
        "dropped": {"item not in catalog": sums["n_missing_candidates"],
                    "history item not in catalog": sums["n_missing_history"], "ignored label": sums["n_ignored"]},
        "examples": examples,
        "eval_impressions": {k: stats.get(f"eval.{k}", 0) for k in ("valid", "test")},
        "users": {**{k: stats.get(f"users.{k}", 0) for k in ("train", "valid", "test")},
                  "total": sum(stats.get(f"users.{k}", 0) for k in ("train", "valid", "test"))},
        "skipped": {k: v for k, v in sorted(stats.items()) if k.startswith(("skipped.", "eval_skipped."))},
        "seconds": round(seconds, 3),
        "examples_per_s": round(n_examples / seconds, 1) if seconds > 0 else None,
        "outputs": {name: str(cfg.data_dir / name) for name in
                    (layout.ITEMS, layout.QUARANTINE, layout.REPORT, *OUTPUTS.values())},
    }


def _summary_line(r: dict[str, Any]) -> str:
    ex = r["examples"]
    return (f"prepare: rows in {r['rows_in']:,} | rows out {r['rows_out']:,} | quarantined {r['quarantined']:,} | "
            f"items {r['items']['items']:,} | examples {ex['train']:,} train + {ex['valid_examples']:,} valid | "
            f"eval impressions {r['eval_impressions']['valid']:,} valid + {r['eval_impressions']['test']:,} test | "
            f"users {r['users']['total']:,} | {r['examples_per_s']:,} examples/s in {r['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """``python -m train.prepare --config ray_config.yaml [--result out.json] key=value ...``"""
    from embsum.stage import stage_main

    return stage_main("python -m train.prepare", __doc__, lambda cfg, a: run_prepare(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
