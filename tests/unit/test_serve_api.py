"""The HTTP API in process (FastAPI app over an in-process scorer; no Ray): statuses and messages
of every error path, limits, bearer auth, and a schemathesis fuzz that finds no 5xx."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from embsum.client import read_token
from embsum.config import ServeConfig
from embsum.predictor import Predictor
from serve.api import MODEL_VERSION_HEADER, ApiSettings, InProcessScorer, build_api
from serve.schemas import RecommendResponse, ScoreResponse
from tests.unit.test_serve_store import make_bundle, tiny_predictor

TOKEN = "s3cret-token"
LIMITS = ApiSettings(max_candidates=5, max_history=4, max_k=7, max_body_bytes=4096)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_cfg, tokenizer):
    return make_bundle(tmp_path_factory.mktemp("emb"), tiny_predictor(tiny_cfg, tokenizer, seed=4), "7")


@pytest.fixture(scope="module")
def client(bundle):
    return TestClient(build_api(InProcessScorer(bundle), LIMITS))


@pytest.fixture(scope="module")
def secured(bundle):
    from dataclasses import replace

    return TestClient(build_api(InProcessScorer(bundle), replace(LIMITS, token=TOKEN)))


def test_score_matches_offline_and_names_the_version(client, bundle):
    r = client.post("/v1/score", json={"user_id": "U2", "candidates": [{"item_id": "n3"}, {"item_id": "n9"}]})
    assert r.status_code == 200 and r.headers[MODEL_VERSION_HEADER] == "7"
    body = r.json()
    s = bundle.store
    rows = [s.item_index["n3"], s.item_index["n9"]]
    u = s.user_index["U2"]
    want = Predictor.score(s.upe[u:u + 1], s.cpe[rows], s.cpe_key[rows])[0]
    assert body["model_version"] == "7" and body["user_id"] == "U2" and body["user_encoded"] is False
    ScoreResponse.model_validate(body)  # the body is the documented shape
    np.testing.assert_allclose([x["score"] for x in body["scores"]], want, atol=1e-5)


def test_recommend_summary_model_health(client):
    r = client.post("/v1/recommend", json={"user_id": "U1", "k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3 and r.json()["model_version"] == "7"
    assert RecommendResponse.model_validate(r.json()).items[0].text
    r = client.post("/v1/recommend", json={"user_id": "U1"})  # the default k (10) is capped at serve.max_k
    assert r.status_code == 200 and len(r.json()["items"]) == LIMITS.max_k
    assert client.get("/v1/users/U1/summary").json()["user_id"] == "U1"
    m = client.get("/v1/model").json()
    assert m["model_version"] == "7" and m["embeddings"]["model_version"] == "7" and m["last_rollout_error"] is None
    assert client.get("/healthz").json() == {"status": "ok", "model_version": None}
    assert client.get("/readyz").json()["model_version"] == "7"


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("post", "/v1/score", {"user_id": "nobody", "candidates": [{"item_id": "n1"}]}, 404, "unknown user ids: 'nobody'"),
    ("post", "/v1/score", {"user_id": "U1", "candidates": [{"item_id": "x1"}, {"item_id": "x2"}]}, 404,
     "unknown candidate item ids: 'x1', 'x2'"),
    ("post", "/v1/recommend", {"history": [{"item_id": "ghost"}], "k": 2}, 404, "unknown history item ids: 'ghost'"),
    ("get", "/v1/users/nobody/summary", None, 404, "unknown user id 'nobody'"),
    ("post", "/v1/score", {"user_id": "U1", "candidates": [{"item_id": f"n{i}"} for i in range(6)]}, 413,
     "candidates: 6 is more than serve.max_candidates=5"),
    ("post", "/v1/score", {"history": [{"item_id": "n1"}] * 5, "candidates": [{"item_id": "n1"}]}, 413,
     "history: 5 is more than serve.max_history=4"),
    ("post", "/v1/recommend", {"user_id": "U1", "k": 8}, 413, "k: 8 is more than serve.max_k=7"),
    ("post", "/v1/recommend", {"user_id": "U1", "k": 2, "exclude": ["a"] * 6}, 413, "exclude: 6 is more than"),
    ("post", "/v1/recommend", {"user_id": "U1", "k": "many"}, 422, "k: Input should be a valid integer"),
    ("post", "/v1/recommend", {"user_id": "U1", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("post", "/v1/score", {"user_id": "U1", "candidates": []}, 422, "candidates: List should have at least 1 item"),
    ("post", "/v1/score", {"user_id": "U1", "candidates": [{}]}, 422, "candidates.0: Value error, an item needs"),
    ("post", "/v1/score", {"candidates": [{"item_id": "n1"}]}, 422, "give user_id (a known user) or history"),
    ("post", "/v1/score", {"user_id": "U1", "candidates": [{"itemid": "n1"}]}, 422,
     "candidates.0.itemid: Extra inputs are not permitted"),
    ("post", "/v1/score", {"user_id": 5, "candidates": [{"item_id": "n1"}]}, 422,
     "user_id: Input should be a valid string"),
    ("post", "/v1/score", {"user_id": "U1"}, 422, "candidates: Field required"),
    ("post", "/v1/score", [1, 2], 422, "body: Input should be a valid dictionary"),
])
def test_error_paths_name_the_problem(client, method, path, body, status, needle):
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()


def test_bad_json_lone_surrogates_and_oversize_bodies(client):
    as_json = {"content-type": "application/json"}
    r = client.post("/v1/score", content=b'{"user_id": "U1", "candidates": [', headers=as_json)
    assert r.status_code == 422 and r.json()["detail"].startswith("body: JSON decode error")
    r = client.post("/v1/score", content=b'{"user_id": "\\ud800", "candidates": [{"text": "\\udfff"}]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "user_id: Input should be a valid string, unable to parse raw data as a unicode" in r.json()["detail"]
    big = json.dumps({"user_id": "U1", "candidates": [{"text": "x" * 5000}]}).encode()
    r = client.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_body_bytes=4096" in r.json()["detail"]
    chunked = client.post("/v1/score", content=iter([big[:3000], big[3000:]]),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    small = json.dumps({"user_id": "U1", "candidates": [{"item_id": "n1"}]}).encode()
    ok = client.post("/v1/score", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_metrics_observer_sees_route_templates_and_codes(bundle):
    from serve.metrics import IngressMetrics

    seen: list[tuple[str, int]] = []

    class Recorder(IngressMetrics):  # the real metric objects (no-ops outside Ray), plus a record
        def observe(self, route: str, code: int, seconds: float) -> None:
            super().observe(route, code, seconds)
            seen.append((route, code))

    app = TestClient(build_api(InProcessScorer(bundle), LIMITS, observer=Recorder()))
    app.get("/v1/users/U1/summary")
    app.get("/v1/users/some%2Fthing/summary")
    app.post("/v1/score", json={"user_id": "U1", "candidates": [{"item_id": "n1"}]})
    app.get("/nope")
    assert seen == [("/v1/users/{user_id}/summary", 200), ("/v1/users/{user_id}/summary", 404),
                    ("/v1/score", 200), ("other", 404)]


def test_responses_say_how_long_the_app_took(bundle, monkeypatch):
    """``Server-Timing: app;dur=<ms>`` on every response of a served app (an observer is given):
    the time until the response started, here at least a scorer's deliberate delay."""
    import re
    import time

    from serve.metrics import IngressMetrics

    scorer = InProcessScorer(bundle)
    slow = scorer.score

    async def score(*a, **k):
        time.sleep(0.05)  # blocks the loop, as a busy scorer does
        return await slow(*a, **k)

    monkeypatch.setattr(scorer, "score", score)
    app = TestClient(build_api(scorer, LIMITS, observer=IngressMetrics()))
    r = app.post("/v1/score", json={"user_id": "U1", "candidates": [{"item_id": "n1"}]})
    fast = app.get("/nope")
    durs = [re.fullmatch(r"app;dur=(\d+\.\d{3})", x.headers["server-timing"]) for x in (r, fast)]
    assert r.status_code == 200 and fast.status_code == 404 and all(durs), [x.headers for x in (r, fast)]
    assert float(durs[0][1]) >= 50.0 > float(durs[1][1]) >= 0.0
    assert "server-timing" not in TestClient(build_api(InProcessScorer(bundle), LIMITS)).get("/nope").headers


