"""The benchmark runner: runs the benchmark scripts, reads their JSON results, prints one table.

    python -m bench all [--quick]            # prepare, train, embed, serve, fleet, quality
    python -m bench train [--quick]          # one benchmark (prepare|train|embed|serve|fleet|quality)
    python -m bench table [--quick]          # rebuild the table from the results already written
    python -m bench all --reuse quality         # run the others, take these from earlier results

Each script runs as a subprocess (its output goes to bench/results/logs/), so the peak memory of
its whole process tree can be measured from here: the script, the local Ray cluster it starts
(GCS, raylet, agents) and every Ray worker and actor, all of which descend from it (see
``harness.TreeMemory``: psutil children of the subprocess, their RSS sampled every 0.5 s and their
PSS at each new peak of the summed RSS and every 5 s; summed RSS and summed PSS, which does not
double-count shared memory such as Ray's object store).

Every figure is a ratio against its side-by-side reference measured in the same run, oriented so
that > 1 means better than the reference (value / reference for throughputs and quality, reference
/ value for latencies), with the median over repeats (mean over seeds for quality) and their spread. Writes
bench/results/summary.json and summary.md (quick passes: bench/results/quick/) and logs everything to the
MLflow experiment ``benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import harness

# name -> (module, runs per invocation (full, quick)); the scripts repeat inside (seeds for quality,
# sizes for prepare).
BENCHMARKS: dict[str, tuple[str, tuple[int, int]]] = {
    "prepare": ("bench.prepare_bench", (1, 1)),  # three sizes per run: 200k, 800k, 3.2M
    "train": ("bench.train_bench", (1, 1)),
    "embed": ("bench.embed_bench", (1, 1)),
    "serve": ("bench.serve_bench", (1, 1)),
    "fleet": ("bench.fleet_bench", (1, 1)),
    "quality": ("bench.quality", (1, 1)),
}
SUMMARY_LINE = re.compile(r"^(\[bench\]|\[train bench\]|\[embed bench\]|\[fleet bench\]|(prepare|train|embed|"
                          r"serve|fleet|quality) bench:|score\(\) over|targets:|error)")


@dataclass
class Figure:
    bench: str
    name: str
    unit: str
    values: list[float]  # per repeat
    references: list[float]  # per repeat, measured side by side with values
    ref_name: str
    higher_is_better: bool = True
    target: float | None = None  # on the ratio (oriented: > 1 = better), on value - reference if delta, on value
    target_kind: str = "ratio>="  # 'ratio>=' | 'ratio>' | 'delta<=' | 'value<=' | 'value>='
    spread_kind: str = "half-range"  # how the spread is computed: 'half-range' of ratios, or 'std' of values
    note: str = ""
    ratio: float | None = field(default=None, init=False)
    value: float | None = field(default=None, init=False)
    reference: float | None = field(default=None, init=False)
    spread: float | None = field(default=None, init=False)
    met: bool | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        vals = [v for v in self.values if _finite(v)]
        refs = [r for r in self.references if _finite(r)]
        self.value = statistics.median(vals) if vals else None
        self.reference = statistics.median(refs) if refs else None
        ratios = [self._orient(v, r) for v, r in zip(self.values, self.references, strict=False)
                  if _finite(v) and _finite(r) and v and r]
        ratios = [x for x in ratios if x is not None]
        self.ratio = statistics.median(ratios) if ratios else None
        if self.spread_kind == "std" and vals and refs:
            # Seeds (quality): mean over seeds, as bench/quality.md reports, and the ratio of the means,
            # so value, reference and ratio always tell the same story.
            self.value, self.reference = statistics.fmean(vals), statistics.fmean(refs)
            self.ratio = self._orient(self.value, self.reference) if self.value and self.reference else None
        if self.spread_kind == "std":
            self.spread = statistics.stdev(vals) if len(vals) > 1 else None
        elif len(ratios) > 1 and self.ratio:
            self.spread = (max(ratios) - min(ratios)) / 2 / self.ratio
        if self.target is not None:
            if self.target_kind == "value<=" and self.value is not None:
                self.met = self.value <= self.target
            elif self.target_kind == "value>=" and self.value is not None:
                self.met = self.value >= self.target
            elif self.target_kind == "delta<=" and self.value is not None and self.reference is not None:
                self.met = self.value - self.reference <= self.target
            elif self.target_kind == "ratio>" and self.ratio is not None:
                self.met = self.ratio > self.target
            elif self.ratio is not None:
                self.met = self.ratio >= self.target

    def _orient(self, v: float, r: float) -> float | None:
        return v / r if self.higher_is_better else r / v

    @property
    def repeats(self) -> int:
        return sum(1 for v in self.values if _finite(v))

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target_kind == "delta<=":
            return f"<= +{self.target:g} {self.unit} over ref"
        if self.target_kind in ("value<=", "value>="):
            return f"{self.target_kind[-2:]} {self.target:g}{'' if self.unit == 'x' else ' '}{self.unit}"
        return f"{'>' if self.target_kind == 'ratio>' else '>='} {self.target:g}x"

    def spread_text(self) -> str:
        if self.spread is None:
            return "n/a (1 run)" if self.repeats <= 1 else "n/a"
        if self.spread_kind == "std":
            return f"std {self.spread:.4f}"
        return f"±{self.spread:.1%}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if unit == "x":  # a ratio
        return f"{x:.2f}x"
    if unit in ("AUC", "nDCG@10", "MRR"):
        return f"{x:.4f}"
    mag = abs(x)
    s = f"{x:,.0f}" if mag >= 100 else f"{x:.1f}" if mag >= 10 else f"{x:.2f}" if mag >= 0.1 else f"{x:.3f}"
    return f"{s} {unit}" if unit else s


# ---- figures from each benchmark's JSON ------------------------------------------------------------------
def prepare_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    if "sizes" not in runs[0]:  # a result from before the scaling table: one size per run
        return [
            Figure("prepare", f"examples/s, Ray Data prepare job ({runs[0]['impressions']:,} synthetic impressions)",
                   "ex/s", [r["ray_examples_per_s"] for r in runs], [r["pandas_examples_per_s"] for r in runs],
                   "same transforms, 1 process, pandas", target=1.5),
            Figure("prepare", "CPU-seconds, Ray Data job vs pandas (lower is better)", "CPU-s",
                   [r["ray_cpu_seconds"] for r in runs], [r["pandas_cpu_seconds"] for r in runs], "pandas",
                   higher_is_better=False),
        ]
    by_size: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for size in run["sizes"]:
            by_size.setdefault(size["impressions"], []).extend(size["runs"])
    sizes = sorted(by_size)

    def pairs(n: int, key: str) -> tuple[list[float], list[float]]:
        both = [(r["ray"].get(key), r["pandas"].get(key)) for r in by_size[n]]
        return [a if _finite(a) else math.nan for a, _ in both], [b if _finite(b) else math.nan for _, b in both]

    def ray(n: int, key: str) -> list[float]:
        return [r["ray"][key] for r in by_size[n] if _finite(r["ray"].get(key))]

    target = runs[0].get("ratio_target", 1.5)
    figs = []
    for n in sizes:
        figs.append(Figure("prepare", f"examples/s, Ray Data prepare job ({n:,} synthetic impressions)", "ex/s",
                           *pairs(n, "examples_per_s"), "same transforms, 1 process, pandas",
                           target=target if n == sizes[0] else None))
    for n in sizes:
        figs.append(Figure("prepare", f"CPU-seconds, Ray Data job vs pandas ({n:,} impressions; lower is better)",
                           "CPU-s", *pairs(n, "cpu_seconds"), "pandas", higher_is_better=False))
    lo, hi = sizes[0], sizes[-1]
    if hi != lo and ray(lo, "seconds") and ray(hi, "seconds"):
        per_row = [s / hi * 1e6 for s in ray(hi, "seconds")]
        base = statistics.median(s / lo * 1e6 for s in ray(lo, "seconds"))
        figs.append(Figure("prepare", f"per-impression cost of the Ray Data job at {hi:,} vs at {lo:,} "
                           f"(lower is better; within {runs[0].get('per_row_target', 1.3):g}x)", "us/impression",
                           per_row, [base] * len(per_row), f"{lo:,} impressions", higher_is_better=False,
                           target=1 / runs[0].get("per_row_target", 1.3)))
    if hi != lo and ray(lo, "cpu_seconds") and ray(hi, "cpu_seconds"):
        # The same in CPU-seconds of the job's whole process tree: what wall time would be on a machine
        # of its own (wall time on a shared one also measures everyone else's load).
        per_row = [s / hi * 1e6 for s in ray(hi, "cpu_seconds")]
        base = statistics.median(s / lo * 1e6 for s in ray(lo, "cpu_seconds"))
        figs.append(Figure("prepare", f"per-impression CPU cost of the Ray Data job at {hi:,} vs at {lo:,} "
                           "(lower is better)", "CPU-us/impression", per_row, [base] * len(per_row),
                           f"{lo:,} impressions", higher_is_better=False))
    for n in sizes:
        driver = ray(n, "driver_peak_rss_mb")
        if driver:
            figs.append(Figure("prepare", f"driver peak RSS, Ray Data prepare job ({n:,} impressions)", "MB", driver,
                               [1024.0] * len(driver), "1 GB budget", higher_is_better=False,
                               target=1.0 if n == hi else None,
                               note=f"tree {statistics.median(ray(n, 'tree_peak_rss_mb') or [0]):,.0f} MB, object "
                                    f"store peak {statistics.median(ray(n, 'object_store_peak_mb') or [0]):,.0f} MB"))
    return figs


def train_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    r = runs[0]
    pairs = [(f["examples_per_s"], p["examples_per_s"]) for run in runs for f, p in zip(run["ray"], run["plain"],
                                                                                       strict=True)]
    figs = [Figure("train", f"training examples/s, Ray Train + DeepSpeed ZeRO-{r.get('zero_stage', 2)}, "
                   f"{r['ray_workers']} CPU workers x {r.get('ray_worker_torch_threads')} thread",
                   "ex/s", [a for a, _ in pairs], [b for _, b in pairs],
                   f"plain PyTorch loop, 1 process x {r.get('plain_torch_threads', 2)} threads", target=0.95)]
    return figs + _memory_figure("train", "training process tree (Ray cluster + workers)", runs, "plain",
                                 "plain loop process")


def _memory_figure(bench: str, what: str, runs: list[dict[str, Any]], ref_key: str, ref_name: str) -> list[Figure]:
    """Peak RSS of the Ray side's process tree vs the single-process reference, when both were measured."""
    mem = runs[0].get("memory") or {}
    if not (mem.get("ray") and mem.get(ref_key)):
        return []
    return [Figure(bench, f"peak RSS of the {what}", "MB", [x["memory"]["ray"]["peak_rss_mb"] for x in runs],
                   [x["memory"][ref_key]["peak_rss_mb"] for x in runs], ref_name, higher_is_better=False,
                   note=f"PSS {mem['ray']['peak_pss_mb']:.0f} MB")]


