"""The prepare stage: raw engagement logs + item catalog -> tokenized parquet, as a Ray Data job.

    python -m train.prepare --config ray_config.yaml data.format=mind \
        data.interactions=../shared/data/mind/MINDsmall_train_sample/behaviors.tsv \
        data.items=../shared/data/mind/MINDsmall_train_sample/news.tsv

Writes WORKDIR/data/ as embsum/data/layout.py describes: items.parquet, users/, train/,
valid_examples/, valid/, test/, quarantine/ and prepare_report.json. The pure transforms live in
embsum/data/; this module is the glue that runs them on Ray Data:

1. preflight (driver, train/prepare_inputs.py): list the files, fail at once on files wrong as a whole.
2. catalog: parse + tokenize -> the driver dedupes (items, not rows: it is what every later task
   looks items up in), writes items.parquet and puts the CatalogIndex in the object store. A
   catalog that fits in one chunk is parsed on the driver (no worker loads the tokenizer).
3. interactions: read as numbered rows (train/numbered_rows.py: line-aligned byte ranges of text
   files, row-group runs of parquet files) and parsed in the read tasks.
4. duplicate impression ids (when the data has impression ids): a hash shuffle of the parsed rows
   by impression id; each partition holds every row of its ids and marks the duplicates
   quarantined (embsum/data/partition.py).
5. group + plan + write: a hash shuffle by user (``repartition(keys=...)``); one task per
   partition holds whole users, plans them (per-user histories, examples, impressions),
   tensorizes and writes its parquet files of every output and its quarantine rows, and returns
   one row of counts. All into a staging folder that replaces the old outputs only when
   everything succeeded: a rerun never mixes in stale shards. The report sums the partitions'
   counts (train/prepare_report.py).

What grows with the data stays on the cluster: every task reads only its share of the rows (no
task reads every block), the driver holds the catalog, the ranges' bounds and one row of counts
per partition (no column, no user id), and the stages stream from shuffle to shuffle (nothing is
materialized), so each node's object store holds about its share of the rows in flight.
Outputs are written under WORKDIR (a local path of the driver and the workers): on a multi-node
cluster WORKDIR must be shared storage, as ``train.storage_path`` must. Inputs may be any URI.

Concurrency: one task per core (train/prepare_slots.py). The local cluster embsum starts
declares more logical CPUs than the machine has cores (for Data beside Train); there the job caps
Ray Data's CPUs at the cores, which saved about a seventh of the job's CPU-seconds on 2 cores.
Read blocks and user partitions are counted in those slots.

Cost (bench/prepare_bench.py, 2 cores): a hash shuffle of 200k parsed impressions costs ~1 CPU-s
once its workers run (Ray 2.60's task-based SHUFFLE_V2; the aggregator-actor shuffle measured
earlier cost ~12). Per-row cost and driver memory at 200k / 800k / 3.2M are in the README.
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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embsum import events
from embsum.config import Config
from embsum.data import layout
from embsum.data.catalog import QUARANTINE_SCHEMA, Catalog, CatalogIndex, build_catalog, cached_tokenizer
from embsum.data.examples import KINDS, PlanSpec, plan_batch
from embsum.data.partition import (
    ROUTE,
    impression_route,
    mark_duplicates,
    partition_key,
    split_partition,
    user_route,
)
from embsum.data.records import (
    CATALOG_SCHEMA,
    CatalogSpec,
    LogSpec,
    parse_behaviors,
    parse_catalog,
    parse_logs,
)
from embsum.data.sources import (
    Chunk,
    RowGroups,
    Source,
    estimate_rows,
    read_chunk,
    split_lines,
    split_row_groups,
)
from embsum.data.tensorize import output_schema, tensorize, write_options
from embsum.runtime import init_ray, use_hash_shuffle

from .prepare_inputs import Inputs, check_inputs
from .prepare_report import build_report, summary_line
from .prepare_slots import cluster_cpus, data_settings, job_settings, machine_cores, on_one_machine, task_slots

# Parse blocks per task slot: one big file is parsed by every slot, and the shuffle after the parse
# starts on the first blocks while the others are parsed.
BLOCKS_PER_SLOT = 4
ROWS_PER_BLOCK = (10_000, 50_000)  # ... within these bounds (smaller blocks cost more than they give)
# Records per user partition (one plan task each): at least one partition per task slot, more when a
# task would hold too many rows in memory, fewer when tasks would be too small to pay for themselves.
ROWS_PER_PARTITION = (5_000, 100_000)
TENSORIZE_ROWS = 8192  # plan rows tensorized (and written as one parquet row group) at a time
OUTPUTS = {"train": layout.TRAIN, "valid_examples": layout.VALID_EXAMPLES, "valid": layout.VALID,
           "test": layout.TEST, "users": layout.USERS}
PUBLISHED = (layout.ITEMS, layout.QUARANTINE, layout.REPORT, *OUTPUTS.values())  # what a run replaces
# The console's steps: after the catalog, parsing, the shuffles and the plan/write tasks stream as one.
STEPS = {"catalog": "reading the item catalog",
         "group_plan_write": "parsing, grouping by user, planning and writing examples"}


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


def _mark_duplicates_task(batch: pa.Table, mind: bool) -> pa.Table:
    return mark_duplicates(batch, mind)


def _plan_write_task(batch: pa.Table, spec: PlanSpec, index_ref: Any, negatives: int, out: str) -> pa.Table:
    """One partition of the user shuffle (whole users): plan, tensorize and write every output's
    rows of its users and its quarantine rows. Returns one row: its counts (JSON)."""
    index: CatalogIndex = _fetch(index_ref)
    records, quarantine, counts = split_partition(batch)
    name = f"part-{partition_key(batch)}.parquet"  # a retried task rewrites the same files
    if quarantine.num_rows:
        pq.write_table(quarantine.cast(QUARANTINE_SCHEMA), Path(out) / layout.QUARANTINE / name)
    plan = plan_batch(records, spec, index)
    kinds = plan.column("kind")
    for kind in KINDS:
        rows = plan.filter(pc.equal(kinds, kind))
        if rows.num_rows == 0:
            continue
        schema = output_schema(kind, index.assembler.cfg, negatives, spec.targets)
        with pq.ParquetWriter(Path(out) / OUTPUTS[kind] / name, schema, **write_options(schema)) as w:
            for k in range(0, rows.num_rows, TENSORIZE_ROWS):
                w.write_table(tensorize(rows.slice(k, TENSORIZE_ROWS), kind, index, negatives, spec.targets))
    stats = plan.filter(pc.equal(kinds, "stats")).column("stats").to_pylist()
    assert len(stats) == 1
    return pa.table({"stats": [json.dumps({**json.loads(stats[0]), **counts})]})


# ---- driver ---------------------------------------------------------------------------------

def _ranges(src: Source, fmt: str, headed: bool, slots: int) -> tuple[list[Chunk] | list[RowGroups], int]:
    """(read ranges, estimated rows): enough ranges that every task slot parses, each within
    ROWS_PER_BLOCK rows (text: estimated from the first file's head; parquet: from the footers)."""
    lo, hi = ROWS_PER_BLOCK
    if fmt == "parquet":
        groups = split_row_groups(src, lo)  # fine-grained first: the footers give exact rows
        rows = sum(g.rows for g in groups)
        per_block = min(hi, max(lo, math.ceil(rows / (BLOCKS_PER_SLOT * slots))))
        return (split_row_groups(src, per_block) if per_block > lo else groups), rows
    rows = estimate_rows(src)
    per_block = min(hi, max(lo, math.ceil(rows / (BLOCKS_PER_SLOT * slots))))
    total = sum(f.size for f in src.files)
    chunks = split_lines(src, math.ceil(per_block * total / rows), headed)
    f = src.files[0]  # no bytes at all: one empty chunk, so the job still runs (and writes empty outputs)
    return (chunks or [Chunk(f.path, src.prefix + f.path, 0, 0, 1, 0)]), rows


def _parsed(src: Source, fmt: str, headed: bool, parse: Callable[..., pa.Table], kwargs: dict,
            slots: int, columns: list[str] | None = None) -> tuple[Any, int, int]:
    """(a Dataset of ``parse`` applied to the numbered rows of every file, estimated rows, read
    blocks). Parquet reads only ``columns`` (None: all). ``slots``: see prepare_slots.task_slots."""
    import ray.data

    from .numbered_rows import NumberedRows

    ranges, rows = _ranges(src, fmt, headed, slots)
    ds = ray.data.read_datasource(NumberedRows(src.filesystem, ranges, columns), override_num_blocks=len(ranges))
    return _map(ds, parse, **kwargs), rows, len(ranges)


def _map(ds: Any, fn: Callable[..., pa.Table], **kwargs: Any) -> Any:
    """``ds.map_batches(fn)`` on whole blocks as Arrow, with Ray Data's default resources, so each
    step fuses into the read or the shuffle before it (any ``num_cpus`` or ``concurrency`` of its
    own would make it an operator of its own, each block then making an extra trip through the
    object store, and the plan tasks waiting for CPUs the shuffle's reduce tasks hold)."""
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)


