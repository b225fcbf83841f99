"""Before/after rows of the benchmark table: what a change moved, read from the results of the same
benchmark run before and after it (bench/results/*.json, committed with the change).

Each ``Change`` names one figure (a function of one result file), the files measured before the
change and the files measured after it, and the target the figure answers to. Its row's value is
the median over the "after" files, its reference the median over the "before" files, and its
ratio after / before, oriented like every other row (> 1: the change made it better); its target
applies to the "after" value. The reference says on which CPU each side ran: a ratio of ratios
(Serve / bare app, Ray / pandas) compares across machines, a wall time would not, so only
ratios and memory are compared here.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.runner import Figure

Measure = Callable[[dict[str, Any]], float]


def _prepare_size(r: dict[str, Any], impressions: int) -> list[dict[str, Any]]:
    runs = [run for size in r["sizes"] if size["impressions"] == impressions for run in size["runs"]]
    if not runs:
        raise KeyError(f"no run at {impressions:,} impressions")
    return runs


def prepare_ratio(impressions: int) -> Measure:
    """Ray Data job examples/s over the pandas process's, median over the file's runs at that size."""
    return lambda r: statistics.median(x["ray"]["examples_per_s"] / x["pandas"]["examples_per_s"]
                                       for x in _prepare_size(r, impressions))


def prepare_driver_mb(impressions: int) -> Measure:
    return lambda r: statistics.median(x["ray"]["driver_peak_rss_mb"] for x in _prepare_size(r, impressions))


def serve_ratio(serve: str, bare: str, clients: int = 16) -> Measure:
    """Serve's requests/s over the bare app's, at ``clients`` clients, one workload."""
    return lambda r: r[serve][str(clients)]["rps"] / r[bare][str(clients)]["rps"]


def embed_users_ratio(r: dict[str, Any]) -> float:
    return float(r["users_ratio"])


def tree_memory(kind: str) -> Measure:
    """The training tree's peak summed RSS or PSS (bench/train_memory.py's results)."""
    return lambda r: float(r["memory"][f"peak_{kind}_mb"])


@dataclass(frozen=True)
class Change:
    bench: str
    figure: str
    unit: str
    measure: Measure
    before: tuple[str, ...]  # result files in bench/results
    after: tuple[str, ...]
    before_is: str  # what the "before" runs ran
    higher_is_better: bool = True
    target: float | None = None  # on the "after" value
    target_kind: str = "value>="


SERVE_SAME_AFTER = ("serve-same-distinct-users-after-1.json", "serve-same-distinct-users-after-2.json",
                    "serve-same-distinct-users-after-3.json", "serve-ray-worker-niceness-0.json",
                    "serve-ray-worker-niceness-15.json", "serve-inline-max-2048.json", "serve.json")
SERVE_DISTINCT_AFTER = ("serve-ray-worker-niceness-0.json", "serve-ray-worker-niceness-15.json",
                        "serve-inline-max-2048.json", "serve.json")
TRAIN_MEMORY_AFTER = ("train_memory-after-arrow-pool-1.json", "train_memory-after-arrow-pool-2.json")

CHANGES: tuple[Change, ...] = (
    Change("prepare", "Ray Data / pandas examples/s at 200,000 impressions", "x", prepare_ratio(200_000),
           ("prepare-before-one-task-per-core.json",),
           ("prepare.json", "prepare-200k-arrow-pool-system-1.json", "prepare-200k-arrow-pool-system-2.json"),
           "4 tasks at once on 2 cores, zstd shuffle", target=1.5),
    Change("prepare", "driver peak RSS at 3,200,000 impressions", "MB", prepare_driver_mb(3_200_000),
           ("prepare-before-one-task-per-core.json",), ("prepare.json", "prepare-3200k-arrow-pool-system.json"),
           "catalog built with per-row takes", higher_is_better=False, target=1024, target_kind="value<="),
    Change("train", "peak PSS of the `embsum train` process tree, 2 workers, 10 steps", "MB", tree_memory("pss"),
           ("train_memory-before-2.json",), TRAIN_MEMORY_AFTER, "main on 2026-12-05",
           higher_is_better=False, target=3072, target_kind="value<="),
    Change("train", "peak RSS of the `embsum train` process tree, 2 workers, 10 steps", "MB", tree_memory("rss"),
           ("train_memory-before-2.json",), TRAIN_MEMORY_AFTER, "main on 2026-12-05", higher_is_better=False),
    Change("embed", "users/s, Ray Data actor pool / single process", "x", embed_users_ratio,
           ("embed-before-one-pool.json",), ("embed.json",), "a second actor pool for users, 400 users",
           target=0.9),
    Change("serve", "Ray Serve / bare app requests/s, 16 clients, same candidates", "x",
           serve_ratio("serve_wait_0", "bare"),
           ("serve-same-distinct-users-before-1.json", "serve-same-distinct-users-before-2.json",
            "serve-same-distinct-users-before-3.json"), SERVE_SAME_AFTER,
           "a batch scored each request's user again", target=1.0),
    Change("serve", "Ray Serve / bare app requests/s, 16 clients, distinct users x candidates", "x",
           serve_ratio("serve_distinct", "bare_distinct"), ("serve-before-distinct-batching.json",),
           SERVE_DISTINCT_AFTER, "a batch scored each request's user again", target=1.2),
)


def _cpu(results: list[dict[str, Any]]) -> str:
    cpus = sorted({str((r.get("machine") or {}).get("cpu_model") or "unknown CPU") for r in results})
    return " / ".join(cpus)


def figure(change: Change, results_dir: Path) -> Figure | None:
    """``change``'s row: after (median) against before (median). None where a file is not in
    ``results_dir`` (a results directory of one's own holds no before/after pairs); a file that
    cannot be read gives a row that says why."""
    if not all((results_dir / n).is_file() for n in change.before + change.after):
        return None

    def read(names: tuple[str, ...]) -> list[dict[str, Any]]:
        return [json.loads((results_dir / n).read_text()) for n in names]

    name = f"before -> after: {change.figure}"
    try:
        before, after = read(change.before), read(change.after)
        b = statistics.median(change.measure(r) for r in before)
        values = [change.measure(r) for r in after]
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        return Figure(change.bench, f"{name}: results not readable ({type(e).__name__}: {e})", "", [], [], "")
    ref = f"before: {change.before_is}; {len(before)} run{'s' * (len(before) > 1)}, {_cpu(before)}"
    return Figure(change.bench, name, change.unit, values, [b] * len(values), ref,
                  higher_is_better=change.higher_is_better, target=change.target, target_kind=change.target_kind,
                  note=f"after: {len(after)} run{'s' * (len(after) > 1)}, {_cpu(after)}")


def figures(results_dir: Path, benches: list[str]) -> list[Figure]:
    """The before/after rows of the benchmarks in ``benches`` whose files are all in ``results_dir``."""
    figs = [figure(c, results_dir) for c in CHANGES if c.bench in benches]
    return [f for f in figs if f is not None]