def embed_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    r = runs[0]

    def pairs(ray_key: str, single_key: str) -> tuple[list[float], list[float]]:
        both = [(a[ray_key], b[single_key]) for x in runs for a, b in zip(x["ray"], x["single"], strict=True)]
        return [a for a, _ in both], [b for _, b in both]

    pool = f"Ray Data actor pool ({r['actors']} x 1 thread), {r['items']:,} items"
    ref = f"1 process x 2 threads, same batch {r['batch_size']}"
    figs = [Figure("embed", f"precompute items/s as a job (start-up included), {pool}", "items/s",
                   *pairs("items_per_s", "cold_items_per_s"), f"{ref}, as a job (its imports and model load)",
                   target=0.9),
            Figure("embed", f"precompute items/s once started (encode + write), {pool}", "items/s",
                   *pairs("items_steady_per_s", "items_steady_per_s"), f"{ref}: its encode loop + write"),
            Figure("embed", f"precompute items/s as a job vs a process with torch/transformers imported, {pool}",
                   "items/s", *pairs("items_per_s", "items_per_s"), f"{ref}, imports done (model load timed)"),
            Figure("embed", f"precompute users/s (UPE + generated summary), {r['users']:,} users, same pool",
                   "users/s", *pairs("users_per_s", "users_per_s"), "1 process x 2 threads, same model",
                   target=r.get("users_target"))]
    if all("seconds" in a and "job_seconds" in b for x in runs for a, b in zip(x["ray"], x["single"], strict=True)):
        job = f"whole precompute job, {r['items']:,} items + {r['users']:,} users (start to last file)"
        figs.append(Figure("embed", job, "s", *pairs("seconds", "job_seconds"), "1 process x 2 threads, as a job",
                           higher_is_better=False))
    return figs + _memory_figure("embed", "embed process tree (Ray cluster + actors)", runs, "single",
                                 "single process")


