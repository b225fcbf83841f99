"""Benchmark: the Ray Serve app vs a bare FastAPI app vs the in-process score() call.

    python -m bench.serve_bench            # 30 s per point (about 7 minutes in all)
    python -m bench.serve_bench --quick    # 5 s per point, a smoke test

Workload: POST /v1/score for 1 known user x 100 precomputed candidates, closed loop on loopback
for a bounded time at 1, 4 and 16 concurrent clients. Embeddings are random (scoring-only figures
do not depend on their values) with t5-small's width: d_model = 512, M = 8 user codes, N = 4
content codes; the registered model is a random-init T5 of that width but one layer deep (only the
cold path would run it, and this workload has none). Side by side, on the same inputs:

- in-process: ``score()`` on the user's UPE and the 100 candidates' CPE (and ``engine.score_batch``,
  which adds the id lookups, the gather and the response objects), one caller;
- bare app: the same API code (serve/api.py) over the same bundle in one uvicorn process, no Ray;
- Serve: ``serve.app.deploy`` (proxy -> EmbSumIngress -> EmbSumScorer with @serve.batch), once with
  the config's serve.batch_wait_timeout_s and once with 0 (batch only what is already queued).

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio (one process, cheap per
request). Also: ``score()`` over a 10k-item catalog vs a plain GEMM of the same FLOPs. torch runs
one intra-op thread everywhere (as a serve.num_cpus=1 replica does). Prints a table and writes
bench/results/serve.json. On a shared 2-core machine the absolute figures are noisy; the ratios
are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from embsum.config import Config, config_from_dict
from embsum.runtime import setup_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"
N_ITEMS, N_USERS, N_CANDIDATES = 2000, 100, 100
CATALOG = 10_000
MODEL = dict(random_init=True, tokenizer="bundled", d_model=512, d_kv=64, d_ff=1024, num_layers=1,
             num_decoder_layers=1, num_heads=8, user_codes=8, content_codes=4, dropout=0.0)


# ---- setup: a registered model and random embeddings in the embed job's format ---------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_config(work: Path, port: int, batch_wait: float | None = None) -> Config:
    serve: dict[str, Any] = {"port": port, "min_replicas": 1, "max_replicas": 1, "num_cpus": 1}
    if batch_wait is not None:
        serve["batch_wait_timeout_s"] = batch_wait
    return config_from_dict({"workdir": str(work), "model": MODEL, "serve": serve})


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


def write_random_embeddings(cfg: Config, version: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from embsum.embeddings import ITEMS, USERS, Manifest, version_dir, write_manifest

    rng = np.random.default_rng(0)
    m, n, d = cfg.model.user_codes, cfg.model.content_codes, cfg.model.d_model
    out = version_dir(cfg.embeddings_dir, version)
    (out / ITEMS).mkdir(parents=True)
    (out / USERS).mkdir(parents=True)
    cpe = rng.standard_normal((N_ITEMS, n, d), dtype=np.float32) / np.sqrt(d)
    key = np.maximum(rng.standard_normal((N_ITEMS, n, d), dtype=np.float32), 0)  # gelu-like: mostly >= 0
    upe = rng.standard_normal((N_USERS, m, d), dtype=np.float32)
    pq.write_table(pa.table({"item_id": [f"n{i}" for i in range(N_ITEMS)],
                             "text": [f"item {i}" for i in range(N_ITEMS)],
                             "cpe": ArrowTensorArray.from_numpy(cpe), "cpe_key": ArrowTensorArray.from_numpy(key)}),
                   out / ITEMS / "part-0.parquet")
    pq.write_table(pa.table({"user_id": [f"U{u}" for u in range(N_USERS)],
                             "history": pa.array([[f"n{u}"] for u in range(N_USERS)], pa.list_(pa.string())),
                             "upe": ArrowTensorArray.from_numpy(upe), "summary": [""] * N_USERS}),
                   out / USERS / "part-0.parquet")
    write_manifest(out, Manifest(model_name=cfg.mlflow.registered_model, model_version=version, model_fingerprint="",
                                 items=N_ITEMS, users=N_USERS, dtype="float32", user_codes=m, content_codes=n,
                                 d_model=d))


def request_body() -> dict[str, Any]:
    ids = np.random.default_rng(1).choice(N_ITEMS, size=N_CANDIDATES, replace=False)
    return {"user_id": "U7", "candidates": [{"item_id": f"n{i}"} for i in ids]}


# ---- measurement ----------------------------------------------------------------------------------
def summarize(latencies_s: list[float], seconds: float, errors: int = 0) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rps": len(ms) / seconds, "requests": len(ms), "errors": errors}


def timed_loop(fn: Any, seconds: float) -> dict[str, float]:
    for _ in range(20):  # warm-up
        fn()
    lat, end = [], time.perf_counter() + seconds
    t_start = time.perf_counter()
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return summarize(lat, time.perf_counter() - t_start)


async def _http_load(host: str, port: int, path: str, body: bytes | None, token: str | None, clients: int,
                     seconds: float, warmup: float) -> dict[str, float]:
    """Closed loop: ``clients`` keep-alive connections, each sending the next request on the answer."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    if body is None:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode()
    else:
        request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = 0
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if t0 >= t_measure:
                    if status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return summarize(latencies, seconds, errors)