def test_bearer_auth(secured):
    body = {"user_id": "U1", "candidates": [{"item_id": "n1"}]}
    none = secured.post("/v1/score", json=body)
    assert none.status_code == 401 and "missing bearer token" in none.json()["detail"]
    assert none.headers["www-authenticate"] == "Bearer"
    wrong = secured.post("/v1/score", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid bearer token"
    assert secured.get("/v1/model", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert secured.post("/v1/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for open_path in ("/healthz", "/readyz", "/openapi.json"):
        assert secured.get(open_path).status_code == 200


def test_read_token(tmp_path):
    off = ServeConfig()
    assert read_token(off, {}) is None
    assert read_token(off, {"EMBSUM_API_TOKEN": " abc \n"}) == "abc"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    filed = ServeConfig(auth_token_file=str(f))
    assert read_token(filed, {"EMBSUM_API_TOKEN": "env"}) == "from-file"  # the file wins
    with pytest.raises(ValueError, match="cannot be read"):
        read_token(ServeConfig(auth_token_file=str(tmp_path / "missing")), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(ServeConfig(auth_token_file=str(tmp_path / "empty")), {})


def test_openapi_documents_every_route_and_field(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/recommend", "/v1/users/{user_id}/summary", "/v1/model", "/healthz",
            "/readyz"} <= set(spec["paths"])
    for name in ("ScoreRequest", "RecommendRequest", "ItemRef", "ScoreResponse", "ModelResponse"):
        props = spec["components"]["schemas"][name]["properties"]
        missing = [k for k, v in props.items() if not v.get("description")]
        assert not missing, f"{name}: fields without a description: {missing}"


def test_fuzz_finds_no_server_error(bundle):
    """Schema-driven fuzz (valid and invalid inputs) against the ASGI app: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    app = build_api(InProcessScorer(bundle), ApiSettings(max_candidates=64, max_history=64, max_k=64))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=40, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call()
                calls[response.status_code // 100] = calls.get(response.status_code // 100, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no inputs)
                assert mode is GenerationMode.NEGATIVE
    assert calls.get(2, 0) >= 5 and sum(calls.values()) > 150, calls  # the scoring paths ran, not only 4xx


def test_cold_items_per_request_are_capped(bundle):
    """serve.max_cold_items bounds the T5 encodes one request may ask for: unknown ids given by text
    count (each distinct text once); known ids never do, with or without a text."""
    app = TestClient(build_api(InProcessScorer(bundle, max_cold_items=2), replace_limits(max_cold_items=2)))

    def score(cands):
        return app.post("/v1/score", json={"user_id": "U1", "candidates": cands})

    two = [{"text": "a cold item | news"}, {"item_id": "x9", "text": "another one | sports"}]
    assert score(two).status_code == 200
    assert score([*two, {"text": "a cold item | news"}]).status_code == 200  # the same text is one encode
    known = [{"item_id": f"n{i}", "text": "ignored: the id is known"} for i in range(3)]
    assert score([*two, *known]).status_code == 200
    r = score([*two, {"text": "a third | travel"}])
    assert r.status_code == 413
    assert r.json()["detail"] == ("cold items: 3 candidates need a T5 encode (given by text, id not in the served "
                                  "embeddings), more than serve.max_cold_items=2")
    assert "2 candidates to encode per request" in app.get("/openapi.json").json()["info"]["description"]


def replace_limits(**kw):
    from dataclasses import replace

    return replace(LIMITS, **kw)


def test_the_declarative_app_is_pinned_for_its_builder_and_its_replicas() -> None:
    """deploy(version=V) must not need the alias: the builder (build_app) reads serve.model_version from
    the app's args, the replicas read user_config; both say V (the GPU check deploys before any promote)."""
    from embsum.config import load_config
    from serve.control import DEPLOYMENT_NAME, _app_config

    cfg = load_config(None)
    assert cfg.serve.model_version == ""
    app = _app_config(cfg, "embsum", "3")
    assert app["args"]["values"]["serve"]["model_version"] == "3"
    scorer = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME)
    assert scorer["user_config"] == {"model_version": "3"}


def test_the_served_version_gauges_are_set_again_until_the_next_rollout():
    """Ray drops a gauge series no report refreshed for two report intervals, so ScorerMetrics sets
    the served version and catalog size again every ``refresh_s``; a rolled-out-of version is set
    to 0 once and then left to expire, and ``close`` stops the refreshing."""
    import time
    from collections.abc import Callable

    from serve.metrics import ScorerMetrics, report_interval_s

    sets: list[tuple[str, float, str | None]] = []

    class Seen:  # stands in for Ray's Gauge: records what a set would export
        def __init__(self, name: str) -> None:
            self.name = name

        def set(self, value: float, tags: dict[str, str] | None = None) -> None:
            sets.append((self.name, value, (tags or {}).get("version")))

    def until(done: Callable[[], bool]) -> None:  # polled, bounded: a loaded machine may run the thread late
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, sets[-10:]
            time.sleep(0.02)

    assert ScorerMetrics().refresh_s == report_interval_s() / 2 == 5.0  # Ray's default 10 s interval
    m = ScorerMetrics(refresh_s=0.02)
    m.version, m.items = Seen("version"), Seen("items")  # type: ignore[assignment]
    m.serving("3", 120)
    until(lambda: sets.count(("version", 1, "3")) >= 4 and sets.count(("items", 120, None)) >= 4)
    m.serving("4", 130)
    until(lambda: sets.count(("version", 1, "4")) >= 4)
    switched = sets.index(("version", 0, "3"))  # the old version: set to 0 once, at the switch ...
    assert sets.count(("version", 0, "3")) == 1
    assert ("version", 1, "3") not in sets[switched:]  # ... and never refreshed after it
    assert sets[switched + 1:switched + 3] == [("version", 1, "4"), ("items", 130, None)]
    m.close()
    m._refresher.join(timeout=30)  # type: ignore[union-attr]
    assert not m._refresher.is_alive()  # type: ignore[union-attr]
    n = len(sets)
    time.sleep(0.1)
    assert len(sets) == n
