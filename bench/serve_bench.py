"""Benchmark: the Ray Serve app vs a bare FastAPI app vs the in-process score() call, with the
floor of each HTTP path measured beside it.

    python -m bench.serve_bench            # 30 s per point (about 12 minutes in all)
    python -m bench.serve_bench --quick    # 5 s per point, a smoke test

Workloads, each a closed loop on loopback for a bounded time: 'same', POST /v1/score for 1 known
user x the same 100 precomputed candidates at 1, 4 and 16 concurrent clients (a batch of them
shares its candidates: scored all pairs over their union); 'distinct', every request a different
user with a different set of 100 candidates (512 request bodies sent round robin over 20,000
items and 1,000 users) at 1 and 16 clients (a batch gathers each request's own candidates); then,
at 16 clients, the app at 2 replicas (the config's default max_replicas) against the bare app in 1
process and in 2 uvicorn workers.
Embeddings are random (scoring-only figures do not depend on their values) with t5-small's width:
d_model = 512, M = 8 user codes, N = 4 content codes; the registered model is a random-init T5 of
that width but one layer deep (only the cold path would run it, and these workloads have none).
One after another, in one invocation, on the same inputs:

- in-process: ``score()`` on the user's UPE and the 100 candidates' CPE, and ``engine.score_batch``
  (adds the id lookups, the gather and the response objects), one caller;
- bare app: the same API code (serve/api.py) over the same bundle in one uvicorn process, no Ray;
- Serve: ``serve.control.deploy`` (one deployment, EmbSumScorer: HTTP ingress + @serve.batch scorer)
  behind each HTTP ingress of ``--ingress`` (default: 'haproxy', the config's default, then
  'proxy', Serve's Python proxy), with each ``--waits`` batch wait;
- floors: a no-op route (reads the same request body, answers the same response bytes, does
  nothing else) under bare uvicorn and as a one-replica Serve deployment behind each ingress: what
  the HTTP path itself costs, Serve's own overhead included, with no scoring at all.

Load generator: ``wrk`` when it is on PATH (a C client: one thread, epoll, next to no CPU, so it
does not starve the server on a 2-core machine), else a minimal keep-alive HTTP/1.1 client on
asyncio in this process. The same one is used for every point. torch runs one intra-op thread
everywhere (as a serve.num_cpus=1 replica does). The 1-minute load average is recorded before
each point: on a shared machine absolute figures move with it; the side-by-side ratios are the
point. The CPU model is recorded with the results: per-request costs differ between CPUs, so a
figure belongs to the machine it was measured on.

Also: ``score()`` over a 10k-item catalog vs a plain GEMM of the same FLOPs; and /v1/recommend
(top 10) over a 200,000-item catalog (its own random model, d_model 128 to keep the catalog at
0.8 GB per copy) against the in-process ``score()`` + top-k of the same user, one request at a
time, the two alternating (target: Serve's p50 within 3 ms). Prints a table and writes
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response

from bench import harness
from embsum.config import Config, config_from_dict
from embsum.runtime import setup_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"
N_ITEMS, N_USERS, N_CANDIDATES = 20_000, 1000, 100
N_BODIES = 512  # the distinct workload's request bodies
CATALOG = 10_000
BIG_CATALOG, BIG_CATALOG_D = 200_000, 128
TARGET_RECOMMEND_ADDED_MS = 3.0
MODEL = dict(random_init=True, tokenizer="bundled", d_model=512, d_kv=64, d_ff=1024, num_layers=1,
             num_decoder_layers=1, num_heads=8, user_codes=8, content_codes=4, dropout=0.0)
FLOOR_PREFIX = "/floor"
SCALE_OUT = 2  # replicas (and bare uvicorn workers) of the scale-out point: the config's default max_replicas
TARGET_ADDED_P50_MS = 2.0


# ---- setup: a registered model and random embeddings in the embed job's format ---------------------
def bench_config(work: Path, port: int, batch_wait: float | None = None, ingress: str | None = None,
                 model: dict[str, Any] | None = None) -> Config:
    serve: dict[str, Any] = {"port": port, "min_replicas": 1, "max_replicas": 1, "num_cpus": 1}
    if batch_wait is not None:
        serve["batch_wait_timeout_s"] = batch_wait
    if ingress is not None:
        serve["ingress"] = ingress
    return config_from_dict({"workdir": str(work), "model": model or MODEL, "serve": serve})


def register_model(cfg: Config) -> str:
    import torch

    from embsum.checkpoint import save_model
    from embsum.model import EmbSum
    from embsum.registry import Registry
    from embsum.tokenization import EmbSumTokenizer

    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, seed=0)
    with torch.no_grad():
        model.item_gate.weight.mul_(4.0)
    path = save_model(model.eval(), tok, cfg.workdir_path / "model")
    registry = Registry(cfg)
    run_id = registry.start_run("serve-bench")
    version = registry.log_and_register(run_id, path)
    registry.end_run(run_id)
    registry.promote(version)
    return version


def write_random_embeddings(cfg: Config, version: str, n_items: int = N_ITEMS, n_users: int = N_USERS) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embsum.arrow_tensors import tensor_array
    from embsum.embeddings import ITEMS_DIR, USERS_DIR, Manifest, version_dir, write_manifest

    rng = np.random.default_rng(0)
    m, n, d = cfg.model.user_codes, cfg.model.content_codes, cfg.model.d_model
    out = version_dir(cfg.embeddings_dir, version)
    (out / ITEMS_DIR).mkdir(parents=True)
    (out / USERS_DIR).mkdir(parents=True)
    cpe = rng.standard_normal((n_items, n, d), dtype=np.float32) / np.sqrt(d)
    key = np.maximum(rng.standard_normal((n_items, n, d), dtype=np.float32), 0)  # gelu-like: mostly >= 0
    upe = rng.standard_normal((n_users, m, d), dtype=np.float32)
    pq.write_table(pa.table({"item_id": [f"n{i}" for i in range(n_items)],
                             "text": [f"item {i}" for i in range(n_items)],
                             "cpe": tensor_array(cpe), "cpe_key": tensor_array(key)}),
                   out / ITEMS_DIR / "part-0.parquet")
    pq.write_table(pa.table({"user_id": [f"U{u}" for u in range(n_users)],
                             "history": pa.array([[f"n{u}"] for u in range(n_users)], pa.list_(pa.string())),
                             "upe": tensor_array(upe), "summary": [""] * n_users}),
                   out / USERS_DIR / "part-0.parquet")
    write_manifest(out, Manifest(model_name=cfg.mlflow.registered_model, model_version=version, model_fingerprint="",
                                 items=n_items, users=n_users, dtype="float32", user_codes=m, content_codes=n,
                                 d_model=d))


def request_body() -> dict[str, Any]:
    ids = np.random.default_rng(1).choice(N_ITEMS, size=N_CANDIDATES, replace=False)
    return {"user_id": "U7", "candidates": [{"item_id": f"n{i}"} for i in ids]}


def distinct_bodies(n: int = N_BODIES) -> list[dict[str, Any]]:
    """``n`` requests, each for a different user (round robin over the users) and its own random
    100 of the 20k items: concurrent requests share (almost) nothing."""
    rng = np.random.default_rng(3)
    return [{"user_id": f"U{i % N_USERS}",
             "candidates": [{"item_id": f"n{j}"} for j in rng.choice(N_ITEMS, size=N_CANDIDATES, replace=False)]}
            for i in range(n)]


# ---- measurement ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(latencies_s: list[float], seconds: float, errors: int = 0) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rps": len(ms) / seconds, "requests": len(ms), "errors": errors}


def timed_loop(fn: Any, seconds: float) -> dict[str, float]:
    for _ in range(20):  # warm-up
        fn()
    load1 = os.getloadavg()[0]
    lat, end = [], time.perf_counter() + seconds
    t_start = time.perf_counter()
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return {**summarize(lat, time.perf_counter() - t_start), "load1": load1}


def load_client(choice: str) -> str:
    if choice in ("auto", "wrk") and shutil.which("wrk"):
        return "wrk"
    if choice == "wrk":
        raise SystemExit("wrk is not on PATH (apt-get install wrk), or use --client python")
    return "python"


def http_load(client: str, url: str, bodies: list[dict[str, Any]], clients: int, seconds: float,
              procs: Any = ()) -> dict[str, float]:
    """POST ``bodies`` (round robin across all connections; one body: the same request every
    time) to ``url`` from ``clients`` keep-alive connections in a closed loop (each sends its next
    request on the answer) for ``seconds``, after a warm-up of the same shape. With ``procs`` (the
    serving processes): their CPU time per measured request (``server_cpu_us_per_request``), the
    work a request costs the server, which a busy machine stretches in time but does not add to."""
    payloads = [json.dumps(b).encode() for b in bodies]
    warmup = min(1.0, seconds / 5)
    run = _wrk if client == "wrk" else lambda *a: asyncio.run(_py_load(*a))
    run(url, payloads, clients, warmup)
    load1, cpu0 = os.getloadavg()[0], cpu_seconds(procs)
    point = {**run(url, payloads, clients, seconds), "load1": load1}
    cpu1 = cpu_seconds(procs)
    by = {k: (cpu1[k] - cpu0.get(k, 0.0)) / max(point["requests"], 1) * 1e6 for k in cpu1}
    point["server_cpu_us_per_request"] = sum(by.values()) if by else float("nan")
    point["server_cpu_us_by_process"] = by
    return point


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _wrk(url: str, payloads: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        head = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        if len(payloads) == 1:
            (Path(tmp) / "body.json").write_bytes(payloads[0])
            script.write_text(head + f'local f = io.open("{tmp}/body.json", "rb")\nwrk.body = f:read("*all")\n'
                                     f'f:close()\n')
        else:  # one body per line (compact JSON has no newline), sent round robin
            (Path(tmp) / "bodies.jsonl").write_bytes(b"\n".join(payloads) + b"\n")
            script.write_text(head + f'local bodies = {{}}\nfor line in io.lines("{tmp}/bodies.jsonl") do '
                                     f'bodies[#bodies + 1] = line end\nlocal i = 0\nrequest = function()\n'
                                     f'  i = i + 1\n  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\n'
                                     f'end\n')
        out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                              "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout

    def ms(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else float("nan")

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    count = re.search(r"^\s*(\d+) requests in", out, re.M)
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    bad += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"p50_ms": ms("50"), "p99_ms": ms("99"), "rps": float(rps.group(1)) if rps else 0.0,
            "requests": int(count.group(1)) if count else 0, "errors": bad}


async def _py_load(url: str, payloads: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """The fallback load generator: minimal keep-alive HTTP/1.1 clients on one asyncio loop."""
    host, rest = url.removeprefix("http://").split(":", 1)
    port, _, path = rest.partition("/")
    requests = [(f"POST /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload for payload in payloads]
    sent = 0
    latencies: list[float] = []
    errors = 0
    t_end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while (t0 := time.perf_counter()) < t_end:
                writer.write(requests[sent % len(requests)])
                sent += 1
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return summarize(latencies, seconds, errors)


def wait_ready(url: str, timeout_s: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never became ready")


def check_scores(url: str, body: dict[str, Any], want: np.ndarray) -> bytes:
    """The served scores equal the offline ones; returns the response body (the floors answer it)."""
    import httpx

    r = httpx.post(url + "/v1/score", json=body, timeout=30)
    np.testing.assert_allclose([s["score"] for s in r.json()["scores"]], want, rtol=0, atol=1e-4)
    return r.content


def catalog_vs_gemm(seconds: float) -> dict[str, Any]:
    """score() of U users against a 10k catalog vs one plain GEMM with the same FLOPs."""
    import torch

    from embsum.scoring import score

    rng = np.random.default_rng(2)
    m, n, d = MODEL["user_codes"], MODEL["content_codes"], MODEL["d_model"]
    cpe = torch.from_numpy(rng.standard_normal((CATALOG, n, d), dtype=np.float32))
    key = torch.from_numpy(rng.standard_normal((CATALOG, n, d), dtype=np.float32))
    out: dict[str, Any] = {}
    for users in (1, 16):
        upe = torch.from_numpy(rng.standard_normal((users, m, d), dtype=np.float32))
        a = upe.reshape(users * m, d)
        b = torch.cat([cpe, key]).reshape(2 * CATALOG * n, d).T.contiguous()  # (D, 2*I*N): the same FLOPs
        flops = 2.0 * (users * m) * d * (2 * CATALOG * n)
        with torch.inference_mode():
            s = timed_loop(lambda u=upe: score(u, cpe, key), seconds)
            g = timed_loop(lambda a=a, b=b: a @ b, seconds)
        out[f"users_{users}"] = {"score_ms": s["p50_ms"], "gemm_ms": g["p50_ms"], "gflops": flops / 1e9,
                                 "score_gflops_per_s": flops / 1e6 / s["p50_ms"],
                                 "gemm_gflops_per_s": flops / 1e6 / g["p50_ms"],
                                 "ratio": g["p50_ms"] / s["p50_ms"]}
    return out


# ---- the no-op floor app and the bare app (a subprocess: one uvicorn process, no Ray) --------------
def floor_api(response: bytes) -> FastAPI:
    """POST /v1/score that reads the request body and answers ``response``: the HTTP path, no work."""
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        await request.body()
        return Response(response, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ok"}

    return app


BARE_ENV = "EMBSUM_BENCH_BARE_APP"  # the 2-worker bare app's workers read their config path and version here


def bare_api(cfg_path: str, version: str) -> FastAPI:
    """The API code over ``version``'s bundle in this process, no Ray: the bare app."""
    from serve.api import ApiSettings, InProcessScorer, build_api
    from serve.bundle import load_bundle

    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    return build_api(InProcessScorer(load_bundle(cfg, version)), ApiSettings.from_config(cfg.serve))


