"""Benchmark: the Ray Data prepare job at several sizes, against the same transforms in one process.

    python -m bench.prepare_bench                        # 200k, 800k and 3.2M synthetic impressions
    python -m bench.prepare_bench --sizes 200000         # one size
    python -m bench.prepare_bench --quick                # 20k impressions, a smoke test

Per size (synthetic MIND-format data: users n/4, items n/40; generated once, not timed) each side
runs in its own fresh process, measured from here, the baseline first and the Ray job right after
it (an A/B pair on the same machine state):
- the baseline: the same pure functions from embsum/data (parse, validate, plan, tensorize) to the
  same parquet outputs, glued with pandas/pyarrow in one process;
- the Ray job: ``run_prepare`` on a local Ray cluster started by that process, warm (a smaller
  warm-up run starts its workers first, its time is recorded too), workers at the baseline's
  priority (``RAY_worker_niceness=0``; Ray's default is 15).
Recorded per side: wall seconds, examples/s, CPU-seconds of its whole process tree (unlike wall
time, independent of other load on a shared machine), peak RSS of the driver process itself
(getrusage; for the Ray job over the measured run, the warm-up's peak reset) and summed over
its whole tree (harness.TreeMemory: the local Ray cluster and every worker descend from it), and
for the Ray job the object-store peak of each node
(harness.ObjectStoreMeter) and what was spilled.

Derived: the Ray / pandas ratio of examples/s at each size (target >= 1.5x at 200k on 2 cores),
and the per-row cost (Ray wall seconds per impression) at each size against the smallest (target:
within 1.3x at 3.2M: cost grows linearly with data).

Writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import harness
from embsum.config import Config, load_config, replace
from embsum.data import layout
from embsum.data.catalog import build_catalog, cached_tokenizer
from embsum.data.examples import KINDS, PlanSpec, plan_batch
from embsum.data.records import (
    DUPLICATE_IMPRESSION,
    parse_behaviors,
    parse_catalog,
    parse_logs,
)
from embsum.data.sources import EXPLODED_SCHEMA, explode_file
from embsum.data.tensorize import output_schema, tensorize, write_options
from train.prepare import OUTPUTS, TENSORIZE_ROWS, run_prepare
from train.prepare_inputs import check_inputs

REPO = Path(__file__).resolve().parents[1]
SIZES = (200_000, 800_000, 3_200_000)
PER_ROW_TARGET = 1.3  # seconds per impression at the largest size / at the smallest
RATIO_TARGET = 1.5  # Ray Data examples/s / pandas examples/s at the smallest size
BASELINE_PLAN_ROWS = 50_000  # records of whole users planned at a time by the baseline


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
    every 0.2 s, so processes that exit in between (shuffle workers) are counted too."""

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
    inp = check_inputs(cfg)  # the prepare job's own preflight (the fingerprint is file metadata only)
    mind, inter, inter_fmt, items, items_fmt = inp.mind, inp.inter, inp.inter_fmt, inp.items, inp.items_fmt
    cspec, lspec, item_headers, inter_headers = inp.cspec, inp.lspec, inp.item_headers, inp.inter_headers
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
    del lines, chunks
    small = parsed.select(["source", "line", "reason", "user_id", "impression_id"]).to_pandas()
    ok = small[(small.reason == "") & (small.impression_id != "")].sort_values(["source", "line"])
    if mind:
        dup = ok.impression_id.duplicated()
    else:
        dup = ok.user_id != ok.groupby("impression_id").user_id.transform("first")
    reasons = small.reason[small.reason != ""].value_counts().to_dict()
    reasons[DUPLICATE_IMPRESSION] = int(dup.sum())
    keep = pa.array(~small.index.isin(ok.index[dup.to_numpy()]), pa.bool_())
    good = parsed.filter(pc.and_(keep, pc.equal(parsed.column("reason"), ""))).sort_by("user_id")
    spec, counts, writers = PlanSpec.from_config(cfg, mind), Counter(), {}
    for kind in KINDS:  # as the job's plan tasks write: row groups of TENSORIZE_ROWS, the same options
        (out / OUTPUTS[kind]).mkdir()
        schema = output_schema(kind, cfg.model, d.negatives, d.targets_per_example)
        writers[kind] = pq.ParquetWriter(out / OUTPUTS[kind] / "part-0.parquet", schema, **write_options(schema))
    for start, stop in _user_slices(good.column("user_id"), BASELINE_PLAN_ROWS):
        # Whole users at a time: one plan of every user at once would hold every plan row as Python
        # objects (tens of GB at 3.2M impressions); slices keep the baseline's memory at its input.
        plan = plan_batch(good.slice(start, stop - start), spec, catalog.index)
        kinds = plan.column("kind")
        counts.update(kinds.to_pylist())
        for kind in KINDS:
            rows = plan.filter(pc.equal(kinds, kind))
            for k in range(0, rows.num_rows, TENSORIZE_ROWS):
                writers[kind].write_table(tensorize(rows.slice(k, TENSORIZE_ROWS), kind, catalog.index, d.negatives,
                                                    d.targets_per_example))
    for w in writers.values():
        w.close()
    q = parsed.filter(pc.not_equal(parsed.column("reason"), "")).select(["source", "line", "reason", "raw"])
    (out / layout.QUARANTINE).mkdir()
    pq.write_table(pa.concat_tables([q, catalog.quarantine]), out / layout.QUARANTINE / "part-0.parquet")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - c0, 3),
            "rows_in": parsed.num_rows, "quarantined": sum(reasons.values()),
            "examples": counts["train"] + counts["valid_examples"], "counts": dict(counts)}