def http_load(url: str, body: dict[str, Any] | None, clients: int, seconds: float, token: str | None = None,
              path: str = "/v1/score") -> dict[str, float]:
    """POST ``body`` to ``path`` (GET when body is None) in a closed loop."""
    host, port = url.removeprefix("http://").split(":")
    payload = None if body is None else json.dumps(body).encode()
    return asyncio.run(_http_load(host, int(port), path, payload, token, clients, seconds,
                                  warmup=min(2.0, seconds / 5)))


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
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


def check_scores(url: str, body: dict[str, Any], want: np.ndarray) -> None:
    import httpx

    got = httpx.post(url + "/v1/score", json=body, timeout=30).json()
    np.testing.assert_allclose([s["score"] for s in got["scores"]], want, rtol=0, atol=1e-4)


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


# ---- the bare app (a subprocess: one uvicorn process, no Ray) -----------------------------------------
def run_bare_app(cfg_path: str, version: str, port: int) -> None:
    import torch
    import uvicorn

    from serve.api import ApiSettings, InProcessScorer, build_api
    from serve.bundle import load_bundle

    torch.set_num_threads(1)
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    app = build_api(InProcessScorer(load_bundle(cfg, version)), ApiSettings.from_config(cfg.serve))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 s per point instead of 30")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--bare-app", nargs=3, metavar=("CONFIG_JSON", "VERSION", "PORT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    setup_env()
    if a.bare_app:
        run_bare_app(a.bare_app[0], a.bare_app[1], int(a.bare_app[2]))
        return 0

    import ray
    import torch

    from embsum.predictor import Predictor
    from serve import app as serve_app
    from serve import engine
    from serve.bundle import load_bundle
    from serve.engine import ScoreQuery

    torch.set_num_threads(1)
    seconds = 5.0 if a.quick else 30.0
    clients = [int(c) for c in a.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="embsum-serve-bench-"))
    cfg = bench_config(work, _free_port())
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
    print(f"[bench] setup {time.perf_counter() - t0:.1f}s; {seconds:.0f}s per point; clients {clients}", flush=True)

    results: dict[str, Any] = {"config": {"seconds_per_point": seconds, "clients": clients, "items": N_ITEMS,
                                          "candidates": N_CANDIDATES, "model": MODEL, "torch_threads": 1,
                                          "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
                                          "max_batch_size": cfg.serve.max_batch_size},
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version(), "ray": ray.__version__,
                                           "torch": torch.__version__}}
    with torch.inference_mode():
        results["inprocess_score"] = timed_loop(lambda: Predictor.score(upe, cpe, key), seconds)
    query = ScoreQuery(user_id=body["user_id"], history=None,
                       candidates=[(c["item_id"], None) for c in body["candidates"]])
    results["inprocess_engine"] = timed_loop(lambda: engine.score_batch(bundle, [query]), seconds)
    print(f"[bench] in-process score() p50 {results['inprocess_score']['p50_ms']:.3f} ms", flush=True)

    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    bare_port = _free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.serve_bench", "--bare-app", str(cfg_path), version,
                             str(bare_port)], cwd=REPO)
    try:
        bare_url = f"http://127.0.0.1:{bare_port}"
        wait_ready(bare_url)
        check_scores(bare_url, body, want)
        results["bare"] = {c: http_load(bare_url, body, c, seconds) for c in clients}
        results["bare_healthz"] = http_load(bare_url, None, 1, min(seconds, 10.0), path="/healthz")
        print(f"[bench] bare app done: {results['bare']}", flush=True)
    finally:
        bare.terminate()
        bare.wait(30)

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        waits = [cfg.serve.batch_wait_timeout_s, 0.0]
        for wait in waits:
            run_cfg = bench_config(work, cfg.serve.port, batch_wait=wait)
            serve_app.deploy(run_cfg)
            url = f"http://127.0.0.1:{run_cfg.serve.port}"
            wait_ready(url)
            check_scores(url, body, want)
            results[f"serve_wait_{wait:g}"] = {c: http_load(url, body, c, seconds) for c in clients}
            if wait == waits[0]:  # Serve's floor: proxy -> ingress and back, no scorer call
                results["serve_healthz"] = http_load(url, None, 1, min(seconds, 10.0), path="/healthz")
            print(f"[bench] serve (batch wait {wait:g}s) done: {results[f'serve_wait_{wait:g}']}", flush=True)
    finally:
        serve_app.shutdown()
        ray.shutdown()

    results["catalog_vs_gemm"] = catalog_vs_gemm(min(seconds, 10.0))
    report(results, clients, waits)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"[bench] wrote {out}")
    return 0


