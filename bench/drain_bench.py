"""Benchmark: requests lost when a replica behind HAProxy is removed under load, by drain period.

    python -m bench.drain_bench              # 2 x 30 removals per drain period, interleaved (22 min at load 16)
    python -m bench.drain_bench --quick      # 2 x 5 removals each, a smoke pass

Why (issue 13b): a scale-down under load lost 1 request in ~10,000 in the integration test. Ray
Serve's replica drain behind HAProxy (ray/serve/_private/replica.py, _drain_behind_haproxy): the
stopping replica stays reachable for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, then closes
its listener and its idle keep-alive connections. Meanwhile the controller's update reaches the
HAProxy manager, which writes a new config and starts a new HAProxy that takes the listeners over.
If the drain ends first, the HAProxy still routing to the replica may send a request on a
keep-alive connection the replica is closing; HAProxy (http_ana.c, abort_keep_alive) then closes
the client's connection without an answer, expecting the client to retry, and a client that does
not retry a POST (httpx, requests) sees "Server disconnected without sending a response".

This benchmark isolates that path without a Ray cluster, so it runs hundreds of removals in
minutes: HAProxy started and reloaded by Ray Serve's own code (ray.serve._private.haproxy.HAProxyApi:
the config Serve generates, -sf/-x reloads, server-state), stand-in replicas (uvicorn + FastAPI
in their own processes) that drain exactly as a Serve replica does (health check 503, reachable
for the drain period, then uvicorn's graceful shutdown), and closed-loop keep-alive httpx clients
in another process (like bench/fleet.py's). Each removal: a second replica is added (reload),
serves 1 s, starts draining, and ``--lag`` seconds later HAProxy is reloaded without it (the
controller -> HAProxy manager -> reload path measured 0.7-2.3 s on a 2-core machine from Serve's
logs); the removal ends when the replica has exited. A/B: drain periods (default 1 s, what the
tests used before, and 10 s, embsum/runtime.py's LOCAL_SERVE_DRAIN_S), interleaved. Reported per
drain period: requests, failures (with their error), removals, reload seconds. Writes
bench/results/drain.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse

from bench import harness


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- a stand-in replica (run as: python -m bench.drain_bench --replica PORT DRAIN_S) -------------------
def run_replica(port: int, drain_s: float) -> None:
    """uvicorn on ``port``; on SIGUSR1 drain as a Serve replica behind HAProxy does, then exit."""
    import uvicorn
    from fastapi import FastAPI

    app, state = FastAPI(), {"draining": False}

    @app.get("/-/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("DRAINING" if state["draining"] else "success",
                                 status_code=503 if state["draining"] else 200)

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await request.json()
        await asyncio.sleep(0.002)
        return {"pid": os.getpid(), "n": len(body.get("candidates", []))}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, timeout_keep_alive=90,
                                               lifespan="off", access_log=False, log_level="warning", loop="none"))
        server.install_signal_handlers = lambda: None  # as Serve's replica does
        task = loop.create_task(server.serve())

        async def drain() -> None:
            state["draining"] = True  # the health check fails, as _dataplane_health_check's does
            await asyncio.sleep(drain_s)  # phase 1: fully reachable
            server.should_exit = True  # phase 2: close the listener and idle keep-alive connections
            await task
            os._exit(0)

        loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(drain()))
        await task

    asyncio.run(main())


# ---- closed-loop load in its own process (run as: python -m bench.drain_bench --load URL N OUT STOP) ----
def run_load(url: str, clients: int, out: str, stopfile: str) -> None:
    import httpx

    body = {"user_id": "U7", "candidates": [{"item_id": f"n{i}"} for i in range(100)]}
    counts, failures = [0] * clients, []

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not os.path.exists(stopfile):
                t0 = time.time()
                try:
                    r = http.post(url, json=body)
                    if r.status_code != 200:
                        failures.append({"t": t0, "status": r.status_code, "error": r.text[:200]})
                except Exception as e:  # noqa: BLE001 - what the benchmark counts
                    failures.append({"t": t0, "status": 0, "error": f"{type(e).__name__}: {e}"[:200]})
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"requests": sum(counts), "failures": failures}))


# ---- the driver -----------------------------------------------------------------------------------------
class Fleet:
    """HAProxy through Ray Serve's HAProxyApi in front of stand-in replicas."""

    def __init__(self, work: Path) -> None:
        from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
        from ray.serve.config import HTTPOptions

        self.port = free_port()
        cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=self.port), is_head=True,
                            socket_path=str(work / "admin.sock"), server_state_base=str(work),
                            server_state_file=str(work / "server-state"), metrics_socket_path=str(work / "m.sock"),
                            stats_port=free_port(), metrics_port=free_port(), log_target="stdout",
                            retry_on="conn-failure empty-response")  # serve/ingress.py's HAPROXY_RETRY
        self.api = HAProxyApi(cfg=cfg, config_file_path=str(work / "haproxy.cfg"))
        self.loop = asyncio.new_event_loop()
        self.procs: dict[int, subprocess.Popen] = {}
        self.reload_s: list[float] = []

    def replica(self, drain_s: float) -> int:
        import httpx

        port = free_port()
        self.procs[port] = subprocess.Popen([sys.executable, "-m", "bench.drain_bench", "--replica", str(port),
                                             str(drain_s)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=1).status_code == 200:
                    return port
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"stand-in replica on port {port} did not start")

    def serve(self, ports: list[int], *, start: bool = False) -> None:
        from ray.serve._private.haproxy import BackendConfig, ServerConfig

        servers = [ServerConfig(name=f"R{p}", host="127.0.0.1", port=p) for p in ports]
        self.api.set_backend_configs({"http-app": BackendConfig(name="http-app", path_prefix="/", app_name="app",
                                                                servers=servers)})
        t0 = time.monotonic()
        self.loop.run_until_complete(self.api.start() if start else self.api.reload())
        if not start:
            self.reload_s.append(time.monotonic() - t0)

    def close(self) -> None:
        self.loop.run_until_complete(self.api.stop())
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


