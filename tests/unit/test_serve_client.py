"""embsum.client against the real API app on a loopback uvicorn server (no Ray): results, the
server's messages on 4xx, a clear error when nothing listens, the bearer token."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from embsum import client
from embsum.config import config_from_dict
from serve.api import ApiSettings, InProcessScorer, build_api
from tests.unit.test_serve_store import make_bundle, tiny_predictor

TOKEN = "client-token"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_cfg, tokenizer):
    import uvicorn

    bundle = make_bundle(tmp_path_factory.mktemp("emb"), tiny_predictor(tiny_cfg, tokenizer, seed=6), "2")
    app = build_api(InProcessScorer(bundle), ApiSettings(max_k=50, token=TOKEN))
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_recommend_score_summary_model(url):
    rec = client.recommend(url, "U1", k=4, token=TOKEN)
    assert rec["model_version"] == "2" and len(rec["items"]) == 4
    got = client.score(url, ["n1", {"text": "a brand new story"}], user_id="U1", token=TOKEN)
    assert [s["encoded"] for s in got["scores"]] == [False, True]
    cold = client.score(url, ["n2"], history=["n1", {"text": "pasta recipe"}], token=TOKEN)
    assert cold["user_encoded"] is True
    assert client.summary(url, "U1", token=TOKEN)["user_id"] == "U1"
    assert client.model(url, token=TOKEN)["model_version"] == "2"


def test_errors_carry_the_servers_message(url):
    with pytest.raises(client.ApiError, match=r"HTTP 404 from POST /v1/recommend: unknown user ids: 'nobody'") as e:
        client.recommend(url, "nobody", token=TOKEN)
    assert e.value.status == 404
    with pytest.raises(client.ApiError, match=r"HTTP 413 .*k: 51 is more than serve.max_k=50"):
        client.recommend(url, "U1", k=51, token=TOKEN)
    with pytest.raises(client.ApiError, match="HTTP 401 .*missing bearer token"):
        client.model(url)
    with pytest.raises(client.ApiError, match="HTTP 404 .*unknown user id 'a/b'"):
        client.summary(url, "a/b", token=TOKEN)  # quoted into one path segment


def test_connection_refused_is_a_clear_error():
    with pytest.raises(client.ApiError, match=r"cannot reach the EmbSum API at http://127.0.0.1:\d+: .*embsum serve"):
        client.model(f"http://127.0.0.1:{_port()}", timeout=5)


def test_base_url_from_config():
    cfg = config_from_dict({"serve": {"host": "0.0.0.0", "port": 8100, "route_prefix": "/api"}})
    assert client.base_url(cfg) == "http://127.0.0.1:8100/api"
    assert client.base_url(config_from_dict({})) == "http://127.0.0.1:8000"