def _by_clients(d: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in d.items() if str(k).isdigit() and isinstance(v, dict)}


def serve_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    figs: list[Figure] = []
    r = runs[0]
    wait = (r.get("config") or {}).get("batch_wait_timeout_s")
    key = f"serve_wait_{wait:g}" if isinstance(wait, (int, float)) and f"serve_wait_{wait:g}" in r else \
        next((k for k in r if k.startswith("serve_wait_")), None)
    if key and "bare" in r:
        serve = [_by_clients(x[key]) for x in runs]
        bare = [_by_clients(x["bare"]) for x in runs]
        for c in sorted(serve[0]):
            figs.append(Figure("serve", f"/v1/score requests/s, Ray Serve, {c} client{'s' if c > 1 else ''} "
                               f"(batch wait {key.removeprefix('serve_wait_')} s)", "req/s",
                               [s[c]["rps"] for s in serve], [b[c]["rps"] for b in bare], "bare FastAPI app",
                               target=1.0 if c == max(serve[0]) else None))
        for c in (min(serve[0]), max(serve[0])):
            for q in ("p50", "p99"):
                figs.append(Figure("serve", f"/v1/score {q} latency, Ray Serve, {c} client{'s' if c > 1 else ''}",
                                   "ms", [s[c][f"{q}_ms"] for s in serve], [b[c][f"{q}_ms"] for b in bare],
                                   "bare FastAPI app", higher_is_better=False))
        if "inprocess_score" in r:
            c1 = min(serve[0])
            figs.append(Figure("serve", f"/v1/score p50 latency, Ray Serve, {c1} client vs in-process score()",
                               "ms", [s[c1]["p50_ms"] for s in serve], [x["inprocess_score"]["p50_ms"] for x in runs],
                               "in-process score(), 1 caller", higher_is_better=False, target=2.0,
                               target_kind="delta<="))
    cpu = (r.get("machine") or {}).get("cpu_model")
    on = f"; {cpu}" if cpu else ""
    if "serve_distinct" in r and "bare_distinct" in r:  # every request another user and candidate set
        serve = [_by_clients(x["serve_distinct"]) for x in runs]
        bare = [_by_clients(x["bare_distinct"]) for x in runs]
        for c in sorted(serve[0]):
            figs.append(Figure("serve", f"/v1/score requests/s, distinct users x candidates, Ray Serve, {c} "
                               f"client{'s' if c > 1 else ''}{on}", "req/s", [s[c]["rps"] for s in serve],
                               [b[c]["rps"] for b in bare], "bare FastAPI app",
                               target=1.2 if c == max(serve[0]) else None))
    if "serve_distinct_scaled" in r:  # the same workload with the second core used by each side
        n = (r.get("config") or {}).get("scale_out", 2)
        serve = [_by_clients(x["serve_distinct_scaled"]) for x in runs]
        for ref, what in (("bare_distinct_1p", "bare FastAPI app, 1 process"),
                          ("bare_distinct_scaled", f"bare FastAPI app, {n} uvicorn workers")):
            bare = [_by_clients(x[ref]) for x in runs]
            for c in sorted(serve[0]):
                figs.append(Figure("serve", f"/v1/score requests/s, distinct users x candidates, Ray Serve {n} "
                                   f"replicas, {c} clients{on}", "req/s", [s[c]["rps"] for s in serve],
                                   [b[c]["rps"] for b in bare], what))
    if "recommend_catalog" in r:
        rc = [x["recommend_catalog"] for x in runs]
        figs.append(Figure("serve", f"/v1/recommend p50 latency, top 10 of {rc[0]['items']:,} items, Ray Serve vs "
                           f"in-process score() + top-k{on}", "ms", [x["serve_p50_ms"] for x in rc],
                           [x["inprocess_p50_ms"] for x in rc], "in-process score() + top-k",
                           higher_is_better=False, target=3.0, target_kind="delta<="))
        if all("serve_path_p50_ms" in x for x in rc):  # Serve's request path alone (Server-Timing)
            figs.append(Figure("serve", f"/v1/recommend p50 latency, top 10 of {rc[0]['items']:,} items, Ray Serve "
                               f"at the client vs the replica's own time{on}", "ms",
                               [x["serve_p50_ms"] for x in rc],
                               [x["serve_app_p50_ms"] for x in rc], "the replica's Server-Timing",
                               higher_is_better=False))
    for k in (r.get("catalog_vs_gemm") or {}):
        g = [x["catalog_vs_gemm"][k] for x in runs]
        figs.append(Figure("serve", f"score() over a 10k-item catalog, {k.replace('_', ' ')}: GFLOP/s", "GFLOP/s",
                           [x["score_gflops_per_s"] for x in g], [x["gemm_gflops_per_s"] for x in g],
                           "plain GEMM of the same FLOPs", target=0.5))
    return figs