def _user_slices(users: pa.ChunkedArray, rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of about ``rows`` rows of a column sorted by user, cut between users."""
    import numpy as np

    codes = np.asarray(pc.dictionary_encode(users.combine_chunks()).indices, dtype=np.int64)
    starts = np.flatnonzero(np.diff(codes)) + 1  # where a new user begins
    cuts, last = [0], 0
    for s in starts:
        if s - last >= rows:
            cuts.append(int(s))
            last = int(s)
    return list(zip(cuts, [*cuts[1:], len(codes)], strict=True)) if len(codes) else []


# ---- one side, in its own process ---------------------------------------------------------------------------

def _config(n_imp: int, workdir: Path) -> Config:
    return load_config(REPO / "ray_config.yaml", [
        "data.format=synthetic", f"data.synth_impressions={n_imp}", f"data.synth_users={max(100, n_imp // 4)}",
        f"data.synth_items={max(100, n_imp // 40)}", f"workdir={workdir}"])


def _driver_peak_mb() -> float:
    """This process's peak RSS since it started or since ``_reset_driver_peak``: the mm's high-water
    mark (VmHWM), which the reset clears. Not getrusage's ru_maxrss: that also keeps the peak
    recorded when any of the process's threads exited (Ray's driver starts and ends threads), so
    it outlives the reset (measured: 3,131 MB from before the reset, ~945 MB RSS after it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _reset_driver_peak() -> bool:
    """Start this process's peak RSS afresh from its current RSS (Linux >= 4.0: ``5`` to
    /proc/self/clear_refs resets VmHWM), so the measured run's peak is not the warm-up's. False
    where the reset is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def side_pandas(n_imp: int, work: Path) -> dict[str, Any]:
    cfg = _config(n_imp, work / "pandas")
    cached_tokenizer(cfg.model)  # loaded before timing, as the Ray side's warm workers have it
    res = run_baseline(cfg)
    return {**res, "examples_per_s": round(res["examples"] / res["seconds"], 1),
            "driver_peak_rss_mb": _driver_peak_mb()}


def side_ray(n_imp: int, work: Path) -> dict[str, Any]:
    import ray

    from embsum.runtime import init_ray

    cfg = _config(n_imp, work / "ray")
    init_ray(cfg.ray)
    try:
        warm = replace(replace(cfg, "workdir", str(work / "warmup")), "data.synth_impressions", _warm_size(n_imp))
        t = time.perf_counter()
        run_prepare(warm)  # its synthetic set was generated by the parent, as the measured run's
        warm_s = time.perf_counter() - t
        for out in (work / "warmup" / "data").iterdir():
            if out.name != "synthetic":
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        warmup_peak_mb = _driver_peak_mb()
        peak_reset = _reset_driver_peak()
        cpu, store = TreeCpu().start(), harness.ObjectStoreMeter().start()
        rep = run_prepare(cfg)
        ray_cpu, stores = cpu.stop(), store.stop()
        cpus = ray.cluster_resources().get("CPU")
    finally:
        ray.shutdown()
    n = rep["examples"]["train"] + rep["examples"]["valid_examples"]
    return {"seconds": rep["seconds"], "cpu_seconds": round(ray_cpu, 3), "examples": n,
            "examples_per_s": round(n / rep["seconds"], 1), "rows_in": rep["rows_in"],
            "quarantined": rep["quarantined"], "stage_seconds": rep.get("stage_seconds"),
            "plan_partitions": rep.get("plan_partitions"), "task_slots": rep.get("task_slots"), "cluster_cpus": cpus,
            "warmup_seconds": round(warm_s, 1), "driver_peak_rss_mb": _driver_peak_mb(),
            "driver_peak_rss_mb_through_warmup": warmup_peak_mb, "driver_peak_reset_after_warmup": peak_reset,
            "object_store": stores,
            "object_store_peak_mb": max((s["peak_used_mb"] for s in stores.values()), default=0.0),
            "object_store_spilled_mb": sum(s["spilled_mb"] for s in stores.values())}


def _run_side(side: str, n_imp: int, work: Path) -> dict[str, Any]:
    """Run one side as a child process (fresh interpreter); its tree's memory is sampled from here."""
    out = work / f"{side}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "RAY_worker_niceness": "0", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.prepare_bench", "--side", side, "--impressions", str(n_imp),
           "--workdir", str(work), "--out", str(out)]
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    mem = harness.TreeMemory(proc.pid).start()
    rc = proc.wait()
    tree = mem.stop()
    if rc != 0 or not out.exists():
        return {"error": f"{side} side exited with {rc}", "tree_memory": tree, "loadavg_1m_at_start": load}
    res = json.loads(out.read_text())
    return {**res, "tree_peak_rss_mb": tree["peak_rss_mb"], "tree_peak_pss_mb": tree["peak_pss_mb"],
            "tree_peak_single_process_rss_mb": tree["peak_single_process_rss_mb"],
            "tree_max_processes": tree["max_processes"], "loadavg_1m_at_start": load}