def _catalog_rows(items: Source, items_fmt: str, cspec: CatalogSpec, headers: dict, cfg: Config,
                  slots: int) -> pa.Table:
    """Parsed catalog rows (collected: the driver builds the index every task looks items up in).
    One chunk's worth is parsed here: the tokenizer is already loaded here (a worker would first
    import transformers: CPU-seconds)."""
    import ray

    kwargs: dict[str, Any] = dict(spec=cspec, headers=headers, model=cfg.model)
    fmt, headed = ("tsv" if items_fmt == "mind" else items_fmt), items_fmt in ("csv", "tsv")
    if fmt != "parquet":
        chunks, _ = _ranges(items, fmt, headed, slots)
        if len(chunks) == 1:
            # A text format's range is a Chunk (RowGroups are parquet's).
            table = read_chunk(items.filesystem, chunks[0])  # type: ignore[arg-type]
            return _parse_catalog_task(table, **kwargs).cast(CATALOG_SCHEMA)
    ds, _, _ = _parsed(items, fmt, headed, _parse_catalog_task, kwargs, slots)
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(CATALOG_SCHEMA) if tables else CATALOG_SCHEMA.empty_table()


def _partitions(rows: int, slots: int) -> int:
    """User partitions (plan tasks): within ROWS_PER_PARTITION rows each, at least one per task
    slot, and a whole number of waves of ``slots`` tasks when there are more (3 tasks on 2 slots
    leave one core idle through the last one)."""
    lo, hi = ROWS_PER_PARTITION
    most = math.ceil(rows / lo)
    n = max(1, min(max(slots, math.ceil(rows / hi)), most))
    waves = math.ceil(n / slots) * slots
    return waves if waves <= most else n