def fleet_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    r = runs[0]
    results = [x for run in runs for x in run["results"]]
    ours, ray_default = r["policies"][-1], r["policies"][0]

    def lost(policy: str, key: str) -> list[float]:
        """Requests not answered 200, per 10,000, in each run of ``policy``."""
        return [1e4 * x[key]["failed"] / x[key]["requests"] for x in results
                if x["retry_on"] == policy and x[key]["requests"]]

    load = f"{r['clients']} closed-loop clients, 1-2 replicas"
    ref = f"retry-on '{ray_default}' (Ray's default)"
    figs = [Figure("fleet", f"requests failed per 10k, 2 replicas killed (ray.kill) under load, {load}, HAProxy "
                   f"retry-on '{ours}'", "per 10k", lost(ours, "total"), lost(ray_default, "total"), ref,
                   higher_is_better=False, target=10, target_kind="value<="),
            Figure("fleet", f"requests failed per 10k in the kill windows (kill -> replacement up + "
                   f"{r['settle_s']:g} s), retry-on '{ours}'", "per 10k", lost(ours, "kill_windows"),
                   lost(ray_default, "kill_windows"), ref, higher_is_better=False)]
    d = r["autoscaling"]
    # Results since issue 13b scale down under a light load (one client) and report that window;
    # older ones scaled down after the load stopped.
    light = all("scale_down_window" in x for x in results)
    since = "the load dropping to one client" if light else "load stop"
    for key, what in (("scale_up_s", f"seconds from load start to 2 replicas (upscale_delay_s "
                                     f"{d['upscale_delay_s']:g}, reports every {d['metrics_interval_s']:g} s)"),
                      ("scale_down_s", f"seconds from {since} to 1 replica, the removed one drained (downscale_delay_s "
                                       f"{d['downscale_delay_s']:g}, look-back {d['look_back_period_s']:g} s)")):
        figs.append(Figure("fleet", what, "s", [x[key] for x in results], [], "", higher_is_better=False))
    if light:
        figs.append(Figure("fleet", "requests failed per 10k while scaling 2 -> 1 under a light load", "per 10k",
                           lost(ours, "scale_down_window"), lost(ray_default, "scale_down_window"), ref,
                           higher_is_better=False))
    failed = sum(x["rollout_window"]["failed"] for x in results)
    figs.append(Figure("fleet", f"seconds of a rollout to a new version under load, every replica ({failed} requests "
                       f"failed in {len(results)} rollouts)", "s", [x["rollout"]["seconds"] for x in results], [], "",
                       higher_is_better=False))
    rss = [x["replica_peak_rss_mb"] for x in results if x.get("replica_peak_rss_mb")]
    if rss:
        figs.append(Figure("fleet", "peak RSS of one scorer replica (d_model 512, 2,000 items, across a rollout)", "MB",
                           rss, [], "", higher_is_better=False))
    return figs