def report(r: dict[str, Any], clients: list[int], waits: list[float]) -> None:
    base = r["inprocess_score"]
    print(f"\nin-process score() (1 user x {N_CANDIDATES} candidates, d_model 512): p50 {base['p50_ms']:.3f} ms, "
          f"p99 {base['p99_ms']:.3f} ms, {base['rps']:.0f}/s; engine.score_batch (+ lookups, gather, response "
          f"objects): p50 {r['inprocess_engine']['p50_ms']:.3f} ms")
    head = f"{'clients':>7} | {'bare p50/p99 ms':>16} {'bare req/s':>10}"
    for w in waits:
        head += f" | {f'serve(wait {w:g}s) p50/p99':>24} {'req/s':>7} {'+p50 vs in-proc':>15} {'rps/bare':>8}"
    print(head)
    for c in clients:
        b = r["bare"][c]
        line = f"{c:>7} | {b['p50_ms']:>7.2f}/{b['p99_ms']:<8.2f} {b['rps']:>10.0f}"
        for w in waits:
            s = r[f"serve_wait_{w:g}"][c]
            line += (f" | {s['p50_ms']:>11.2f}/{s['p99_ms']:<12.2f} {s['rps']:>7.0f} "
                     f"{s['p50_ms'] - base['p50_ms']:>+14.2f}ms {s['rps'] / max(b['rps'], 1e-9):>8.2f}")
        print(line)
    print(f"GET /healthz, 1 client (no scoring: the HTTP path alone): bare p50 {r['bare_healthz']['p50_ms']:.2f} ms, "
          f"Serve (proxy -> ingress) p50 {r['serve_healthz']['p50_ms']:.2f} ms")
    print("targets: Serve adds <= 2 ms at p50 over in-process; Serve req/s >= bare app at 16 clients")
    for k, g in r["catalog_vs_gemm"].items():
        print(f"score() over {CATALOG} items, {k.replace('_', ' ')}: {g['score_ms']:.2f} ms vs plain GEMM of the "
              f"same FLOPs {g['gemm_ms']:.2f} ms -> ratio {g['ratio']:.2f} (target >= 0.5)")


if __name__ == "__main__":
    sys.exit(main())
