"""The Serve application end to end over real HTTP on 127.0.0.1: a local Ray cluster, a real
MLflow SQLite registry, tiny random-init models registered as versions, embeddings written by the
embed job (train/embed.py's run_embed on layout-conformant inputs) for v1 and by the same encoder
calls in process for v2, and serve.app.deploy.

Checks: served scores equal the offline score() on the stored embeddings; recommend is the true
top k; cold paths; every error path's status and message; bearer auth; a schemathesis fuzz with
no 5xx; a rollout under load with no failed request and no mixed versions; a failed rollout that
keeps the old version serving and reports the error.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embsum.config import Config, config_from_dict
from embsum.data import layout
from embsum.predictor import Predictor
from tests.conftest import TINY
from tests.unit.test_serve_store import history_of, item_text, write_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

N_ITEMS, N_USERS = 40, 12
TOKEN = "integration-token-42"


def _free_port() -> int:
    """A free port in 18000-18999 (other engineers may run Serve on the default 8000 meanwhile)."""
    for port in random.sample(range(18000, 19000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 18000-18999")


def _write_inputs(cfg: Config) -> None:
    """items.parquet and users/ as embsum/data/layout.py describes (what `embsum prepare` writes)."""
    from ray.data.extensions import ArrowTensorArray

    from embsum.tokenization import EmbSumTokenizer

    tok = EmbSumTokenizer.from_config(cfg.model)
    data = cfg.data_dir
    (data / layout.USERS).mkdir(parents=True)
    texts = [item_text(i) for i in range(N_ITEMS)]
    token_ids = tok.encode_texts(texts)
    pq.write_table(pa.table({"item_id": pa.array([f"n{i}" for i in range(N_ITEMS)]), "text": pa.array(texts),
                             "token_ids": pa.array(token_ids, pa.list_(pa.int32()))}),
                   layout.path(data, layout.ITEMS))
    histories = [history_of(u, N_ITEMS) for u in range(N_USERS)]
    sessions = tok.sessions_batch([[token_ids[int(i[1:])] for i in h] for h in histories])  # (U, G, L)
    pq.write_table(pa.table({"user_id": pa.array([f"U{u}" for u in range(N_USERS)]),
                             "split": pa.array(["train"] * N_USERS),
                             "history": pa.array(histories, pa.list_(pa.string())),
                             "session_ids": ArrowTensorArray.from_numpy(sessions)}),
                   layout.path(data, layout.USERS) / "part-0.parquet")


def _register(cfg: Config, seed: int) -> str:
    """A tiny random-init model (heads moved off their init so versions differ), saved and registered."""
    from embsum.checkpoint import save_model
    from embsum.model import EmbSum
    from embsum.registry import Registry
    from embsum.tokenization import EmbSumTokenizer

    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, seed=seed)
    with torch.no_grad():
        for p in (model.user_poly.codes, model.content_poly.codes, model.item_gate.weight):
            p.add_(torch.randn_like(p) * 0.5)
    path = save_model(model.eval(), tok, cfg.workdir_path / "models" / f"seed{seed}",
                      metadata={"model_fingerprint": cfg.fingerprint("model")})
    registry = Registry(cfg)
    run_id = registry.start_run(f"serve-test-seed{seed}")
    version = registry.log_and_register(run_id, path)
    registry.end_run(run_id)
    return version


def _predictor(cfg: Config, version: str) -> Predictor:
    from embsum.registry import Registry

    return Predictor.from_dir(Registry(cfg).download(version, cfg.workdir_path / "downloads" / f"v{version}"),
                              device="cpu")


class Served:
    def __init__(self, cfg: Config, url: str, versions: list[str], embed_report: dict) -> None:
        import httpx

        from serve.store import EmbeddingStore

        self.cfg, self.url, self.versions, self.embed_report = cfg, url, versions, embed_report
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        self.stores = {v: EmbeddingStore.load(cfg.embeddings_dir, model_name="embsum", model_version=v)
                       for v in versions[:2]}

    def offline(self, version: str, user: str, items: list[str]) -> np.ndarray:
        s = self.stores[version]
        rows = [s.item_index[i] for i in items]
        u = s.user_index[user]
        return Predictor.score(s.upe[u:u + 1], s.cpe[rows], s.cpe_key[rows])[0]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """The app deployed on the session's local Ray cluster (tests/integration/conftest.py); Serve is
    shut down after this module, the cluster is left to its fixture."""
    import httpx

    from embsum.registry import Registry
    from serve.app import deploy, shutdown
    from train.embed import run_embed

    work = tmp_path_factory.mktemp("serve")
    (work / "token").write_text(TOKEN + "\n")
    port = _free_port()
    cfg = config_from_dict({
        "workdir": str(work), "model": TINY, "ray": {"num_cpus": 4},
        "train": {"infer_actors": 1, "infer_cpus": 0.5, "infer_batch_size": 16},
        "serve": {"port": port, "min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "max_batch_size": 8,
                  "max_ongoing_requests": 32, "max_candidates": 50, "max_history": 10, "max_k": 20,
                  "max_body_bytes": 65536, "auth_token_file": str(work / "token")},
    })
    t0 = time.monotonic()
    _write_inputs(cfg)
    versions = [_register(cfg, seed) for seed in (1, 2, 3)]
    Registry(cfg).promote(versions[0])
    t1 = time.monotonic()
    # v1 by the embed job itself (the format contract end to end); v2 by the same encoder calls
    # in process (half a minute less on two cores); v3 gets none: the failed-rollout case.
    embed_report = run_embed(cfg, versions[0])
    write_version(cfg.embeddings_dir, _predictor(cfg, versions[1]), versions[1], n_items=N_ITEMS, n_users=N_USERS,
                  fingerprint=cfg.fingerprint("model"))
    t2 = time.monotonic()
    # A stopping HAProxy-fronted replica keeps answering 30 s by default so load balancers can drain
    # it; nothing here needs that, and Serve's shutdown at the end would wait for it.
    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    preset = drain in os.environ
    os.environ.setdefault(drain, "1")
    try:
        deploy(cfg)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the proxy may accept before the app is ready
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "app never became ready"
            time.sleep(0.5)
        print(f"[serve-test] register {t1 - t0:.1f}s, embed {t2 - t1:.1f}s, deploy {time.monotonic() - t2:.1f}s")
        yield Served(cfg, url, versions, embed_report)
    finally:
        shutdown()  # serve.shutdown(), and forget the driver's cached scorer handles
        if not preset:
            os.environ.pop(drain, None)


def _post(served: Served, path: str, body: dict, **kw):
    return served.http.post(path, json=body, **kw)


# ---- correctness ------------------------------------------------------------------------------------
def test_scores_equal_offline_score(served):
    v1 = served.versions[0]
    for u in range(0, N_USERS, 3):
        items = [f"n{(u * 7 + j * 5) % N_ITEMS}" for j in range(12)]
        r = _post(served, "/v1/score", {"user_id": f"U{u}", "candidates": [{"item_id": i} for i in items]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == v1 and r.headers["x-model-version"] == v1
        np.testing.assert_allclose([s["score"] for s in body["scores"]], served.offline(v1, f"U{u}", items),
                                   rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_each_correct(served):
    from concurrent.futures import ThreadPoolExecutor

    v1 = served.versions[0]
    jobs = [(f"U{u % N_USERS}", [f"n{(u + j) % N_ITEMS}" for j in range(1 + u % 9)]) for u in range(24)]

    def one(job):
        user, items = job
        return _post(served, "/v1/score", {"user_id": user, "candidates": [{"item_id": i} for i in items]})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, jobs))
    for (user, items), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([s["score"] for s in r.json()["scores"]], served.offline(v1, user, items),
                                   atol=1e-5)


def test_recommend_is_the_true_top_k_excluding_history(served):
    v1 = served.versions[0]
    s = served.stores[v1]
    u = s.user_index["U5"]
    full = Predictor.score(s.upe[u:u + 1], s.cpe, s.cpe_key)[0]
    seen = set(s.histories[u])
    want = [s.item_ids[i] for i in np.argsort(-full, kind="stable") if s.item_ids[i] not in seen][:7]
    r = _post(served, "/v1/recommend", {"user_id": "U5", "k": 7})
    assert r.status_code == 200, r.text
    got = r.json()["items"]
    assert [x["item_id"] for x in got] == want
    np.testing.assert_allclose([x["score"] for x in got], [full[s.item_index[i]] for i in want], atol=1e-5)
    assert got[0]["text"] == s.item_texts[s.item_index[want[0]]]
    kept = _post(served, "/v1/recommend", {"user_id": "U5", "k": 20, "exclude_history": False}).json()["items"]
    assert [x["item_id"] for x in kept] == [s.item_ids[i] for i in np.argsort(-full, kind="stable")[:20]]


def test_cold_user_and_items_are_encoded_by_the_same_predictor(served):
    v1 = served.versions[0]
    items = ["n1", "n4", "n9"]
    body = {"user_id": "someone-new", "history": [{"item_id": i} for i in history_of(4, N_ITEMS)],
            "candidates": [{"item_id": "n1"}, {"item_id": "unseen-1", "text": item_text(4)}, {"text": item_text(9)}]}
    r = _post(served, "/v1/score", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["user_encoded"] and [x["encoded"] for x in out["scores"]] == [False, True, True]
    # The same history's precomputed UPE (U4) scores the same items the same way.
    np.testing.assert_allclose([x["score"] for x in out["scores"]], served.offline(v1, "U4", items), atol=1e-4)
    rec = _post(served, "/v1/recommend", {"history": [{"text": "football final story 0 | football"}], "k": 3})
    assert rec.status_code == 200 and rec.json()["user_encoded"] and len(rec.json()["items"]) == 3


def test_summary_model_and_health(served):
    v1 = served.versions[0]
    r = served.http.get("/v1/users/U2/summary")
    store = served.stores[v1]
    assert r.status_code == 200 and r.json()["summary"] == store.summaries[store.user_index["U2"]]
    missing = served.http.get("/v1/users/nobody/summary")
    assert missing.status_code == 404 and "'nobody'" in missing.json()["detail"]
    m = served.http.get("/v1/model").json()
    assert m["model_name"] == "embsum" and m["model_version"] == v1 and m["alias"] == "champion"
    assert m["embeddings"]["items"] == N_ITEMS and m["embeddings"]["users"] == N_USERS
    assert m["embeddings"]["model_version"] == v1 and m["last_rollout_error"] is None
    assert served.http.get("/readyz").json() == {"status": "ok", "model_version": v1}


def test_embed_job_reports_its_throughput_to_the_version_run(served):
    """run_embed's report: counts, end-to-end and steady-state rates, the pool's start-up; the same
    figures on the version's MLflow run, beside evaluate's metrics."""
    from embsum.registry import Registry

    rep, v1 = served.embed_report, served.versions[0]
    assert rep["version"] == v1 and rep["items"] == N_ITEMS and rep["users"] == N_USERS
    for kind in ("items", "users"):
        assert 0.0 <= rep[f"{kind}_startup_s"] < rep[f"{kind}_seconds"]
        # Once running, the pool is at least as fast as the phase overall (which adds its start-up).
        assert rep[f"{kind}_steady_per_s"] >= rep[f"{kind}_per_s"] > 0
    registry = Registry(served.cfg)
    logged = registry.run_metrics(registry.version(v1).run_id)
    assert logged["embed_items"] == N_ITEMS and logged["embed_users"] == N_USERS
    assert logged["embed_items_steady_per_s"] == pytest.approx(rep["items_steady_per_s"])


# ---- errors, limits, auth ----------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/score", {"user_id": "ghost", "candidates": [{"item_id": "n1"}]}, 404, "unknown user ids: 'ghost'"),
    ("/v1/score", {"user_id": "U1", "candidates": [{"item_id": "n1"}, {"item_id": "zz"}]}, 404,
     "unknown candidate item ids: 'zz'"),
    ("/v1/score", {"user_id": "U1", "candidates": [{"item_id": "n1"}] * 51}, 413, "serve.max_candidates=50"),
    ("/v1/score", {"history": [{"item_id": "n1"}] * 11, "candidates": [{"item_id": "n1"}]}, 413,
     "history: 11 is more than serve.max_history=10"),
    ("/v1/recommend", {"user_id": "U1", "k": 21}, 413, "k: 21 is more than serve.max_k=20"),
    ("/v1/recommend", {"user_id": "U1", "k": [3]}, 422, "k: Input should be a valid integer"),
    ("/v1/score", {"user_id": "U1", "candidates": "n1"}, 422, "candidates: Input should be a valid list"),
])
def test_error_paths(served, path, body, status, needle):
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_bad_json_and_oversize_body(served):
    r = served.http.post("/v1/score", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
    big = json.dumps({"user_id": "U1", "candidates": [{"text": "y" * 15000}] * 5})
    r = served.http.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_body_bytes=65536" in r.json()["detail"]


def test_bearer_auth(served):
    import httpx

    body = {"user_id": "U1", "candidates": [{"item_id": "n1"}]}
    assert httpx.post(served.url + "/v1/score", json=body).status_code == 401
    wrong = httpx.post(served.url + "/v1/score", json=body, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid bearer token"
    assert _post(served, "/v1/score", body).status_code == 200
    assert httpx.get(served.url + "/healthz").status_code == 200
    assert httpx.get(served.url + "/readyz").status_code == 200


def test_fuzz_openapi_finds_no_server_error(served):
    """Schema-driven fuzz over real HTTP, valid and invalid inputs, bounded to stay well under 60 s."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t0, calls = time.monotonic(), 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=15, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal calls
                response = case.call(base_url=served.url, headers=auth, timeout=30)
                calls += 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            try:
                run()
            except Unsatisfiable:  # an operation with no inputs has no invalid form
                assert mode is GenerationMode.NEGATIVE
    assert calls > 60 and time.monotonic() - t0 < 60