def quality_figures(runs: list[dict[str, Any]]) -> list[Figure]:
    """EmbSum (paper-faithful, mean over seeds) against every other system of the quality study,
    on AUC and nDCG@10 at the study's negatives per impression: the target is to beat each."""
    r = runs[0]
    study = r.get("study") or {}
    negs = str(study.get("eval_negatives", ""))
    table = (study.get("tables") or {}).get(negs) or {}
    full_name = next((k for k in table if k.startswith("EmbSum (paper")), None)
    if full_name is None:
        return []
    full = table[full_name]
    figs = []
    for name, row in table.items():
        if name == full_name:
            continue
        for metric, unit in (("auc", "AUC"), ("ndcg10", "nDCG@10")):
            vals, refs = full[metric]["values"], row[metric]["values"]
            if len(refs) == 1:
                refs = refs * len(vals)  # a deterministic baseline: the same reference for every seed
            figs.append(Figure("quality", f"{r.get('dataset', 'quality')} test {unit}, {negs} negatives, "
                               f"EmbSum ({len(vals)} seeds)", unit, vals, refs[:len(vals)], name, target=1.0,
                               target_kind="ratio>", spread_kind="std"))
    return figs


EXTRACT: dict[str, Callable[[list[dict[str, Any]]], list[Figure]]] = {
    "prepare": prepare_figures, "train": train_figures, "embed": embed_figures, "serve": serve_figures,
    "fleet": fleet_figures, "quality": quality_figures,
}


def figures_for(name: str, runs: list[dict[str, Any]]) -> list[Figure]:
    """A benchmark's figures; a result this runner cannot read becomes one row saying why."""
    if not runs:
        return []
    try:
        return EXTRACT[name](runs)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        return [Figure(name, f"{name}: result not readable ({type(e).__name__}: {e})", "", [], [], "")]


def memory_figures(runner: dict[str, Any]) -> list[Figure]:
    """Peak memory of each benchmark's whole process tree as measured by the runner (no reference)."""
    figs = []
    for name, info in runner.items():
        peaks = [x["peak_rss_mb"] for x in info.get("runs", []) if x.get("peak_rss_mb")]
        if peaks:
            pss = max(x.get("peak_pss_mb", 0) for x in info["runs"])
            figs.append(Figure(name, f"peak RSS, whole `{name}` benchmark process tree", "MB", peaks, [], "",
                               higher_is_better=False, note=f"summed PSS {pss:.0f} MB"))
    return figs