def _warm_size(n_imp: int) -> int:
    """Impressions of the Ray side's warm-up run (same users and items as the measured run's)."""
    return min(n_imp, max(n_imp // 10, 20_000))


def _ensure_data(n_imp: int, work: Path) -> None:
    """Generate the synthetic sets once, here: the measured one (both sides, and reruns, read the
    same files via hard links) and the Ray side's warm-up one (so no side generates data in its
    own process, where it would count in the side's memory)."""
    from embsum.data import synth

    d = _config(n_imp, work / "shared").data
    for name, size, sides in (("synthetic", n_imp, ("ray", "pandas")), ("synthetic-warmup", _warm_size(n_imp),
                                                                         ("warmup",))):
        beh, news = synth.ensure(work / name, d.synth_users, d.synth_items, size, d.seed)
        for side in sides:
            syn = work / side / "data" / "synthetic"
            syn.mkdir(parents=True, exist_ok=True)
            for f in (beh, news, beh.parent / synth.PARAMS_FILE):
                if not (syn / f.name).exists():
                    os.link(f, syn / f.name)


def measure(sizes: list[int], repeats: int, work_root: Path, pandas_max: int) -> list[dict[str, Any]]:
    out = []
    for n_imp in sizes:
        work = work_root / f"n{n_imp}"
        _ensure_data(n_imp, work)
        runs = []
        for r in range(repeats):
            print(f"[prepare bench] {n_imp:,} impressions, run {r + 1}/{repeats}: pandas baseline ...", flush=True)
            pd_res = _run_side("pandas", n_imp, work) if n_imp <= pandas_max else \
                {"error": f"not run: above --pandas-max {pandas_max:,}"}
            print(f"[prepare bench] {n_imp:,} impressions, run {r + 1}/{repeats}: Ray Data job ...", flush=True)
            ray_res = _run_side("ray", n_imp, work)
            if "examples" in pd_res and "examples" in ray_res and pd_res["examples"] != ray_res["examples"]:
                raise AssertionError(f"at {n_imp:,}: Ray wrote {ray_res['examples']} examples, the baseline "
                                     f"{pd_res['examples']}: the two disagree")
            runs.append({"pandas": pd_res, "ray": ray_res})
            _print_run(n_imp, pd_res, ray_res)
        out.append({"impressions": n_imp, "runs": runs})
    return out


def _print_run(n_imp: int, pd_res: dict[str, Any], ray_res: dict[str, Any]) -> None:
    def side(name: str, r: dict[str, Any]) -> str:
        if "error" in r:
            return f"{name}: {r['error']}"
        extra = f", object store peak {r['object_store_peak_mb']:,.0f} MB" if "object_store_peak_mb" in r else ""
        return (f"{name} {r['examples_per_s']:,.0f} ex/s ({r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU-s, driver "
                f"{r['driver_peak_rss_mb']:,.0f} MB, tree {r['tree_peak_rss_mb']:,.0f} MB{extra})")

    ratio = ""
    if "examples_per_s" in pd_res and "examples_per_s" in ray_res:
        ratio = f" | ratio {ray_res['examples_per_s'] / pd_res['examples_per_s']:.2f}x"
    print(f"prepare bench: {n_imp:,} impressions | {side('pandas', pd_res)} | {side('Ray Data', ray_res)}{ratio}",
          flush=True)


def summarize_sizes(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per size, the Ray/pandas ratio per size and the per-row cost against the smallest size."""
    import statistics

    def med(runs: list[dict[str, Any]], side: str, key: str) -> float | None:
        vals = [r[side][key] for r in runs if isinstance(r[side].get(key), (int, float))]
        return statistics.median(vals) if vals else None

    rows = []
    for s in sizes:
        runs, n = s["runs"], s["impressions"]
        row: dict[str, Any] = {"impressions": n}
        for side in ("ray", "pandas"):
            for key in ("seconds", "examples_per_s", "cpu_seconds", "driver_peak_rss_mb", "tree_peak_rss_mb",
                        "object_store_peak_mb", "object_store_spilled_mb"):
                v = med(runs, side, key)
                if v is not None:
                    row[f"{side}_{key}"] = v
        if row.get("ray_seconds"):
            row["ray_us_per_impression"] = round(row["ray_seconds"] / n * 1e6, 2)
        if row.get("ray_examples_per_s") and row.get("pandas_examples_per_s"):
            row["ratio"] = round(row["ray_examples_per_s"] / row["pandas_examples_per_s"], 3)
        rows.append(row)
    base = next((r for r in rows if r.get("ray_us_per_impression")), None)
    for r in rows:
        if base and r.get("ray_us_per_impression"):
            r["per_row_cost_vs_smallest"] = round(r["ray_us_per_impression"] / base["ray_us_per_impression"], 3)
    return {"table": rows, "per_row_target": PER_ROW_TARGET, "ratio_target": RATIO_TARGET}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k impressions: a smoke test, not a measurement")
    ap.add_argument("--sizes", default=None, help="comma-separated impression counts (default 200k,800k,3.2M)")
    ap.add_argument("--impressions", type=int, default=None, help="one size (as --sizes N)")
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs per size")
    ap.add_argument("--pandas-max", type=int, default=3_200_000,
                    help="largest size the one-process baseline is run at (it holds everything in memory)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "embsum-prepare-bench"),
                    help="scratch space (the generated sets are reused across runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", choices=("ray", "pandas"), help=argparse.SUPPRESS)  # internal: one side, one process
    args = ap.parse_args(argv)
    if args.side:
        harness.setup()
        n_imp = args.impressions
        res = side_ray(n_imp, Path(args.workdir)) if args.side == "ray" else side_pandas(n_imp, Path(args.workdir))
        Path(args.out).write_text(json.dumps(res, indent=2))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else \
        [args.impressions] if args.impressions else [20_000] if args.quick else list(SIZES)
    harness.setup()
    load_start = os.getloadavg()[0]
    per_size = measure(sizes, args.repeats, Path(args.workdir), args.pandas_max)
    summary = summarize_sizes(per_size)
    result = {"sizes": per_size, **summary, "quick": args.quick, "loadavg_1m_at_start": load_start,
              "loadavg_1m_at_end": os.getloadavg()[0], "machine": harness.machine()}
    path = harness.write_result("prepare", result, args.out, quick=args.quick)
    print(render_table(summary["table"]), flush=True)
    print(f"prepare bench: sizes {sizes} -> {path}", flush=True)
    return 0


def render_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str = ",.0f") -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    lines = ["| impressions | Ray wall s | Ray ex/s | pandas ex/s | ratio | us/impression (vs smallest) | "
             "driver peak RSS MB | tree peak RSS MB | object store peak MB (spilled) | pandas peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['impressions']:,} | {f(r.get('ray_seconds'), '.1f')} | {f(r.get('ray_examples_per_s'))} | "
            f"{f(r.get('pandas_examples_per_s'))} | {f(r.get('ratio'), '.2f')}x | "
            f"{f(r.get('ray_us_per_impression'), '.1f')} ({f(r.get('per_row_cost_vs_smallest'), '.2f')}x) | "
            f"{f(r.get('ray_driver_peak_rss_mb'))} | {f(r.get('ray_tree_peak_rss_mb'))} | "
            f"{f(r.get('ray_object_store_peak_mb'))} ({f(r.get('ray_object_store_spilled_mb'))}) | "
            f"{f(r.get('pandas_tree_peak_rss_mb'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