def one_run(drain_s: float, removals: int, clients: int, lag_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="drain-bench-") as tmp:
        work = Path(tmp)
        fleet = Fleet(work)
        stable = fleet.replica(drain_s)
        fleet.serve([stable], start=True)
        stop, out = work / "STOP", work / "load.json"
        load = subprocess.Popen([sys.executable, "-m", "bench.drain_bench", "--load", f"http://127.0.0.1:{fleet.port}"
                                 "/v1/score", str(clients), str(out), str(stop)])
        t0 = time.monotonic()
        try:
            time.sleep(2)
            for _ in range(removals):
                extra = fleet.replica(drain_s)
                fleet.serve([stable, extra])
                time.sleep(1.0)
                fleet.procs[extra].send_signal(signal.SIGUSR1)  # the controller stops the replica ...
                time.sleep(lag_s)  # ... and HAProxy hears of it this much later
                fleet.serve([stable])
                fleet.procs[extra].wait(drain_s + 30)
                time.sleep(0.3)
        finally:
            stop.touch()
            load.wait(60)
            fleet.close()
        result = json.loads(out.read_text())
    failures = result["failures"]
    errors: dict[str, int] = {}
    for f in failures:
        errors[f["error"]] = errors.get(f["error"], 0) + 1
    return {"drain_s": drain_s, "lag_s": lag_s, "removals": removals, "requests": result["requests"],
            "failed": len(failures), "errors": errors, "seconds": time.monotonic() - t0,
            "reload_s": {"median": sorted(fleet.reload_s)[len(fleet.reload_s) // 2], "max": max(fleet.reload_s)}}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--replica"]:
        run_replica(int(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["--load"]:
        run_load(argv[1], int(argv[2]), argv[3], argv[4])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.drain_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 removals per run")
    p.add_argument("--drains", default="1,10", help="drain periods to compare, seconds")
    p.add_argument("--runs", type=int, default=2, help="runs per drain period, interleaved")
    p.add_argument("--removals", type=int, default=None, help="replica removals per run (default 30, quick 5)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--lag", type=float, default=1.5, help="seconds from the drain's start to HAProxy's reload")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    harness.setup()
    removals = a.removals or (5 if a.quick else 30)
    drains = [float(x) for x in a.drains.split(",")]
    t0 = time.perf_counter()
    results = []
    for i in range(a.runs):
        for drain in drains:  # interleaved: machine load drifts hit every drain period alike
            r = one_run(drain, removals, a.clients, a.lag)
            results.append(r)
            print(f"[drain bench] run {i + 1} drain {drain:g}s: {r['failed']} of {r['requests']} requests failed in "
                  f"{r['removals']} removals (reload median {r['reload_s']['median']:.2f}s, max "
                  f"{r['reload_s']['max']:.2f}s) {r['errors'] or ''}", flush=True)
    summary = {}
    for drain in drains:
        rs = [r for r in results if r["drain_s"] == drain]
        n, failed = sum(r["requests"] for r in rs), sum(r["failed"] for r in rs)
        summary[f"{drain:g}"] = {"requests": n, "failed": failed, "per_10k": 1e4 * failed / n if n else float("nan"),
                                 "removals": sum(r["removals"] for r in rs)}
        print(f"drain bench: drain {drain:g}s, HAProxy told {a.lag:g}s after the drain started: {failed} of {n} "
              f"requests lost in {summary[f'{drain:g}']['removals']} removals under load", flush=True)
    harness.write_result("drain", {"bench": "drain", "quick": a.quick, "clients": a.clients, "lag_s": a.lag,
                                   "machine": harness.machine(), "results": results, "summary": summary,
                                   "seconds": time.perf_counter() - t0}, a.out, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