# ---- rendering -------------------------------------------------------------------------------------------
COLUMNS = ("benchmark", "figure", "value", "reference", "ratio", "target", "met?", "repeats", "spread")


def rows(figs: list[Figure]) -> list[list[str]]:
    out = []
    for f in figs:
        ref = f"{_num(f.reference, f.unit)} ({f.ref_name})" if f.reference is not None else (f.ref_name or "")
        met = "" if f.met is None else ("yes" if f.met else "NO")
        value = _num(f.value, f.unit) + (f" ({f.note})" if f.note else "")
        out.append([f.bench, f.name, value, ref, "" if f.ratio is None else f"{f.ratio:.3f}x", f.target_text(), met,
                    str(f.repeats), f.spread_text()])
    return out


def text_table(figs: list[Figure]) -> str:
    body = rows(figs)
    widths = [min(max(len(c), *(len(r[i]) for r in body)) if body else len(c), 70) for i, c in enumerate(COLUMNS)]

    def line(cells: list[str]) -> str:
        return "  ".join((c if len(c) <= w else c[:w - 1] + "~").ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(list(COLUMNS)), line(["-" * w for w in widths]), *(line(r) for r in body)])


def markdown_table(figs: list[Figure]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return head + "\n" + "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows(figs))


def markdown(summary: dict[str, Any], figs: list[Figure]) -> str:
    m = summary["machine"]
    quick = " --quick" if summary["quick"] else ""
    lines = [
        f"### Benchmarks{' (QUICK smoke pass: not measurements)' if summary['quick'] else ''}", "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model', 'unknown CPU')}), {m.get('memory_gb')} GiB, no GPU, "
        f"{m.get('platform')}; Python {m.get('python')}, torch {m.get('torch')}, Ray {m.get('ray')}, "
        f"DeepSpeed {m.get('deepspeed')}. Shared with other work while it ran (load average "
        f"{summary.get('loadavg_range', '?')}): absolute figures are noisy, the side-by-side ratios less so.", "",
        "Ratios are oriented so that > 1 means better than the reference (value / reference for throughput and "
        "quality, reference / value for latency, memory and CPU time). Each figure is the median over repeats (for "
        "quality: the mean over seeds, ratio of the means); the spread is the half-range of the per-repeat ratios "
        "(std over seeds for quality). Peak RSS sums the "
        "resident memory of every process in the benchmark's tree (the script, its local Ray cluster and all "
        "workers); PSS de-duplicates shared pages (read at each new peak of the summed RSS and every 5 s: "
        "bench/harness.py TreeMemory).", "",
        markdown_table(figs), "",
        "Where the project beats or trails each reference:", "", *verdicts(figs), "",
        "Commands (from the repository root; data is read from ../shared/data or $EMBSUM_SHARED_DATA):", "",
        "```",
        f"python -m bench all{quick}          # everything below, then this table",
        *(f"python -m bench {n}{quick}" for n in BENCHMARKS),
        "python -m bench table               # rebuild this table from bench/results/*.json",
        "```", "",
        "Wall time per benchmark: " + ", ".join(
            f"{n} {sum(x['wall_s'] for x in info['runs']) / 60:.1f} min" + (" (reused)" if info.get("reused") else "")
            for n, info in summary["runner"].items() if info.get("runs")), "",
    ]
    return "\n".join(lines)


def verdicts(figs: list[Figure]) -> list[str]:
    """One line per figure with a reference: beats / trails / on par (within 2%), by how much."""
    out = []
    for f in figs:
        if f.ratio is None:
            continue
        word = "on par with" if abs(f.ratio - 1) <= 0.02 else "beats" if f.ratio > 1 else "trails"
        target = "" if f.met is None else f"; target {f.target_text()} {'met' if f.met else 'NOT met'}"
        out.append(f"- {f.bench}: {f.name}: {word} {f.ref_name} ({_num(f.value, f.unit)} vs "
                   f"{_num(f.reference, f.unit)}, {f.ratio:.2f}x{target})")
    return out


# ---- running ---------------------------------------------------------------------------------------------
def result_paths(name: str, quick: bool, runs: int) -> list[Path]:
    d = harness.results_dir(quick)
    return [d / (f"{name}.json" if i == 0 else f"{name}.r{i + 1}.json") for i in range(runs)]


def existing_results(name: str, quick: bool) -> list[Path]:
    d = harness.results_dir(quick)
    found = [d / f"{name}.json"] + sorted(d.glob(f"{name}.r*.json"))
    return [p for p in found if p.is_file()]


def run_script(name: str, quick: bool, out: Path, extra: list[str], log_dir: Path) -> dict[str, Any]:
    module = BENCHMARKS[name][0]
    cmd = [sys.executable, "-m", module, *(["--quick"] if quick else []), "--out", str(out), *extra]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"[bench] {name}: {' '.join(cmd[1:])}  (log: {log.relative_to(harness.REPO)})", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=harness.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        mem = harness.TreeMemory(proc.pid).start()
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if SUMMARY_LINE.match(line):
                print("    " + line.rstrip()[:300], flush=True)
        rc = proc.wait()
        m = mem.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        print(f"[bench] {name} FAILED (exit {rc}); last lines of {log}:\n    " + "\n    ".join(tail), flush=True)
    if "--cached-only" in cmd:  # nothing was trained: its memory says nothing about the benchmark's
        m = {}
    return {"cmd": " ".join(["python", *cmd[1:]]), "rc": rc, "wall_s": round(wall, 1), "log": str(log), **m}


def recorded_results(name: str, quick: bool, recorded: list[str]) -> list[Path]:
    """The result files a summary recorded for ``name``, found in this checkout's results directory:
    a summary written in another checkout (or on another machine) records its own absolute paths, and
    a path that is not here must not silently drop the benchmark's rows. None recorded, or none
    found: the benchmark's results in the results directory."""
    d = harness.results_dir(quick)
    paths = [p if p.is_absolute() else harness.REPO / p for p in map(Path, recorded)]
    found = [p if p.is_file() else d / p.name for p in paths]
    return [p for p in found if p.is_file()] or existing_results(name, quick)


def collect(names: list[str], quick: bool, runner: dict[str, Any]) -> tuple[list[Figure], dict[str, Any]]:
    from bench import before_after

    figs: list[Figure] = []
    results: dict[str, Any] = {}
    for name in names:
        paths = recorded_results(name, quick, runner.get(name, {}).get("results", []))
        runs = [json.loads(p.read_text()) for p in paths]
        results[name] = [_repo_relative(p) for p in paths]
        figs += figures_for(name, runs)
        if runs and not quick:  # what each change moved (bench/before_after.py): full runs only
            figs += before_after.figures(harness.results_dir(quick), [name])
    return figs + memory_figures({n: runner[n] for n in names if n in runner}), results


def _repo_relative(p: Path) -> str:
    """A path under the checkout as the summary records it: relative, so it reads the same anywhere."""
    return str(p.relative_to(harness.REPO)) if p.is_relative_to(harness.REPO) else str(p)


def log_mlflow(summary: dict[str, Any], figs: list[Figure], files: list[Path], tracking_uri: str) -> str | None:
    """One run in the `benchmarks` experiment: params, every figure's value/reference/ratio, the files."""
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
    except ImportError:
        return None
    root = harness.bench_root()
    if tracking_uri.startswith("sqlite:"):
        Path(tracking_uri.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("benchmarks")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "benchmarks", artifact_location=(root / "mlflow" / "artifacts").as_uri())
    run = client.create_run(exp_id, run_name=f"bench-{summary['command_name']}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"quick": str(summary["quick"]), "git_commit": summary.get("git_commit", "")})
    rid = run.info.run_id
    params = {"quick": summary["quick"], "benchmarks": ",".join(summary["benchmarks"]),
              **{f"machine.{k}": v for k, v in summary["machine"].items()}}
    client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    ts = int(time.time() * 1000)
    metrics = []
    for f in figs:
        base = _metric_key(f"{f.bench}.{f.name}")
        for suffix, v in (("value", f.value), ("reference", f.reference), ("ratio", f.ratio), ("spread", f.spread)):
            if _finite(v):
                metrics.append(Metric(f"{base}.{suffix}", float(v), ts, 0))
        if f.met is not None:
            metrics.append(Metric(f"{base}.met", float(f.met), ts, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(rid, metrics=metrics[i:i + 500])
    for p in files:
        if p.is_file():
            client.log_artifact(rid, str(p))
    client.set_terminated(rid)
    return rid


def _metric_key(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", s)[:240]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=harness.REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after '--' go to the benchmark script (single benchmark only).")
    ap.add_argument("what", choices=["all", "table", *BENCHMARKS], help="a benchmark, 'all', or 'table'")
    ap.add_argument("--quick", action="store_true", help="smoke pass of every script (results in results/quick/)")
    ap.add_argument("--reuse", default="", help="comma-separated benchmarks to take from earlier results")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out of 'all'")
    ap.add_argument("--runs", type=int, default=None, help="runs per script (default 1)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's, else "
                    "sqlite under the bench workdir runs/bench/mlflow)")
    ap.add_argument("--config", default=None, help="run config whose mlflow.tracking_uri to use")
    ap.add_argument("--no-mlflow", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    harness.setup()
    skip = {s for s in a.skip.split(",") if s}
    reuse = {s for s in a.reuse.split(",") if s}
    bad = (skip | reuse) - set(BENCHMARKS)
    if bad:
        ap.error(f"unknown benchmark(s) {sorted(bad)}; known: {list(BENCHMARKS)}")
    if a.what == "all":
        names = [n for n in BENCHMARKS if n not in skip]
    elif a.what == "table":
        names = [n for n in BENCHMARKS if existing_results(n, a.quick)]
        reuse = set(names)
    else:
        names = [a.what]
    out_dir = harness.results_dir(a.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_path = out_dir / "summary.json"
    previous = json.loads(prev_path.read_text()).get("runner", {}) if prev_path.is_file() else {}
    runner: dict[str, Any] = {}
    loads = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    for name in names:
        if name in reuse:
            paths = existing_results(name, a.quick)
            if not paths:
                print(f"[bench] {name}: no earlier result in {out_dir}; skipped", flush=True)
                continue
            runner[name] = {**previous.get(name, {}), "results": [_repo_relative(p) for p in paths], "reused": True}
            continue
        n_runs = a.runs or BENCHMARKS[name][1][1 if a.quick else 0]
        paths = result_paths(name, a.quick, n_runs)
        for stale in existing_results(name, a.quick):
            stale.unlink()  # a fresh run never mixes with older repeats
        runs = [run_script(name, a.quick, p, extra if a.what == name else [], harness.LOGS) for p in paths]
        loads.append(os.getloadavg()[0])
        before = [r for r in previous.get(name, {}).get("runs", []) if r.get("peak_rss_mb")]
        if a.what == name and "--cached-only" in extra and before:  # keep the memory and time of the run that trained
            peak = {k: v for k, v in before[0].items() if k.startswith("peak_") or k == "wall_s"}
            runs = [{**r, **peak} for r in runs]
        runner[name] = {"runs": runs, "results": [_repo_relative(p) for p in paths if p.is_file()], "reused": False}
    figs, results = collect(list(runner), a.quick, runner)
    summary = {
        "command_name": a.what, "quick": a.quick, "benchmarks": list(runner), "runner": runner, "results": results,
        "figures": [asdict(f) | {"target_text": f.target_text(), "repeats": f.repeats} for f in figs],
        "machine": harness.machine(), "loadavg_range": f"{min(loads):.1f}-{max(loads):.1f}",
        "git_commit": _git_commit(), "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if a.what == "table" and prev_path.is_file():  # nothing ran: the load the measurements ran under
        summary["loadavg_range"] = json.loads(prev_path.read_text()).get("loadavg_range", summary["loadavg_range"])
    if a.what not in ("all", "table") and prev_path.is_file():
        # One benchmark rerun: keep the other benchmarks' rows from the last summary.
        old = json.loads(prev_path.read_text())
        others = [n for n in old.get("benchmarks", []) if n not in runner]
        for n in others:
            summary["runner"][n] = old["runner"].get(n, {})
        summary["benchmarks"] = [n for n in BENCHMARKS if n in summary["runner"]]
        figs, summary["results"] = collect(summary["benchmarks"], a.quick, summary["runner"])
        summary["figures"] = [asdict(f) | {"target_text": f.target_text(), "repeats": f.repeats} for f in figs]
    table = text_table(figs)
    print("\n" + table + "\n", flush=True)
    md = markdown(summary, figs)
    harness.write_result("summary", summary, out_dir / "summary.json")
    (out_dir / "summary.md").write_text(md)
    if not a.no_mlflow:
        uri = a.tracking_uri or _config_uri(a.config) or f"sqlite:///{harness.bench_root() / 'mlflow' / 'mlflow.db'}"
        files = [out_dir / "summary.json", out_dir / "summary.md",
                 *(harness.REPO / p for v in summary["results"].values() for p in v)]
        rid = log_mlflow(summary, figs, files, uri)
        if rid:
            print(f"[bench] logged to MLflow experiment 'benchmarks' (run {rid}) at {uri}", flush=True)
    print(f"[bench] wrote {out_dir / 'summary.md'} and summary.json", flush=True)
    failed = [n for n, info in runner.items() if any(r.get("rc") for r in info.get("runs", []))]
    return 1 if failed else 0


def _config_uri(path: str | None) -> str | None:
    if not path:
        return None
    from embsum.config import load_config

    return load_config(path).mlflow.tracking_uri or None