class _Steps:
    """The console's progress over the job's steps, and the seconds each took."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        events.progress(STEPS["catalog"], 0, len(STEPS), "steps")

    def lap(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.t0 - sum(self.seconds.values()), 3)
        following = list(STEPS)[len(self.seconds)] if len(self.seconds) < len(STEPS) else None
        if following:
            events.progress(STEPS[following], len(self.seconds), len(STEPS), "steps")


def _stage_catalog(cfg: Config, inp: Inputs, staging: Path, slots: int) -> Catalog:
    """2. catalog: parse + tokenize, dedupe on the driver; write items.parquet, its quarantine rows
    and the (empty) output folders into ``staging``."""
    tok = cached_tokenizer(cfg.model)
    catalog = build_catalog(_catalog_rows(inp.items, inp.items_fmt, inp.cspec, inp.item_headers, cfg, slots), tok)
    if len(catalog.index) == 0:
        raise ValueError(f"data.items: no valid item in {[f.uri for f in inp.items.files]} "
                         f"({catalog.quarantine.num_rows} rows quarantined: "
                         f"{dict(Counter(catalog.quarantine.column('reason').to_pylist()))})")
    pq.write_table(catalog.items, staging / layout.ITEMS)
    for name in (*OUTPUTS.values(), layout.QUARANTINE):
        (staging / name).mkdir()
    if catalog.quarantine.num_rows:
        pq.write_table(catalog.quarantine.cast(QUARANTINE_SCHEMA), staging / layout.QUARANTINE /
                       "part-catalog.parquet")
    return catalog


def _plan_and_write(cfg: Config, inp: Inputs, index_ref: Any, staging: Path,
                    slots: int) -> tuple[Counter, int, int]:
    """3-5, streamed from shuffle to shuffle: parse the interactions in their read tasks, mark
    duplicate impression ids, group by user, then plan + tensorize + write one partition per task.
    -> (the partitions' summed counts, partitions, read blocks)."""
    mind, lspec = inp.mind, inp.lspec
    parsed, est_rows, read_blocks = _parsed(inp.inter, inp.inter_fmt, not mind and inp.inter_fmt in ("csv", "tsv"),
                                            _parse_interactions_task,
                                            dict(mind=mind, spec=lspec, headers=inp.inter_headers, index_ref=index_ref),
                                            slots, columns=None if mind else list(lspec.required))  # type: ignore[union-attr]
    n_parts = _partitions(est_rows, slots)
    if mind or (lspec is not None and lspec.impression_col):  # a shuffle by impression id marks duplicates
        parsed = _map(_map(parsed, impression_route).repartition(n_parts, keys=[ROUTE]), _mark_duplicates_task,
                      mind=mind)
    out = _map(_map(parsed, user_route).repartition(n_parts, keys=[ROUTE]), _plan_write_task,
               spec=PlanSpec.from_config(cfg, mind), index_ref=index_ref, negatives=cfg.data.negatives,
               out=str(staging))
    stats: Counter = Counter()
    partitions = 0
    for s in out.iter_rows():  # one row per user partition, as it finishes
        stats.update(json.loads(s["stats"]))
        partitions += 1
        events.progress(STEPS["group_plan_write"], partitions, n_parts, "partitions")
    return stats, partitions, read_blocks


def _write_empty_outputs(cfg: Config, staging: Path) -> None:
    """An output no partition wrote to is still a readable dataset with the promised columns."""
    d = cfg.data
    for kind in KINDS:
        if not any((staging / OUTPUTS[kind]).glob("*.parquet")):
            pq.write_table(output_schema(kind, cfg.model, d.negatives, d.targets_per_example).empty_table(),
                           staging / OUTPUTS[kind] / "part-empty.parquet")
    if not any((staging / layout.QUARANTINE).glob("*.parquet")):
        pq.write_table(QUARANTINE_SCHEMA.empty_table(), staging / layout.QUARANTINE / "part-empty.parquet")


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Run the prepare job on ``cfg.ray``'s cluster; returns the report (also written to
    WORKDIR/data/prepare_report.json). Raises ``ValueError`` for inputs wrong as a whole."""
    import ray
    import ray.data

    inp = check_inputs(cfg)
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    one_machine, cpus = on_one_machine(), cluster_cpus()
    slots = task_slots(one_machine, cpus, machine_cores())
    with job_settings(ctx, data_settings(one_machine), slots if slots < cpus else None):
        report = _run_job(cfg, inp, ctx, slots)
    events.summary(summary_line(report))
    return report


def _run_job(cfg: Config, inp: Inputs, ctx: Any, slots: int) -> dict[str, Any]:
    """The job itself, staged in a temporary folder and published at the end -> its report."""
    import ray

    use_hash_shuffle(ctx)
    steps = _Steps()
    data_dir = cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        catalog = _stage_catalog(cfg, inp, staging, slots)
        index_ref = ray.put(catalog.index)
        steps.lap("catalog")
        stats, partitions, read_blocks = _plan_and_write(cfg, inp, index_ref, staging, slots)
        _write_empty_outputs(cfg, staging)
        steps.lap("group_plan_write")
        report = build_report(cfg, inp.fingerprint, inp.inter, inp.items, catalog, stats,
                              time.perf_counter() - steps.t0, PUBLISHED)
        report["stage_seconds"] = steps.seconds
        report["cluster_cpus"] = ray.cluster_resources().get("CPU")
        report["plan_partitions"] = partitions
        report["task_slots"] = slots
        report["read_blocks"] = read_blocks
        report["parsed_bytes"] = stats.get("input.bytes", 0)
        (staging / layout.REPORT).write_text(json.dumps(report, indent=2, sort_keys=True))
        for name in PUBLISHED:
            _replace(staging / name, data_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _replace(new: Path, old: Path) -> None:
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    os.replace(new, old)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.prepare --config ray_config.yaml [--result out.json] key=value ...``"""
    from embsum.stage import stage_main

    return stage_main("python -m train.prepare", __doc__, lambda cfg, a: run_prepare(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