def bare_api_factory() -> FastAPI:
    """The bare app in a uvicorn worker process ('api2': uvicorn starts each worker from this)."""
    import torch

    setup_env()
    torch.set_num_threads(1)
    return bare_api(*json.loads(os.environ[BARE_ENV]))


def run_bare_app(mode: str, cfg_path: str, arg: str, port: int) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(1)
    if mode == "api2":  # the same app in 2 uvicorn worker processes: what 2 replicas are compared with
        os.environ[BARE_ENV] = json.dumps([cfg_path, arg])
        uvicorn.run("bench.serve_bench:bare_api_factory", factory=True, workers=SCALE_OUT, host="127.0.0.1",
                    port=port, log_level="warning", access_log=False)
        return
    app = floor_api(Path(arg).read_bytes()) if mode == "floor" else bare_api(cfg_path, arg)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def bare(mode: str, cfg_path: Path, arg: str, procs: list[subprocess.Popen]) -> str:
    """Start the bare app ('api'; 'api2': in 2 uvicorn workers) or the bare floor ('floor') in a
    subprocess (added to ``procs``)."""
    port = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "bench.serve_bench", "--bare-app", mode, str(cfg_path), arg,
                                   str(port)], cwd=REPO))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def deploy_floor(response: bytes) -> None:
    """The floor as a Serve app: one replica of a no-op FastAPI ingress at /floor (Serve must be
    running already: ``serve_app.deploy`` started it with the ingress under test)."""
    from ray import serve

    @serve.deployment(name="Floor", num_replicas=1, ray_actor_options={"num_cpus": 1})
    @serve.ingress(floor_api(response))
    class Floor:
        pass

    serve.run(Floor.bind(), name="floor", route_prefix=FLOOR_PREFIX, blocking=False)


