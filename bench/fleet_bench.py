"""Benchmark: a serving fleet under closed-loop load (bench/fleet.py's scenario, the one the
integration test asserts on): autoscaling 1 -> 2 -> 1, two replicas killed with ``ray.kill``, the
alias moved in between, a rollout to the new version, all while the load runs; the scale-down
under a light load (one client).

    python -m bench.fleet_bench            # 2 runs per HAProxy retry policy, interleaved (about 12 min)
    python -m bench.fleet_bench --quick    # 1 run each, 4 clients

Setup as bench/serve_bench.py: a registered t5-small-width model (d_model 512, M = 8, N = 4) and
random embeddings of 2,000 items for two versions; POST /v1/score of 1 known user x 100 candidates
from ``--clients`` closed-loop clients (Python threads, keep-alive HTTP). Serve: serve.control.deploy
on a local Ray cluster, HAProxy ingress, 1 to 2 replicas of 1 CPU on short autoscaling delays
(target 1 request in flight per replica, a 20 ms @serve.batch wait so the closed-loop clients keep
several in flight: the integration test's comment says why; replicas report every 0.5 s, 2 s
averaged; 1 s over target adds a replica, 3 s under removes one;
production defaults are 10 s / 300 s, see cluster/README.md) and Serve's local drain period
(embsum/runtime.py), so a run takes minutes. The clients are threads of this process, on the same
cores as the cluster.

A/B: HAProxy's retry policy when a replica dies mid-request. 'conn-failure' is Ray's default (replay
only requests that never reached a replica); 'conn-failure empty-response' is serve/ingress.py's
(also replay requests whose replica closed the connection without answering; every route is a read).
Reported per policy: the share of requests answered 200 over the whole run (2 kills in it) and in
the kill windows (each kill until its replacement had run 3 s), the reference being the same run's
requests before the first kill; seconds from load start to 2 replicas and from load stop to 1; the
rollout's duration and failures; the scale-down under light load (seconds from the load lightening
to 1 replica, failures). Writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.fleet import ClosedLoop, FleetRun, run_fleet, tally
from embsum.config import Config, config_from_dict, replace

POLICIES = ("conn-failure", "conn-failure empty-response")  # Ray's default, then serve/ingress.py's
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1.0,
               "downscale_delay_s": 3.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}


def fleet_config(work: Path, port: int) -> Config:
    from bench.serve_bench import MODEL

    return config_from_dict({"workdir": str(work), "model": MODEL, "ray": {"num_cpus": 4},
                             "serve": {"port": port, "num_cpus": 1, "memory_gb": 0.5, "batch_wait_timeout_s": 0.02,
                                       **AUTOSCALING}})


def prepare(cfg: Config) -> tuple[str, str]:
    """Two registered versions with random embeddings; the alias on the first."""
    from bench.serve_bench import register_model, write_random_embeddings
    from embsum.registry import Registry

    versions = [register_model(cfg) for _ in range(2)]
    for v in versions:
        write_random_embeddings(cfg, v)
    Registry(cfg).promote(versions[0])
    return versions[0], versions[1]


class ReplicaMemory:
    """Peak RSS of the Serve replica processes (what ray_actor_options.memory must cover), sampled."""

    def __init__(self, interval_s: float = 1.0) -> None:
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(interval_s):
            for proc in me.children(recursive=True):  # this benchmark's local cluster only
                try:
                    if "ServeReplica:embsum:EmbSumScorer" in " ".join(proc.cmdline()):
                        self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
                except psutil.Error:  # gone meanwhile
                    continue

    def __enter__(self) -> ReplicaMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def one_run(cfg: Config, policy: str, v1: str, v2: str, clients: int, settle_s: float) -> dict[str, Any]:
    from bench.serve_bench import request_body, wait_ready
    from embsum.registry import Registry
    from serve.control import APP_NAME, DEPLOYMENT_NAME, deploy, shutdown

    os.environ["RAY_SERVE_HAPROXY_RETRY_ON"] = policy  # serve_env forwards it to HAProxy
    Registry(cfg).promote(v1)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    load1 = os.getloadavg()[0]
    deploy(cfg)
    try:
        wait_ready(url)
        load = ClosedLoop(url + "/v1/score", request_body(), clients)
        with ReplicaMemory() as mem:
            run = run_fleet(cfg, load, app=APP_NAME, deployment=DEPLOYMENT_NAME, move_alias_to=v2, rollout=True,
                            settle_s=settle_s)
    finally:
        shutdown()
    return {**summarize(policy, load, run, load1), "replica_peak_rss_mb": round(mem.peak_mb, 1)}


def summarize(policy: str, load: ClosedLoop, run: FleetRun, load1: float) -> dict[str, Any]:
    m = run.marks
    windows = [o for a, b in run.kill_windows() for o in load.between(a, b)]
    seconds = m["load_stop"] - m["load_start"]
    out = {
        "retry_on": policy, "loadavg_1m": round(load1, 2), "timeline_s": run.timeline(),
        "scale_up_s": run.seconds("load_start", "two_replicas"),
        "scale_down_s": run.seconds("load_light", "one_replica"),
        "kills": len(run.killed), "pinned_after_restart": run.pinned_after_restart,
        "rollout": {k: v for k, v in run.rollout.items() if k != "error"} | {"error": run.rollout.get("error")},
        "total": tally(load.outcomes), "before_kill": tally(load.between(m["load_start"], m["kill"])),
        "kill_windows": tally(windows), "rollout_window": tally(load.between(m["rollout_start"], m["load_light"])),
        "scale_down_window": tally(load.between(m["load_light"], m["load_stop"])),
        "requests_per_s": len(load.outcomes) / seconds,
    }
    for key in ("total", "before_kill", "kill_windows"):
        t = out[key]
        t["success_rate"] = t["ok"] / t["requests"] if t["requests"] else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run per policy, 4 clients, 1 s settles")
    p.add_argument("--runs", type=int, default=None, help="runs per policy (default 2, quick 1)")
    p.add_argument("--clients", type=int, default=None, help="closed-loop clients (default 8, quick 4)")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/fleet.json, quick/ for --quick)")
    a = p.parse_args(argv)
    runs = a.runs or (1 if a.quick else 2)
    clients = a.clients or (4 if a.quick else 8)
    settle = 1.0 if a.quick else 3.0
    harness.setup()
    from bench.serve_bench import free_port
    from embsum.runtime import init_ray

    t0 = time.perf_counter()
    work = harness.bench_root() / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="rayfleet-")  # our own Ray session directory; kept if the run fails
    print(f"[fleet bench] Ray logs under {ray_tmp}", flush=True)
    cfg = replace(fleet_config(work, free_port()), "ray.temp_dir", ray_tmp)
    v1, v2 = prepare(cfg)
    init_ray(cfg.ray)
    results = []
    for i in range(runs):  # interleaved: A B A B, so machine load drifts hit both alike
        for policy in POLICIES:
            r = one_run(cfg, policy, v1, v2, clients, settle)
            results.append(r)
            print(f"[fleet bench] run {i + 1} retry-on '{policy}': {r['total']['ok']}/{r['total']['requests']} ok "
                  f"({r['total']['success_rate']:.5%}; kill windows {r['kill_windows']['ok']}/"
                  f"{r['kill_windows']['requests']}), {r['requests_per_s']:.0f} req/s, 2 replicas after "
                  f"{r['scale_up_s']:.1f}s, 1 after {r['scale_down_s']:.1f}s of light load "
                  f"({r['scale_down_window']['failed']} of {r['scale_down_window']['requests']} failed), rollout "
                  f"{r['rollout'].get('seconds', float('nan')):.1f}s with {r['rollout_window']['failed']} "
                  f"failed; replica peak RSS {r['replica_peak_rss_mb']:.0f} MB", flush=True)
    import ray

    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    by = {pol: [r for r in results if r["retry_on"] == pol] for pol in POLICIES}
    summary = {pol: {"success_rate_median": statistics.median(r["total"]["success_rate"] for r in rs),
                     "scale_up_s_median": statistics.median(r["scale_up_s"] for r in rs),
                     "scale_down_s_median": statistics.median(r["scale_down_s"] for r in rs)}
               for pol, rs in by.items()}
    for pol, s in summary.items():
        print(f"fleet bench: retry-on '{pol}': success {s['success_rate_median']:.5%} with 2 replicas killed; "
              f"load start -> 2 replicas {s['scale_up_s_median']:.1f}s, light load -> 1 replica "
              f"{s['scale_down_s_median']:.1f}s (medians of {runs})", flush=True)
    harness.write_result("fleet", {
        "bench": "fleet", "quick": a.quick, "clients": clients, "runs_per_policy": runs, "policies": list(POLICIES),
        "autoscaling": AUTOSCALING, "settle_s": settle, "machine": harness.machine(), "results": results,
        "summary": summary, "seconds": time.perf_counter() - t0}, a.out, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
