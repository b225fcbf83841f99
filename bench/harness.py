"""What every benchmark script shares: where results go, the bench workdir, process-tree memory,
machine facts, seeded repeats' statistics, and "prepare + summarize once per data config".

Importing this module changes nothing; ``setup()`` sets the quiet environment (no hub, no
telemetry, DeepSpeed on CPU with its JIT build cached in .cache/) before Ray or torch start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("EMBSUM_BENCH_RESULTS", REPO / "bench" / "results")).resolve()
LOGS = RESULTS / "logs"
SHARED_DATA = Path(os.environ.get("EMBSUM_SHARED_DATA", REPO.parent / "shared" / "data"))


def bench_root() -> Path:
    """Scratch space of every benchmark (data, MLflow, checkpoints): git-ignored runs/bench, or
    $EMBSUM_BENCH_WORKDIR."""
    return Path(os.environ.get("EMBSUM_BENCH_WORKDIR", REPO / "runs" / "bench")).resolve()


def tracking_overrides(experiment: str, registered_model: str) -> list[str]:
    """Config overrides that put a benchmark's training runs in the bench MLflow store (one SQLite
    file for all benchmarks, beside the `benchmarks` experiment the runner writes)."""
    root = bench_root()
    return [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            f"mlflow.artifact_location={(root / 'mlflow' / 'artifacts').as_uri()}",
            f"mlflow.experiment={experiment}", f"mlflow.registered_model={registered_model}",
            f"train.storage_path={root / 'ray_results'}"]


def setup() -> None:
    from embsum.runtime import setup_env

    setup_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("PYTHONPATH", str(REPO))  # Ray workers import bench/train from the checkout


def results_dir(quick: bool = False) -> Path:
    """bench/results, or bench/results/quick for --quick smoke passes (never mixed with real figures)."""
    return RESULTS / "quick" if quick else RESULTS


def write_result(name: str, result: dict[str, Any], out: str | Path | None = None, *, quick: bool = False) -> Path:
    path = Path(out) if out else results_dir(quick) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return path


def machine() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "loadavg_1m": round(os.getloadavg()[0], 2)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("torch", "ray", "deepspeed", "transformers", "mlflow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    return info


# ---- statistics over repeats ----------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the relative half-range ((max - min) / 2 / median) of repeats."""
    v = [float(x) for x in values]
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None, "rel_spread": None, "values": []}
    med = statistics.median(v)
    return {"n": len(v), "median": med, "min": min(v), "max": max(v),
            "rel_spread": (max(v) - min(v)) / 2 / abs(med) if med else None, "values": v}


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    return {"n": len(v), "mean": statistics.fmean(v) if v else None,
            "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}


# ---- memory of a process tree ------------------------------------------------------------------------------
class TreeMemory:
    """Peak memory of a process and everything it starts, sampled every ``interval`` s.

    The tree is the root process and all its descendants (``psutil.Process.children(recursive=True)``):
    a local Ray cluster started by ``ray.init`` (GCS, raylet, dashboard agents) and every Ray worker,
    actor and Train worker it forks descend from the driver, so they are counted; another user's
    Ray cluster on the same machine is not. Per sample the tree's total RSS is summed, and its total
    PSS where the sample reads it (at a new peak of the summed RSS, every ``pss_interval`` s, at
    start and stop; see ``sample``: reading PSS at every sample cost the measured workload a tenth of
    a 2-core machine): PSS splits shared pages, e.g. the object store's shared memory, between the
    processes that map them, so summed PSS does not double-count them; summed RSS does. The peaks
    are the largest sums seen, plus the largest single process. ``breakdown``: at the sample with the largest
    summed RSS, the processes grouped by what they are (``process_label``: gcs_server, raylet,
    ``ray::TrainWorker``, an idle worker, the driver ...) with their count, RSS and PSS.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5, pss_interval: float = 5.0) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.pss_interval = pss_interval
        self.peak_rss = self.peak_pss = self.peak_single_rss = 0
        self.max_processes = 0
        self.samples = self.pss_samples = 0
        self._last_pss = -math.inf
        self.seen: set[tuple[int, float]] = set()
        self.breakdown: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, full: bool = False) -> None:
        """One sample: every process's RSS (/proc/PID/statm, cheap); and their PSS and labels
        (/proc/PID/smaps_rollup, which makes the kernel walk each process's page tables: about 3 ms
        a Ray process, 0.17 of a core for a 30-process tree at 2 samples a second, taken from the
        workload being measured) only at a new peak of the summed RSS, every ``pss_interval`` s,
        and when ``full``."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        live: list[tuple[Any, int]] = []
        for p in procs:
            try:
                live.append((p, p.memory_info().rss))
                self.seen.add((p.pid, p.create_time()))  # create_time: read when psutil made the Process
            except psutil.Error:
                continue
        rss = sum(r for _, r in live)
        self.samples += 1
        self.peak_single_rss = max([self.peak_single_rss, *(r for _, r in live)])
        self.max_processes = max(self.max_processes, len(live))
        now = time.monotonic()
        if not (full or rss > self.peak_rss or now - self._last_pss >= self.pss_interval):
            return
        self._last_pss, self.pss_samples = now, self.pss_samples + 1
        pss = 0
        groups: dict[str, dict[str, float]] = {}
        for p, r in live:
            try:
                pp = getattr(p.memory_full_info(), "pss", r)  # PSS from /proc/PID/smaps_rollup
            except psutil.AccessDenied:
                pp = r
            except psutil.Error:
                continue
            pss += pp
            g = groups.setdefault(process_label(p, root=p.pid == self.pid), {"n": 0, "rss_mb": 0.0, "pss_mb": 0.0})
            g["n"] += 1
            g["rss_mb"] += r / 2**20
            g["pss_mb"] += pp / 2**20
        if rss > self.peak_rss:
            self.breakdown = {k: {**v, "rss_mb": round(v["rss_mb"], 1), "pss_mb": round(v["pss_mb"], 1)}
                              for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["rss_mb"])}
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> TreeMemory:
        """Start (or restart: peaks accumulate over every start/stop period) sampling."""
        self.sample(full=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-memory")
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample(full=True)
        return self.report()

    def report(self) -> dict[str, Any]:
        mb = 2**20
        return {"peak_rss_mb": round(self.peak_rss / mb, 1), "peak_pss_mb": round(self.peak_pss / mb, 1),
                "peak_single_process_rss_mb": round(self.peak_single_rss / mb, 1),
                "max_processes": self.max_processes, "processes_seen": len(self.seen), "samples": self.samples,
                "pss_samples": self.pss_samples, "interval_s": self.interval, "pss_interval_s": self.pss_interval,
                "breakdown_at_peak": self.breakdown}

    def __enter__(self) -> TreeMemory:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def process_label(p: Any, root: bool = False) -> str:
    """What a process of a Ray tree is: Ray's process title for workers and actors ('ray::IDLE',
    'ray::RayTrainWorker', 'ray::MapBatches(...)' cut at the parenthesis), the script of a Python
    service (dashboard agent, log monitor), else the executable's name; 'driver' for the root."""
    if root:
        return "driver"
    try:
        cmd = p.cmdline()
        name = p.name()
    except Exception:  # noqa: BLE001 - the process went away between listing and reading
        return "gone"
    title = cmd[0] if len(cmd) == 1 and cmd[0].startswith("ray::") else next(
        (c for c in cmd if c.startswith("ray::")), "")
    if title:
        return title.split("(")[0].split(".")[0].split()[0]
    script = next((c for c in cmd[1:3] if c.endswith(".py")), "")
    if script.endswith("default_worker.py"):
        return "ray::worker (starting)"
    if script:
        parts = Path(script).parts
        return "/".join(parts[-2:]) if parts[-1] in ("main.py", "agent.py") else parts[-1]
    return name


class ObjectStoreMeter:
    """Peak object-store use of every node of the connected Ray cluster, sampled every ``interval``
    s from each raylet's store stats (what ``ray memory --stats-only`` reports): bytes held in
    shared memory (primary copies and secondary copies pulled from other nodes) and bytes spilled.
    Start it after ``ray.init``; ``stop()`` -> {node_id: {"peak_used_mb", "spilled_mb", ...}}."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_used: dict[str, int] = {}
        self.peak_primary: dict[str, int] = {}
        self.spilled: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        import ray
        from ray._private.internal_api import node_stats

        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            try:
                s = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"],
                               include_memory_info=False).store_stats
            except Exception:  # noqa: BLE001 - a node going away between listing and asking
                continue
            nid = node["NodeID"]
            self.peak_used[nid] = max(self.peak_used.get(nid, 0), int(s.object_store_bytes_used))
            self.peak_primary[nid] = max(self.peak_primary.get(nid, 0), int(s.object_store_bytes_primary_copy))
            self.spilled[nid] = max(self.spilled.get(nid, 0), int(s.spilled_bytes_total))
            self.capacity[nid] = int(s.object_store_bytes_avail)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> ObjectStoreMeter:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="object-store-meter")
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        mb = 2**20
        return {nid: {"peak_used_mb": round(self.peak_used[nid] / mb, 1),
                      "peak_primary_mb": round(self.peak_primary.get(nid, 0) / mb, 1),
                      "spilled_mb": round(self.spilled.get(nid, 0) / mb, 1),
                      "capacity_mb": round(self.capacity.get(nid, 0) / mb, 1)} for nid in self.peak_used}


# ---- data: prepare + summarize once per data config ------------------------------------------------------
PREPARE_MODEL_KEYS = ("tokenizer", "backbone", "sos_token", "num_sessions", "items_per_session", "session_tokens",
                      "content_tokens", "summary_tokens")


def data_key(cfg: Any) -> str:
    """What the prepared shards and teacher summaries depend on: the data section and the model's
    tokenization/shape fields (summary_tokens shapes the summaries' ids)."""
    blob = {"data": asdict(cfg.data), "model": {k: getattr(cfg.model, k) for k in PREPARE_MODEL_KEYS}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_prepared(cfg: Any, *, summarize: bool = True) -> dict[str, Any]:
    """Run prepare (+ summarize with cfg's teacher) into cfg.data_dir unless a completed run for the
    same data key is there already. -> {'prepare': report, 'summarize': report, 'reused': bool}."""
    from embsum.data import layout

    marker = cfg.data_dir / "bench_data_key.json"
    key = data_key(cfg)
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        done = json.loads(marker.read_text())
        if not summarize or done.get("summarize"):
            return {**done, "reused": True}
    from train.prepare import run_prepare
    from train.summarize import run_summarize

    t0 = time.perf_counter()
    prep = run_prepare(cfg)
    summ = run_summarize(cfg) if summarize else None
    done = {"key": key, "prepare": _small_report(prep), "summarize": summ, "seconds": time.perf_counter() - t0}
    marker.write_text(json.dumps(done, indent=2, default=str))
    assert (cfg.data_dir / layout.TRAIN).exists()
    return {**done, "reused": False}


def _small_report(rep: dict[str, Any]) -> dict[str, Any]:
    keep = ("rows_in", "rows_out", "quarantined", "examples", "eval_impressions", "users", "seconds", "fingerprint")
    return {k: rep.get(k) for k in keep}


def data_workdir(cfg: Any, name: str) -> Path:
    """A per-data-config workdir under the bench root: variants that only change the model head
    or training share one prepared dataset."""
    return bench_root() / name / f"data-{data_key(cfg)}"
