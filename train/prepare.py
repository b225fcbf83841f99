"""The prepare stage: raw engagement logs + item catalog -> tokenized parquet, as a Ray Data job.

    python -m train.prepare --config ray_config.yaml data.format=mind \
        data.interactions=../shared/data/mind/MINDsmall_train_sample/behaviors.tsv \
        data.items=../shared/data/mind/MINDsmall_train_sample/news.tsv

Writes WORKDIR/data/ as embsum/data/layout.py describes: items.parquet, users/, train/,
valid_examples/, valid/, test/, quarantine/ and prepare_report.json. The pure transforms live in
embsum/data/; this module is the glue that runs them on Ray Data:

1. preflight (driver): list the files, fail at once on files wrong as a whole.
2. catalog: line-aligned chunks -> parse + tokenize -> driver dedupes, writes items.parquet and
   puts the CatalogIndex in the object store for every later task. A catalog that fits in one
   chunk is parsed on the driver, where it is collected anyway (no worker loads the tokenizer).
3. interactions: the driver cuts each text file into line-aligned byte ranges that know their
   first line number (sources.split_lines); one task per range reads and parses it -> materialize.
4. global checks (driver, pyarrow on a few small columns): duplicate impression ids, counts, and
   which users each plan partition owns (embsum/data/partition.py).
5. plan + write: one task per user partition reads the parsed blocks, keeps its users' rows,
   plans them (per-user histories, examples, impressions), tensorizes and writes its parquet files
   of every output; one more task writes the quarantine. All into a staging folder that replaces
   the old outputs only when everything succeeded: a rerun never mixes in stale shards.

Outputs are written under WORKDIR (a local path of the driver and the workers): on a multi-node
cluster WORKDIR must be shared storage, as ``train.storage_path`` must. Inputs may be any URI.

Cost on small machines (bench/prepare_bench.py, 2 cores). What the earlier shape paid for, measured
with no-op UDFs on 200k impressions: the user hash-shuffle (repartition(keys=...)) ~12 CPU-s, whole
files read into one block then exploded and re-split ~3.5 CPU-s more than reading ranges, plus a
materialized plan and one Ray Data execution per output. Hence: no shuffle (partition.py), ranges,
and plan -> tensorize -> write fused in the task that owns the users, in one execution.
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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embsum import events
from embsum.config import Config
from embsum.data import layout, synth
from embsum.data.catalog import QUARANTINE_SCHEMA, CatalogIndex, build_catalog, cached_tokenizer
from embsum.data.examples import KINDS, PLAN_INPUT_COLUMNS, PlanSpec, plan_batch
from embsum.data.partition import DUPLICATES_SCHEMA, duplicate_rows, is_duplicate, partition_users, select_rows
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
from embsum.data.sources import (
    Chunk,
    Source,
    detect_format,
    estimate_rows,
    explode_batch,
    fingerprint,
    read_chunk,
    resolve,
    split_lines,
)
from embsum.data.tensorize import output_schema, tensorize, write_options
from embsum.runtime import init_ray

BLOCKS_PER_CPU = 2  # parse blocks per cluster CPU, so a single big file is parsed by all of them
ROWS_PER_BLOCK = (10_000, 50_000)  # ... within these bounds (smaller blocks cost more than they give)
# Records per plan partition: at least one partition per CPU, more when a task would hold too many
# rows in memory, fewer when tasks would be too small to pay for themselves.
ROWS_PER_PARTITION = (5_000, 100_000)
TENSORIZE_ROWS = 8192  # plan rows tensorized (and written as one parquet row group) at a time
OUTPUTS = {"train": layout.TRAIN, "valid_examples": layout.VALID_EXAMPLES, "valid": layout.VALID,
           "test": layout.TEST, "users": layout.USERS}
COUNTER_COLUMNS = ["n_candidates", "n_clicks", "n_missing_candidates", "n_history", "n_missing_history", "n_ignored"]
QUARANTINE_UNIT = -1  # the plan-and-write unit that writes quarantine/ instead of a user partition

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


def _chunks_task(batch: pa.Table, filesystem: Any, parse: Callable[..., pa.Table], kwargs: dict) -> pa.Table:
    """Read each chunk of the batch and parse its lines, in one task (no block of raw lines in between)."""
    return pa.concat_tables([parse(read_chunk(filesystem, Chunk(**c)), **kwargs) for c in batch.to_pylist()])


def _plan_write_task(batch: pa.Table, blocks: list, users: list, duplicates_ref: Any, catalog_quarantine_ref: Any,
                     spec: PlanSpec, index_ref: Any, negatives: int, out: str) -> pa.Table:
    """One unit of the plan-and-write stage: a user partition (plan, tensorize, write every
    output's rows of those users) or QUARANTINE_UNIT. Returns one row: the partition's stats."""
    import ray

    unit = int(batch.column("unit")[0].as_py())
    duplicates: pa.Table = ray.get(duplicates_ref)
    tables: list[pa.Table] = ray.get(blocks)  # zero-copy from the node's shared memory
    if unit == QUARANTINE_UNIT:
        parts = [t.filter(pc.not_equal(t.column("reason"), "")).select(QUARANTINE_SCHEMA.names) for t in tables]
        if duplicates.num_rows:
            for t in tables:
                dup = t.filter(is_duplicate(t, duplicates))
                parts.append(dup.set_column(dup.schema.get_field_index("reason"), "reason",
                                            pa.array([DUPLICATE_IMPRESSION] * dup.num_rows, pa.string()))
                             .select(QUARANTINE_SCHEMA.names))
        parts.append(ray.get(catalog_quarantine_ref))
        rows = pa.concat_tables([p.cast(QUARANTINE_SCHEMA) for p in parts])
        if rows.num_rows:
            pq.write_table(rows, Path(out) / layout.QUARANTINE / "part-00000.parquet")
        return pa.table({"stats": ["{}"]})
    index: CatalogIndex = _fetch(index_ref)
    user_ids = ray.get(users[unit])
    columns = ["reason", *PLAN_INPUT_COLUMNS]
    records = pa.concat_tables([select_rows(t.select(columns), user_ids, duplicates) for t in tables])
    plan = plan_batch(records, spec, index)
    kinds = plan.column("kind")
    for kind in KINDS:
        rows = plan.filter(pc.equal(kinds, kind))
        if rows.num_rows == 0:
            continue
        schema = output_schema(kind, index.assembler.cfg, negatives, spec.targets)
        with pq.ParquetWriter(Path(out) / OUTPUTS[kind] / f"part-{unit:05d}.parquet", schema,
                              **write_options(schema)) as w:
            for k in range(0, rows.num_rows, TENSORIZE_ROWS):
                w.write_table(tensorize(rows.slice(k, TENSORIZE_ROWS), kind, index, negatives, spec.targets))
    stats = plan.filter(pc.equal(kinds, "stats")).column("stats").to_pylist()
    assert len(stats) == 1
    return pa.table({"stats": stats})


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


def _rows_per_block(src: Source, cpus: int) -> tuple[int, int]:
    """(estimated rows, rows per parse block): enough blocks that all CPUs parse, within bounds."""
    lo, hi = ROWS_PER_BLOCK
    rows = estimate_rows(src)
    return rows, min(hi, max(lo, math.ceil(rows / (BLOCKS_PER_CPU * cpus))))


def _chunks(src: Source, fmt: str, headed: bool, cpus: int) -> list[Chunk]:
    rows, per_block = _rows_per_block(src, cpus)
    total = sum(f.size for f in src.files)
    chunks = split_lines(src, math.ceil(per_block * total / rows), headed)
    f = src.files[0]  # no bytes at all: one empty chunk, so the job still runs (and writes empty outputs)
    return chunks or [Chunk(f.path, src.prefix + f.path, 0, 0, 1, 0)]


def _parsed(src: Source, fmt: str, headed: bool, parse: Callable[..., pa.Table], kwargs: dict) -> Any:
    """A Dataset of ``parse`` applied to the numbered lines of every file (parquet: its rows)."""
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if fmt == "parquet":  # rows, not lines: whole files, then re-split so that all CPUs parse
        ds = ray.data.read_binary_files(src.paths, include_paths=True, filesystem=src.filesystem)
        ds = ds.map_batches(explode_batch, fn_kwargs=dict(fmt=fmt, headed=headed, prefix=src.prefix),
                            batch_size=1, batch_format="pyarrow")
        # strict: otherwise 2.60 fuses explode -> repartition -> parse into one task per file
        ds = ds.repartition(target_num_rows_per_block=_rows_per_block(src, cpus)[1], strict=True)
        return ds.map_batches(parse, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)
    chunks = _chunks(src, fmt, headed, cpus)
    return ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks)).map_batches(
        _chunks_task, fn_kwargs=dict(filesystem=src.filesystem, parse=parse, kwargs=kwargs),
        batch_format="pyarrow", batch_size=1)


def _collect(ds: Any, schema: pa.Schema) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def _catalog_rows(items: Source, items_fmt: str, cspec: CatalogSpec, headers: dict, cfg: Config) -> pa.Table:
    """Parsed catalog rows. One chunk's worth is parsed here: it is collected here anyway, and the
    tokenizer is already loaded here (a worker would first import transformers: CPU-seconds)."""
    import ray

    kwargs = dict(spec=cspec, headers=headers, model=cfg.model)
    fmt, headed = ("tsv" if items_fmt == "mind" else items_fmt), items_fmt in ("csv", "tsv")
    if fmt != "parquet":
        chunks = _chunks(items, fmt, headed, int(ray.cluster_resources().get("CPU", 1)))
        if len(chunks) == 1:
            return _parse_catalog_task(read_chunk(items.filesystem, chunks[0]), **kwargs).cast(CATALOG_SCHEMA)
    return _collect(_parsed(items, fmt, headed, _parse_catalog_task, kwargs), CATALOG_SCHEMA)


def _partitions(rows: int, cpus: int) -> int:
    lo, hi = ROWS_PER_PARTITION
    return max(1, min(max(cpus, math.ceil(rows / hi)), math.ceil(rows / lo)))


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Run the prepare job on ``cfg.ray``'s cluster; returns the report (also written to
    WORKDIR/data/prepare_report.json). Raises ``ValueError`` for inputs wrong as a whole."""
    import ray
    import ray.data

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

    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = True
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    doing = {"catalog": "reading the item catalog", "parse": "parsing interactions", "checks": "checking records",
             "plan_write": "planning and writing examples"}
    events.progress(doing["catalog"], 0, len(doing), "steps")

    def lap(name: str) -> None:
        stages[name] = round(time.perf_counter() - t0 - sum(stages.values()), 3)
        following = list(doing)[len(stages)] if len(stages) < len(doing) else None
        if following:
            events.progress(doing[following], len(stages), len(doing), "steps")

    data_dir = cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        # 2. catalog
        tok = cached_tokenizer(cfg.model)
        catalog = build_catalog(_catalog_rows(items, items_fmt, cspec, item_headers, cfg), tok)
        if len(catalog.index) == 0:
            raise ValueError(f"data.items: no valid item in {[f.uri for f in items.files]} "
                             f"({catalog.quarantine.num_rows} rows quarantined: "
                             f"{dict(Counter(catalog.quarantine.column('reason').to_pylist()))})")
        pq.write_table(catalog.items, staging / layout.ITEMS)
        index_ref = ray.put(catalog.index)
        lap("catalog")

        # 3. interactions
        parsed = _parsed(inter, inter_fmt, not mind and inter_fmt in ("csv", "tsv"), _parse_interactions_task,
                         dict(mind=mind, spec=lspec, headers=inter_headers, index_ref=index_ref)).materialize()
        lap("parse")

        # 4. global checks on small columns
        small_cols = ["source", "line", "reason", "user_id", "impression_id", *COUNTER_COLUMNS]
        small = _collect(parsed.select_columns(small_cols), pa.schema([RECORD_SCHEMA.field(c) for c in small_cols]))
        dups = duplicate_rows(small, mind)
        reasons = Counter(_value_counts(small.column("reason")))
        reasons.pop("", None)
        if dups.num_rows:
            reasons[DUPLICATE_IMPRESSION] += dups.num_rows
        good = small.filter(pc.equal(small.column("reason"), ""))
        if dups.num_rows:
            good = good.filter(pc.invert(is_duplicate(good, dups)))
        n_users = pc.count_distinct(good.column("user_id")).as_py()
        n_parts = _partitions(good.num_rows, int(ray.cluster_resources().get("CPU", 1)))
        users = [ray.put(u) for u in partition_users(good.column("user_id"), n_parts)]
        lap("checks")

        # 5. plan + tensorize + write: one task per user partition, one for the quarantine
        for name in (*OUTPUTS.values(), layout.QUARANTINE):
            (staging / name).mkdir()
        units = [{"unit": QUARANTINE_UNIT}, *({"unit": p} for p in range(n_parts))]
        out = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _plan_write_task, batch_format="pyarrow", batch_size=1, fn_kwargs=dict(
                blocks=parsed.to_arrow_refs(), users=users, duplicates_ref=ray.put(dups.cast(DUPLICATES_SCHEMA)),
                catalog_quarantine_ref=ray.put(catalog.quarantine), spec=PlanSpec.from_config(cfg, mind),
                index_ref=index_ref, negatives=d.negatives, out=str(staging)))
        stats: Counter = Counter()
        for i, s in enumerate(out.iter_rows(), 1):  # one row per unit, as it finishes
            stats.update(json.loads(s["stats"]))
            events.progress(doing["plan_write"], i, len(units), "partitions")
        users_out = sum(v for k, v in stats.items() if k.startswith("users."))
        if users_out != n_users:
            raise AssertionError(f"plan saw {users_out} users, the records hold {n_users}: a user was missed "
                                 f"or planned twice by the partitions")
        for kind in KINDS:  # no rows: still a readable dataset with the promised columns
            if not any((staging / OUTPUTS[kind]).glob("*.parquet")):
                pq.write_table(output_schema(kind, cfg.model, d.negatives, d.targets_per_example).empty_table(),
                               staging / OUTPUTS[kind] / "part-empty.parquet")
        if not any((staging / layout.QUARANTINE).glob("*.parquet")):
            pq.write_table(QUARANTINE_SCHEMA.empty_table(), staging / layout.QUARANTINE / "part-empty.parquet")
        lap("plan_write")
        seconds = time.perf_counter() - t0

        report = _report(cfg, fp, mind, inter, items, small, catalog, reasons, stats, seconds)
        report["stage_seconds"] = stages
        report["cluster_cpus"] = ray.cluster_resources().get("CPU")
        report["plan_partitions"] = n_parts
        (staging / layout.REPORT).write_text(json.dumps(report, indent=2, sort_keys=True))
        for name in (layout.ITEMS, layout.QUARANTINE, layout.REPORT, *OUTPUTS.values()):
            _replace(staging / name, data_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    events.summary(_summary_line(report))
    return report


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))


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
    return (f"{r['rows_in']:,} rows in, {r['rows_out']:,} out, {r['quarantined']:,} quarantined; "
            f"{r['items']['items']:,} items, {r['users']['total']:,} users; examples {ex['train']:,} train + "
            f"{ex['valid_examples']:,} valid; eval impressions {r['eval_impressions']['valid']:,} valid + "
            f"{r['eval_impressions']['test']:,} test; {r['examples_per_s']:,} examples/s")


def main(argv: list[str] | None = None) -> int:
    """``python -m train.prepare --config ray_config.yaml [--result out.json] key=value ...``"""
    from embsum.stage import stage_main

    return stage_main("python -m train.prepare", __doc__, lambda cfg, a: run_prepare(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