def catalog_point(work: Path, port: int, n_items: int, requests: int) -> dict[str, Any]:
    """/v1/recommend (k=10) over an ``n_items`` catalog, served by its own app at /catalog, vs the
    in-process ``score()`` + ``top_k`` of the same user on the same arrays: one request at a time,
    the two alternating (ABBA), so both see the same moments of a shared machine. The replica's own
    time (its Server-Timing header) splits Serve's figure into the score in the replica's process and
    what Serve's request path adds: the score alone moves by more than 3 ms between two processes
    holding their own copies of the 0.8 GB catalog (where the memory sits, who else reads memory)."""
    import httpx
    import torch

    from embsum.config import replace
    from embsum.scoring import score
    from serve import control as serve_app
    from serve.bundle import load_bundle
    from serve.engine import top_k

    model = {**MODEL, "d_model": BIG_CATALOG_D, "d_kv": BIG_CATALOG_D // 8, "d_ff": 2 * BIG_CATALOG_D}
    cfg = replace(bench_config(work, port, model=model), "serve.route_prefix", "/catalog")
    version = register_model(cfg)
    write_random_embeddings(cfg, version, n_items=n_items, n_users=100)
    store = load_bundle(cfg, version).store
    serve_app.deploy(cfg, name="catalog")
    url = f"http://127.0.0.1:{port}/catalog"
    wait_ready(url)
    u = store.user_index["U7"]
    upe, cpe, key = (torch.from_numpy(a) for a in (store.upe[u:u + 1], store.cpe, store.cpe_key))

    def inprocess() -> np.ndarray:
        with torch.inference_mode():
            return top_k(score(upe, cpe, key).numpy()[0], 10)  # (I,) -> the 10 best rows

    body = {"user_id": "U7", "k": 10, "exclude_history": False}
    with httpx.Client(timeout=60) as http:
        got = http.post(url + "/v1/recommend", json=body).json()
        want = [store.item_ids[r] for r in inprocess()]
        if [x["item_id"] for x in got["items"]] != want:
            raise RuntimeError(f"/v1/recommend over {n_items} items disagrees with score()+top_k: "
                               f"{[x['item_id'] for x in got['items']]} vs {want}")
        local, served, app = [], [], []

        def call() -> float:
            r = http.post(url + "/v1/recommend", json=body)
            r.raise_for_status()
            return float(r.headers["server-timing"].split("dur=")[1])  # the replica's own time, ms

        for i in range(requests + 4):  # the first 4 pairs warm up; the order alternates (ABBA)
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for side in order:
                t0 = time.perf_counter()
                if side:
                    app_ms = call()
                else:
                    inprocess()
                dt = (time.perf_counter() - t0) * 1e3
                if i < 4:
                    continue
                if side:
                    served.append(dt)
                    app.append(app_ms)
                else:
                    local.append(dt)
    serve_app.shutdown("catalog")
    p50_local, p50_served = float(np.median(local)), float(np.median(served))
    added = np.asarray(served) - np.asarray(local)
    boot = np.random.default_rng(0).choice(added, (2000, len(added))).mean(axis=1) if len(added) else np.zeros(1)
    return {"items": n_items, "d_model": BIG_CATALOG_D, "k": 10, "requests": requests,
            "inprocess_p50_ms": p50_local, "serve_p50_ms": p50_served, "added_p50_ms": p50_served - p50_local,
            "paired_median_added_ms": float(np.median(added)),
            "paired_mean_added_ms": float(added.mean()) if len(added) else 0.0,
            "paired_mean_added_ci95_ms": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
            # What Serve's request path adds (client latency minus the app's own time, Server-Timing),
            # apart from how fast the replica's process ran the same score as this one.
            "serve_app_p50_ms": float(np.median(app)), "serve_path_p50_ms": float(np.median(np.asarray(served) - app)),
            "target_added_ms": TARGET_RECOMMEND_ADDED_MS}


# ---- main -------------------------------------------------------------------------------------------------
def combine(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """One point from its interleaved rounds: median p50 / p99 / load average, mean requests/s."""
    def med(k: str) -> float:
        return float(np.median([r[k] for r in rounds]))

    return {"p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "rps": float(np.mean([r["rps"] for r in rounds])),
            "requests": int(sum(r["requests"] for r in rounds)), "errors": int(sum(r["errors"] for r in rounds)),
            "load1": med("load1"), "server_cpu_us_per_request": med("server_cpu_us_per_request"),
            "server_cpu_us_by_process": {k: float(np.median([r["server_cpu_us_by_process"].get(k, 0.0)
                                                             for r in rounds]))
                                         for k in rounds[0].get("server_cpu_us_by_process", {})},
            "rounds": rounds}


def serve_processes(app: str) -> list[Any]:
    """The processes that serve a Serve application here: its replica(s), HAProxy, and the proxy
    actor that manages HAProxy (it reads HAProxy's per-request metrics log lines) or, with the
    'proxy' ingress, is the HTTP proxy. Descendants of this process only: another user's Serve on
    the machine is not counted."""
    import psutil

    mine = (f"ray::ServeReplica:{app}:", "ray::HAProxyManager", "ray::ProxyActor")
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
            if proc.name() == "haproxy" or (cmd and cmd[0].startswith(mine)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def cpu_seconds(procs: list[Any]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each kind of serving process (replica, haproxy, the
    proxy actor, the bare app's uvicorn)."""
    import psutil

    out: dict[str, float] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        label = "haproxy" if proc.name() == "haproxy" else \
            cmd[0].split(":")[2] if cmd and cmd[0].startswith("ray::ServeReplica:") else \
            cmd[0].removeprefix("ray::").split(".")[0] if cmd and cmd[0].startswith("ray::") else "uvicorn"
        out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def interleaved(client: str, bodies: list[dict[str, Any]], targets: dict[str, str], clients: list[int],
                seconds: float, rounds: int, procs_of: Any = None) -> dict[str, dict[int, dict[str, Any]]]:
    """Every target at every client count, ``rounds`` times round-robin (seconds / rounds each): the
    systems compared share the same minutes of a machine whose load drifts. ``procs_of(target)``:
    the processes serving it, whose CPU time per request each point records."""
    got: dict[str, dict[int, list[dict[str, float]]]] = {t: {c: [] for c in clients} for t in targets}
    for _ in range(rounds):
        for c in clients:
            for name, url in targets.items():
                procs = procs_of(name) if procs_of else []
                got[name][c].append(http_load(client, url, bodies, c, seconds / rounds, procs))
    return {name: {c: combine(rs) for c, rs in by_c.items()} for name, by_c in got.items()}


def _replicas(app: str) -> int:
    """Replica processes of ``app`` now (one that exits while being looked at is not counted)."""
    import psutil

    n = 0
    for proc in serve_processes(app):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        n += bool(cmd) and cmd[0].startswith("ray::ServeReplica:")
    return n


def _replicas_running(app: str, n: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _replicas(app) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve app {app!r} did not reach {n} replica(s) in {timeout_s:.0f}s")
        time.sleep(0.5)


def scale_out_point(client: str, bodies: list[dict[str, Any]], cfg: Config, urls: dict[str, str], clients: int,
                    seconds: float, rounds: int, procs_of: Any) -> dict[str, dict[int, dict[str, Any]]]:
    """The distinct workload with the app at SCALE_OUT replicas (1 CPU and 1 torch thread each; the
    config's default max_replicas, pinned so no autoscaling ramp is measured) against the bare app
    in 1 process and in SCALE_OUT uvicorn workers: on a 2-core machine, what using the second core
    gives each. Then the app goes back to 1 replica."""
    from embsum.config import replace
    from serve import control as serve_app

    wide = replace(replace(cfg, "serve.max_replicas", SCALE_OUT), "serve.min_replicas", SCALE_OUT)
    serve_app.deploy(wide)
    _replicas_running(serve_app.APP_NAME, SCALE_OUT)
    wait_ready(urls["serve_distinct_scaled"].removesuffix("/v1/score"))
    got = interleaved(client, bodies, urls, [clients], seconds, rounds, procs_of)
    serve_app.deploy(cfg)
    _replicas_running(serve_app.APP_NAME, 1)
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 s per point instead of 30")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (each seconds/rounds long)")
    p.add_argument("--ingress", default="haproxy,proxy", help="Serve HTTP ingresses to measure, the first is primary")
    p.add_argument("--waits", default="", help="batch waits (s) of the primary ingress; default: the config's")
    p.add_argument("--client", default="auto", choices=["auto", "wrk", "python"], help="load generator")
    p.add_argument("--workloads", default="same,distinct", help="same: 1 user x the same 100 candidates; "
                   "distinct: every request another user and candidate set")
    p.add_argument("--catalog-items", type=int, default=None,
                   help=f"/v1/recommend catalog size (default {BIG_CATALOG:,}; quick: a tenth; 0 = skip)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--bare-app", nargs=4, metavar=("MODE", "CONFIG_JSON", "ARG", "PORT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    setup_env()
    if a.bare_app:
        run_bare_app(a.bare_app[0], a.bare_app[1], a.bare_app[2], int(a.bare_app[3]))
        return 0

    import psutil
    import ray
    import torch

    from embsum.config import replace
    from embsum.predictor import Predictor
    from serve import control as serve_app
    from serve import engine
    from serve.bundle import load_bundle
    from serve.engine import ScoreQuery

    # Stopping replicas keep answering this long so HAProxy can drain them (30 s by default):
    # nothing here routes to a replica the bench stops.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    torch.set_num_threads(1)
    seconds = 5.0 if a.quick else 30.0
    rounds = 1 if a.quick else max(1, a.rounds)
    clients = [int(c) for c in a.clients.split(",")]
    ends = sorted({clients[0], clients[-1]})
    ingresses = [x for x in a.ingress.split(",") if x]
    client = load_client(a.client)
    work = Path(tempfile.mkdtemp(prefix="embsum-serve-bench-"))
    cfg = bench_config(work, free_port())
    waits = [float(w) for w in a.waits.split(",") if w] or [cfg.serve.batch_wait_timeout_s]
    t0 = time.perf_counter()
    version = register_model(cfg)
    write_random_embeddings(cfg, version)
    bundle = load_bundle(cfg, version)
    body = request_body()
    s = bundle.store
    rows = [s.item_index[c["item_id"]] for c in body["candidates"]]
    u = s.user_index[body["user_id"]]
    upe, cpe, key = s.upe[u:u + 1].copy(), s.cpe[rows].copy(), s.cpe_key[rows].copy()
    want = Predictor.score(upe, cpe, key)[0]
    workloads = [w for w in a.workloads.split(",") if w]
    distinct = distinct_bodies()
    n_catalog = a.catalog_items if a.catalog_items is not None else (BIG_CATALOG // 10 if a.quick else BIG_CATALOG)
    machine = {**harness.machine(), "load_avg_start": os.getloadavg()}
    print(f"[bench] setup {time.perf_counter() - t0:.1f}s; {seconds:.0f}s per point in {rounds} interleaved "
          f"round(s); clients {clients}; workloads {workloads}; ingress {ingresses}; batch waits {waits}; load "
          f"generator {client}; CPU {machine.get('cpu_model', '?')}; load avg {os.getloadavg()[0]:.1f}", flush=True)

    results: dict[str, Any] = {"config": {"seconds_per_point": seconds, "rounds": rounds, "clients": clients,
                                          "items": N_ITEMS, "users": N_USERS, "candidates": N_CANDIDATES,
                                          "distinct_bodies": N_BODIES, "workloads": workloads, "model": MODEL,
                                          "torch_threads": 1, "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
                                          "waits": waits, "max_batch_size": cfg.serve.max_batch_size,
                                          "ingress": ingresses, "load_generator": client, "replicas": 1,
                                          "scale_out": SCALE_OUT},
                               "machine": machine}
    with torch.inference_mode():
        results["inprocess_score"] = timed_loop(lambda: Predictor.score(upe, cpe, key), seconds)
    query = ScoreQuery(user_id=body["user_id"], history=None,
                       candidates=[(c["item_id"], None) for c in body["candidates"]])
    results["inprocess_engine"] = timed_loop(lambda: engine.score_batch(bundle, [query]), seconds)
    print(f"[bench] in-process score() p50 {results['inprocess_score']['p50_ms']:.3f} ms, engine.score_batch p50 "
          f"{results['inprocess_engine']['p50_ms']:.3f} ms", flush=True)

    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    procs: list[subprocess.Popen] = []
    ray_started = False
    try:
        bare_url = bare("api", cfg_path, version, procs)
        response = check_scores(bare_url, body, want)
        distinct_want = [_offline(s, b) for b in distinct[:3]]
        for b, w in zip(distinct[:3], distinct_want, strict=True):
            check_scores(bare_url, b, w)
        (work / "response.json").write_bytes(response)
        bare_floor_url = bare("floor", cfg_path, str(work / "response.json"), procs)
        bare_procs = {"api": procs[0], "floor": procs[1]}  # the bare servers, by what they serve
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        ray_started = True
        base = f"http://127.0.0.1:{cfg.serve.port}"
        for phase, ingress in enumerate(ingresses):
            prefix, during = ("serve", "") if phase == 0 else (f"serve_{ingress}", f"_during_{ingress}")
            targets = {f"bare{during}": bare_url + "/v1/score"}
            for i, wait in enumerate(waits if phase == 0 else waits[:1]):
                route = "/" if i == 0 else f"/wait{i}"
                run_cfg = replace(bench_config(work, cfg.serve.port, batch_wait=wait, ingress=ingress),
                                  "serve.route_prefix", route)
                serve_app.deploy(run_cfg, name=serve_app.APP_NAME if i == 0 else f"embsum-wait{i}")
                if i == 0:
                    primary_cfg = run_cfg  # the app at "/", the one the distinct workload hits
                url = base + route.rstrip("/")
                wait_ready(url)
                check_scores(url, body, want)
                targets[f"{prefix}_wait_{wait:g}"] = url + "/v1/score"
            deploy_floor(response)  # last: an imperative app beside the declarative ones
            wait_ready(base + FLOOR_PREFIX)
            apps = {f"{prefix}_wait_{w:g}": serve_app.APP_NAME if i == 0 else f"embsum-wait{i}"
                    for i, w in enumerate(waits)}

            def procs_of(name: str, apps: dict[str, str] = apps) -> list[Any]:
                if name.startswith("bare"):
                    kind = "api2" if name.endswith("_scaled") else "floor" if "floor" in name else "api"
                    proc = psutil.Process(bare_procs[kind].pid)
                    return [proc, *proc.children(recursive=True)]
                return serve_processes("floor" if name.endswith("_floor") else apps.get(name, serve_app.APP_NAME))

            names = []
            if "same" in workloads:
                results.update(interleaved(client, [body], targets, clients, seconds, rounds, procs_of))
                names += list(targets)
            if phase == 0 and "distinct" in workloads:
                for b, w in zip(distinct[:3], distinct_want, strict=True):
                    check_scores(base, b, w)
                pair = {"bare_distinct": bare_url + "/v1/score", "serve_distinct": base + "/v1/score"}
                results.update(interleaved(client, distinct, pair, ends, seconds, rounds, procs_of))
                names += list(pair)
                # Its own 2-worker bare app, only for this point: each worker holds a bundle (0.6 GB here),
                # memory the points after it (the 200k-item catalog) should not compete with.
                bare2_url = bare("api2", cfg_path, version, procs)
                bare_procs["api2"] = procs[-1]
                wide = {"bare_distinct_1p": bare_url + "/v1/score", "bare_distinct_scaled": bare2_url + "/v1/score",
                        "serve_distinct_scaled": base + "/v1/score"}
                try:
                    results.update(scale_out_point(client, distinct, primary_cfg, wide, ends[-1], seconds, rounds,
                                                   procs_of))
                finally:
                    bare_procs["api2"].terminate()
                    bare_procs["api2"].wait(30)
                names += list(wide)
            floors = {f"bare_floor{during}": bare_floor_url + "/v1/score",
                      f"{prefix}_floor": base + FLOOR_PREFIX + "/v1/score"}
            results.update(interleaved(client, [body], floors, ends, seconds, rounds, procs_of))
            for name in (*names, *floors):
                print(f"[bench] {name}: {_brief(results[name])}", flush=True)
            if phase == 0 and n_catalog:
                results["recommend_catalog"] = catalog_point(work / "catalog", cfg.serve.port, n_catalog,
                                                             20 if a.quick else 100)
                print(f"[bench] recommend_catalog: {results['recommend_catalog']}", flush=True)
            serve_app.shutdown()  # the ingress is chosen when Serve starts
    finally:
        if ray_started:
            serve_app.shutdown()
            ray.shutdown()
        for proc in procs:
            proc.terminate()
            proc.wait(30)

    results["catalog_vs_gemm"] = catalog_vs_gemm(min(seconds, 10.0))
    results["machine"]["load_avg_end"] = os.getloadavg()
    report(results, clients, ingresses, waits)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"[bench] wrote {out}")
    return 0


def _offline(store: Any, body: dict[str, Any]) -> np.ndarray:
    """The scores ``body`` must get: the offline ``score`` on the stored embeddings."""
    from embsum.predictor import Predictor

    rows = [store.item_index[c["item_id"]] for c in body["candidates"]]
    u = store.user_index[body["user_id"]]
    return Predictor.score(store.upe[u:u + 1], store.cpe[rows], store.cpe_key[rows])[0]


def _brief(points: dict[int, dict[str, Any]]) -> str:
    return ", ".join(f"{c}: p50 {r['p50_ms']:.2f} ms {r['rps']:.0f}/s, server CPU {r['server_cpu_us_per_request']:.0f} "
                     f"us/req (" + " ".join(f"{k} {v:.0f}" for k, v in r["server_cpu_us_by_process"].items()) + ")"
                     + (f" ({r['errors']} errors)" if r["errors"] else "") for c, r in points.items())


def report(r: dict[str, Any], clients: list[int], ingresses: list[str], waits: list[float]) -> None:
    base = r["inprocess_score"]
    m = r["machine"]
    print(f"\nCPU {m.get('cpu_model', '?')} ({m.get('cpus')} cores), load average {m['load_avg_start'][0]:.1f} at "
          f"the start. in-process score() (1 user x {N_CANDIDATES} candidates, d_model 512): p50 "
          f"{base['p50_ms']:.3f} ms, p99 {base['p99_ms']:.3f} ms; engine.score_batch (+ lookups, gather, response "
          f"objects): p50 {r['inprocess_engine']['p50_ms']:.3f} ms. Load generator {r['config']['load_generator']}; "
          f"each point: median of {r['config']['rounds']} interleaved rounds; [1-min load average].")
    first, last = clients[0], clients[-1]
    if "bare" in r:
        columns = [("bare" if i == 0 else f"bare_during_{ing}",
                    f"{'serve' if i == 0 else f'serve_{ing}'}_wait_{w:g}", f"Serve {ing}, wait {w:g}s")
                   for i, ing in enumerate(ingresses) for w in (waits if i == 0 else waits[:1])]
        head = f"{'clients':>7}"
        for _, _, title in columns:
            head += f" | {title + ': p50/p99 ms, req/s':<44} {'bare p50, req/s':>17} {'+p50':>6} {'x bare':>6}"
        print("workload 'same' (1 user x the same 100 candidates):\n" + head)
        for c in clients:
            line = f"{c:>7}"
            for bare_key, key, _ in columns:
                s, b = r[key][c], r[bare_key][c]
                line += (f" | {s['p50_ms']:>7.2f}/{s['p99_ms']:<8.2f} {s['rps']:>6.0f} [{s['load1']:>4.1f}]"
                         f"{'':>14} {b['p50_ms']:>7.2f} {b['rps']:>7.0f}  {s['p50_ms'] - base['p50_ms']:>+6.2f} "
                         f"{s['rps'] / max(b['rps'], 1e-9):>6.2f}")
            print(line)
        key = columns[0][1]
        added = r[key][first]["p50_ms"] - base["p50_ms"]
        ratio = r[key][last]["rps"] / max(r["bare"][last]["rps"], 1e-9)
        print(f"targets ({ingresses[0]}, wait {waits[0]:g}s): Serve adds <= {TARGET_ADDED_P50_MS:g} ms at p50 over "
              f"in-process score(): {added:+.2f} ms ({'met' if added <= TARGET_ADDED_P50_MS else 'NOT met'}); "
              f"Serve req/s >= bare app at {last} clients: {ratio:.2f}x ({'met' if ratio >= 1.0 else 'NOT met'})")
    if "serve_distinct" in r:
        d, b = r["serve_distinct"], r["bare_distinct"]
        print("workload 'distinct' (every request another user and 100 other candidates): " + "; ".join(
            f"{c} client{'s' if c > 1 else ''}: Serve {d[c]['rps']:.0f} req/s p50 {d[c]['p50_ms']:.2f} ms vs bare "
            f"{b[c]['rps']:.0f} req/s p50 {b[c]['p50_ms']:.2f} ms = {d[c]['rps'] / max(b[c]['rps'], 1e-9):.2f}x"
            for c in d))
        top = max(d)
        ratio = d[top]["rps"] / max(b[top]["rps"], 1e-9)
        print(f"target: Serve req/s >= 1.2x the bare app at {top} clients, distinct workload: {ratio:.2f}x "
              f"({'met' if ratio >= 1.2 else 'NOT met'})")
    cpu = [(k, c, r[k][c]["server_cpu_us_per_request"]) for k in ("bare", "serve_wait_0", "bare_distinct",
                                                                   "serve_distinct", "bare_floor", "serve_floor")
           if k in r for c in r[k]]
    print("server CPU time per request (us; Serve: replica + HAProxy; bare: its uvicorn process): "
          + ", ".join(f"{k}@{c} {v:.0f}" for k, c, v in cpu))
    floor_keys = [("bare uvicorn", "bare_floor")] + [
        (f"Serve {ing}", f"{'serve' if i == 0 else f'serve_{ing}'}_floor") for i, ing in enumerate(ingresses)]
    print("floor (no-op route, same request and response bytes: the HTTP path alone): " + "; ".join(
        f"{name}: " + ", ".join(f"{c} client{'s' if c > 1 else ''} p50 {x['p50_ms']:.2f} ms {x['rps']:.0f}/s"
                                for c, x in r[key].items()) for name, key in floor_keys if key in r))
    rec = r.get("recommend_catalog")
    if rec:
        ok = rec["added_p50_ms"] <= rec["target_added_ms"]
        print(f"/v1/recommend over {rec['items']:,} items (d_model {rec['d_model']}, k {rec['k']}): Serve p50 "
              f"{rec['serve_p50_ms']:.2f} ms vs in-process score()+top-k {rec['inprocess_p50_ms']:.2f} ms: "
              f"{rec['added_p50_ms']:+.2f} ms (paired median {rec['paired_median_added_ms']:+.2f} ms; target <= "
              f"+{rec['target_added_ms']:g} ms: {'met' if ok else 'NOT met'})")
        if "serve_path_p50_ms" in rec:
            lo, hi = rec["paired_mean_added_ci95_ms"]
            print(f"  paired mean {rec['paired_mean_added_ms']:+.2f} ms (95% CI {lo:+.2f} .. {hi:+.2f}); the replica's "
                  f"own time p50 {rec['serve_app_p50_ms']:.2f} ms (Server-Timing), Serve's request path "
                  f"{rec['serve_path_p50_ms']:.2f} ms")
    for k, g in r["catalog_vs_gemm"].items():
        print(f"score() over {CATALOG} items, {k.replace('_', ' ')}: {g['score_ms']:.2f} ms vs plain GEMM of the "
              f"same FLOPs {g['gemm_ms']:.2f} ms -> ratio {g['ratio']:.2f} (target >= 0.5)")


if __name__ == "__main__":
    sys.exit(main())