# ---- rollouts (last: they change the served version) -------------------------------------------------
def test_rollout_under_load_fails_no_request_and_mixes_no_versions(served):
    from embsum.registry import Registry
    from serve.app import rollout

    v1, v2 = served.versions[:2]
    items = [f"n{j}" for j in range(0, N_ITEMS, 4)]
    body = {"user_id": "U3", "candidates": [{"item_id": i} for i in items]}
    expected = {v: served.offline(v, "U3", items) for v in (v1, v2)}
    assert not np.allclose(expected[v1], expected[v2], atol=1e-3)
    results: list[tuple[int, str | None, list[float] | str]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = _post(served, "/v1/score", body)
                ok = r.status_code == 200
                results.append((r.status_code, r.json()["model_version"] if ok else None,
                                [s["score"] for s in r.json()["scores"]] if ok else r.text))
            except Exception as e:  # noqa: BLE001 - a failed request is what this test counts
                results.append((0, None, repr(e)))
            time.sleep(0.01)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(1.0)
    Registry(served.cfg).promote(v2)  # move the alias, then roll out to where it points
    outcome = rollout(served.cfg)
    time.sleep(1.0)
    stop.set()
    thread.join(30)
    assert outcome["ok"] and outcome["version"] == v2 and outcome["previous"] == v1, outcome
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    versions = [r[1] for r in results]
    print(f"[serve-test] rollout under load: {len(results)} requests, {versions.count(v1)} answered by v{v1}, "
          f"{versions.count(v2)} by v{v2}; rollout took {outcome['seconds']:.1f}s")
    assert versions[0] == v1 and versions[-1] == v2
    first_v2 = versions.index(v2)
    assert set(versions[first_v2:]) == {v2}, "a v1 response after v2 was served"
    for _, version, scores in results:
        np.testing.assert_allclose(scores, expected[version], atol=1e-5)


def test_failed_rollout_keeps_serving_and_reports(served):
    from serve.app import rollout, status

    v2, v3 = served.versions[1], served.versions[2]
    outcome = rollout(served.cfg, v3)  # registered, but no embeddings were made for it
    assert not outcome["ok"] and outcome["serving"] == v2
    assert f"cannot load model version {v3}" in outcome["error"] and "manifest.json is missing" in outcome["error"]
    r = _post(served, "/v1/score", {"user_id": "U1", "candidates": [{"item_id": "n1"}]})
    assert r.status_code == 200 and r.json()["model_version"] == v2
    m = served.http.get("/v1/model").json()
    assert m["model_version"] == v2 and m["last_rollout_error"]["version"] == v3
    assert "manifest.json is missing" in m["last_rollout_error"]["error"]
    st = status()
    assert st["status"] == "RUNNING" and st["model"]["model_version"] == v2
    assert st["deployments"]["EmbSumScorer"]["replicas"] == {"RUNNING": 1}


def test_a_version_that_cannot_load_fails_the_first_start_with_the_cause(served):
    """A fresh deployment has nothing to fall back to: its scorer fails to start, and deploy says why."""
    from embsum.config import replace
    from serve.app import deploy, shutdown

    v3 = served.versions[2]
    cfg = replace(replace(served.cfg, "serve.model_version", v3), "serve.route_prefix", "/broken")
    with pytest.raises(RuntimeError, match=rf"(?s)DEPLOY_FAILED.*EmbSum scorer cannot start: cannot load model "
                                           rf"version {v3}: no embeddings at .*manifest.json is missing"):
        deploy(cfg, name="embsum-broken", timeout_s=150)
    shutdown("embsum-broken")
    r = _post(served, "/v1/score", {"user_id": "U1", "candidates": [{"item_id": "n1"}]})
    assert r.status_code == 200 and r.json()["model_version"] == served.versions[1]  # the other app is untouched
