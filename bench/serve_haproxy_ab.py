"""Study: Ray Serve's HAProxy settings on a small machine, A/B against the bare app.

    python -m bench.serve_haproxy_ab A,N1,M0,N1M0,A,N1,M0,N1M0 15

Per variant (in the order given, each on a fresh local Ray cluster, so Serve's controller, HAProxy
and replicas start with that variant's environment): the serve bench's app (bench/serve_bench.py:
random d_model-512 model, 20k items) at 2 replicas under the distinct workload, then at 1 replica
under the same-candidates workload, each point followed by the same load on the bare app (one
uvicorn process, started once) for SECONDS s; 16 wrk connections. Variants: A = Ray's defaults
(HAProxy nbthread 4, per-request metrics parsed from HAProxy's log datagrams by its manager);
N1 = RAY_SERVE_HAPROXY_NBTHREAD=1; M0 = RAY_SERVE_HAPROXY_METRICS_ENABLED=0 (the replica records
the ingress metrics itself); N1M0 = both. Prints one JSON line per variant (and appends it to
bench/results/serve_haproxy_ab.jsonl): per workload (Serve req/s, bare req/s, ratio, Serve CPU-us per
request, by process, 1-min load average).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, str]] = {
    "A": {}, "N1": {"RAY_SERVE_HAPROXY_NBTHREAD": "1"}, "M0": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
    "N1M0": {"RAY_SERVE_HAPROXY_NBTHREAD": "1", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}}
OUT = Path(__file__).resolve().parent / "results" / "serve_haproxy_ab.jsonl"


def _point(serve_url: str, bare_url: str, bodies: list[dict[str, Any]], seconds: float, serving: list[Any],
           bare_proc: Any) -> list[Any]:
    from bench.serve_bench import http_load

    s = http_load("wrk", serve_url, bodies, 16, seconds, serving)
    b = http_load("wrk", bare_url, bodies, 16, seconds, [bare_proc])
    return [round(s["rps"]), round(b["rps"]), round(s["rps"] / b["rps"], 3), round(s["server_cpu_us_per_request"]),
            {k: round(x) for k, x in s["server_cpu_us_by_process"].items()}, round(s["load1"], 1)]


def main(argv: list[str]) -> int:
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    import psutil
    import ray
    import torch

    from bench.serve_bench import (
        _replicas_running,
        bare,
        bench_config,
        distinct_bodies,
        free_port,
        register_model,
        request_body,
        serve_processes,
        wait_ready,
        write_random_embeddings,
    )
    from embsum.config import replace
    from embsum.runtime import setup_env
    from serve import control as serve_app

    order = (argv[0] if argv else "A,N1,M0,N1M0").split(",")
    seconds = float(argv[1]) if len(argv) > 1 else 15.0
    setup_env()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="embsum-haproxy-ab-"))
    port = free_port()
    cfg = bench_config(work, port)
    version = register_model(cfg)
    write_random_embeddings(cfg, version)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    procs: list[Any] = []
    bare_url = bare("api", cfg_path, version, procs) + "/v1/score"
    bare_proc = psutil.Process(procs[0].pid)
    url = f"http://127.0.0.1:{port}"
    try:
        for name in order:
            for key in {k for v in VARIANTS.values() for k in v}:
                os.environ.pop(key, None)
            os.environ.update(VARIANTS[name])
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            row: dict[str, Any] = {"variant": name, "env": VARIANTS[name], "at": time.time()}
            wide = replace(replace(cfg, "serve.max_replicas", 2), "serve.min_replicas", 2)
            serve_app.deploy(wide)
            _replicas_running(serve_app.APP_NAME, 2)
            wait_ready(url)
            row["distinct_2_replicas"] = _point(url + "/v1/score", bare_url, distinct_bodies(), seconds,
                                                serve_processes(serve_app.APP_NAME), bare_proc)
            serve_app.deploy(cfg)
            _replicas_running(serve_app.APP_NAME, 1)
            wait_ready(url)
            row["same_1_replica"] = _point(url + "/v1/score", bare_url, [request_body()], seconds,
                                           serve_processes(serve_app.APP_NAME), bare_proc)
            print(json.dumps(row), flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            ray.shutdown()
            time.sleep(2)
    finally:
        for p in procs:
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
