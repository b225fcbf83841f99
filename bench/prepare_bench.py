"""Benchmark: the Ray Data prepare job vs the same transforms in one process with pandas.

    python -m bench.prepare_bench            # >= 200k synthetic impressions (a few minutes)
    python -m bench.prepare_bench --quick    # 20k impressions, a smoke test

Both sides read the same synthetic MIND-format files (generated once by embsum/data/synth.py,
not timed) and run the same pure functions from embsum/data (parse, validate, plan, tensorize) to
the same parquet outputs; the baseline glues them with pandas/pyarrow in this process, the job with
Ray Data on a local cluster. Timed: from reading the inputs to the last parquet file written.
Both sides are timed warm: the baseline has the tokenizer loaded, and the Ray side runs on a cluster
that is already up (a small warm-up run starts its workers first; that run's time is recorded too).
Ray's workers run at the baseline's priority (``RAY_worker_niceness=0``; Ray's default is 15).
CPU seconds of every process are recorded too: unlike wall time they do not depend on what else
runs on a shared machine, and ``baseline CPU * cores / Ray CPU`` bounds the attainable speedup.

Prints examples/s for both and their ratio, and writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embsum.config import Config, load_config, replace
from embsum.data import layout
from embsum.data.catalog import build_catalog, cached_tokenizer
from embsum.data.examples import KINDS, PlanSpec, plan_batch
from embsum.data.records import (
    DUPLICATE_IMPRESSION,
    MIND_BEHAVIOR_COLUMNS,
    MIND_NEWS_COLUMNS,
    CatalogSpec,
    LogSpec,
    parse_behaviors,
    parse_catalog,
    parse_logs,
    preflight,
)
from embsum.data.sources import EXPLODED_SCHEMA, explode_file
from embsum.data.tensorize import output_schema, tensorize, write_options
from train.prepare import OUTPUTS, TENSORIZE_ROWS, resolve_inputs, run_prepare

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "prepare.json"


def _exploded(src: Any, fmt: str, headed: bool) -> pa.Table:
    parts = []
    for f in src.files:
        with src.filesystem.open_input_stream(f.path) as fh:
            s, n, r = explode_file(f.uri, fh.read(), fmt, headed)
        parts.append(pa.table({"source": s, "line": pa.array(n, pa.int64()), "raw": pa.array(r, pa.binary())},
                              schema=EXPLODED_SCHEMA))
    return pa.concat_tables(parts)


class TreeCpu:
    """CPU seconds used by this process and every process below it (a local Ray cluster and its
    workers descend from the driver that started it) between ``start()`` and ``stop()``. Sampled
    every 0.2 s, so processes that exit in between (shuffle aggregators) are counted too."""

    def __init__(self) -> None:
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                key, t = (p.pid, p.create_time()), p.cpu_times()
            except psutil.Error:
                continue
            self.first.setdefault(key, t.user + t.system)
            self.last[key] = t.user + t.system

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def start(self) -> TreeCpu:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(self.last[k] - self.first[k] for k in self.last)


def run_baseline(cfg: Config) -> dict[str, Any]:
    """The prepare transforms in this process: pyarrow/pandas glue, one core. -> counts + seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    d = cfg.data
    mind, inter, inter_fmt, items, items_fmt = resolve_inputs(cfg)
    cspec = CatalogSpec.from_config(d, items_fmt)
    lspec = None if mind else LogSpec.from_config(d, inter_fmt)
    item_headers = preflight(items, items_fmt, cspec.required, "data.items",
                             MIND_NEWS_COLUMNS if items_fmt == "mind" else None)
    inter_headers = preflight(inter, "mind", (), "data.interactions", MIND_BEHAVIOR_COLUMNS) if mind else \
        preflight(inter, inter_fmt, lspec.required, "data.interactions")  # type: ignore[union-attr]
    out = cfg.data_dir
    for name in (layout.ITEMS, layout.QUARANTINE, *OUTPUTS.values()):  # not synthetic/: it is the input
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tok = cached_tokenizer(cfg.model)
    catalog = build_catalog(parse_catalog(_exploded(items, "tsv" if items_fmt == "mind" else items_fmt,
                                                    items_fmt in ("csv", "tsv")), cspec, item_headers, tok), tok)
    pq.write_table(catalog.items, out / layout.ITEMS)
    lines = _exploded(inter, inter_fmt, not mind and inter_fmt in ("csv", "tsv"))
    chunks = [lines.slice(k, 20_000) for k in range(0, lines.num_rows, 20_000)]
    parsed = pa.concat_tables([parse_behaviors(c, catalog.index.position) if mind else
                               parse_logs(c, lspec, inter_headers, catalog.index.position,  # type: ignore[arg-type]
                                          keep_raw=bool(d.impression_col)) for c in chunks])
    small = parsed.select(["source", "line", "reason", "user_id", "impression_id"]).to_pandas()
    ok = small[(small.reason == "") & (small.impression_id != "")].sort_values(["source", "line"])
    if mind:
        dup = ok.impression_id.duplicated()
    else:
        dup = ok.user_id != ok.groupby("impression_id").user_id.transform("first")
    reasons = small.reason[small.reason != ""].value_counts().to_dict()
    reasons[DUPLICATE_IMPRESSION] = int(dup.sum())
    keep = pa.array(~small.index.isin(ok.index[dup.to_numpy()]), pa.bool_())
    good = parsed.filter(pc.and_(keep, pc.equal(parsed.column("reason"), "")))
    plan = plan_batch(good, PlanSpec.from_config(cfg, mind), catalog.index)
    counts: Counter = Counter(plan.column("kind").to_pylist())
    for kind in KINDS:  # as the job's plan tasks write: row groups of TENSORIZE_ROWS, the same options
        rows = plan.filter(pc.equal(plan.column("kind"), kind))
        (out / OUTPUTS[kind]).mkdir()
        schema = output_schema(kind, cfg.model, d.negatives, d.targets_per_example)
        with pq.ParquetWriter(out / OUTPUTS[kind] / "part-0.parquet", schema, **write_options(schema)) as w:
            for k in range(0, rows.num_rows, TENSORIZE_ROWS):
                w.write_table(tensorize(rows.slice(k, TENSORIZE_ROWS), kind, catalog.index, d.negatives,
                                        d.targets_per_example))
    q = parsed.filter(pc.not_equal(parsed.column("reason"), "")).select(["source", "line", "reason", "raw"])
    (out / layout.QUARANTINE).mkdir()
    pq.write_table(pa.concat_tables([q, catalog.quarantine]), out / layout.QUARANTINE / "part-0.parquet")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - c0, 3),
            "rows_in": parsed.num_rows, "quarantined": sum(reasons.values()),
            "examples": counts["train"] + counts["valid_examples"], "counts": dict(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k impressions: a smoke test, not a measurement")
    ap.add_argument("--impressions", type=int, default=None, help="override the set size")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "embsum-prepare-bench"),
                    help="scratch space (the generated set is reused across runs)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    n_imp = args.impressions or (20_000 if args.quick else 200_000)
    base = load_config(REPO / "ray_config.yaml", [
        "data.format=synthetic", f"data.synth_impressions={n_imp}", f"data.synth_users={max(100, n_imp // 4)}",
        f"data.synth_items={max(100, n_imp // 40)}"])
    work = Path(args.workdir)
    cfg_ray = replace(base, "workdir", str(work / "ray"))
    cfg_pd = replace(base, "workdir", str(work / "pandas"))
    # Both read one generated set: the pandas side's synthetic folder is the Ray side's.
    from embsum.data import synth

    d = base.data
    beh, news = synth.ensure(work / "synthetic", d.synth_users, d.synth_items, d.synth_impressions, d.seed)
    for c in (cfg_ray, cfg_pd):
        syn = c.data_dir / "synthetic"
        syn.mkdir(parents=True, exist_ok=True)
        for f in (beh, news, beh.parent / synth.PARAMS_FILE):
            if not (syn / f.name).exists():
                os.link(f, syn / f.name)

    cached_tokenizer(cfg_pd.model)  # loaded before timing, as the Ray side's warm workers have it
    load_start = os.getloadavg()[0]
    print(f"baseline (one process, pandas/pyarrow): {n_imp:,} impressions ...", flush=True)
    pd_res = run_baseline(cfg_pd)
    print(f"  {pd_res['examples']:,} examples in {pd_res['seconds']:.1f} s", flush=True)

    import ray

    from embsum.runtime import init_ray

    # Ray starts its workers at niceness 15 (the driver and the baseline run at 0): on a machine
    # shared with other jobs that hands the workers only the leftovers. Equal priority for a fair race.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(cfg_ray.ray)
    try:
        # The warm-up is large enough to use as many shuffle partitions as the measured run.
        warm = replace(replace(cfg_ray, "workdir", str(work / "warmup")), "data.synth_impressions",
                       min(n_imp, max(n_imp // 10, 20_000)))
        t = time.perf_counter()
        run_prepare(warm)
        cold_s = time.perf_counter() - t
        meter = TreeCpu().start()
        ray_rep = run_prepare(cfg_ray)
        ray_cpu = meter.stop()
    finally:
        ray.shutdown()
    ray_s, n = ray_rep["seconds"], ray_rep["examples"]["train"] + ray_rep["examples"]["valid_examples"]
    if n != pd_res["examples"]:
        raise AssertionError(f"Ray wrote {n} examples, the baseline {pd_res['examples']}: the two disagree")
    result = {
        "impressions": n_imp, "examples": n, "quick": args.quick,
        "pandas_seconds": pd_res["seconds"], "ray_seconds": ray_s,
        "pandas_examples_per_s": round(n / pd_res["seconds"], 1), "ray_examples_per_s": round(n / ray_s, 1),
        "speedup": round(pd_res["seconds"] / ray_s, 3),
        # CPU seconds spent (all processes): independent of other load on a shared machine. On an idle
        # machine with C cores the job's wall time cannot beat ray_cpu / C: this bounds the speedup.
        "pandas_cpu_seconds": pd_res["cpu_seconds"], "ray_cpu_seconds": round(ray_cpu, 3),
        "cpu_overhead_ratio": round(ray_cpu / pd_res["cpu_seconds"], 3),
        "speedup_bound_on_this_machine": round(pd_res["cpu_seconds"] * (os.cpu_count() or 1) / ray_cpu, 3),
        "loadavg_1m_at_start": load_start,
        "ray_stage_seconds": ray_rep.get("stage_seconds"), "ray_warmup_run_seconds": round(cold_s, 1),
        "ray_cluster_cpus": ray_rep.get("cluster_cpus"),
        "ray_worker_niceness": os.environ.get("RAY_worker_niceness"),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), "ray": ray.__version__, "pandas": pd.__version__,
                    "pyarrow": pa.__version__},
        "model_shapes": {k: getattr(base.model, k) for k in ("num_sessions", "items_per_session", "session_tokens",
                                                             "content_tokens")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"prepare bench: {n:,} examples from {n_imp:,} impressions | pandas {result['pandas_examples_per_s']:,} "
          f"ex/s ({pd_res['seconds']:.1f} s) | Ray Data {result['ray_examples_per_s']:,} ex/s ({ray_s:.1f} s) | "
          f"ratio {result['speedup']:.2f}x (target >= 1.5x on 2 cores) | CPU seconds pandas {pd_res['cpu_seconds']:.1f}"
          f" vs Ray {ray_cpu:.1f} (bound {result['speedup_bound_on_this_machine']:.2f}x on {os.cpu_count()} cores) | "
          f"load {load_start:.1f} -> {os.getloadavg()[0]:.1f} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
