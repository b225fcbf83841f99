"""Who may call the API (serve/auth.py): a bind beyond loopback never serves without a token unless
auth is off explicitly; placeholder and short tokens are refused; the OpenAPI document declares
the bearer scheme on every /v1/* operation when auth is on."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from embsum.config import ServeConfig
from serve.api import BEARER_SCHEME, ApiSettings, InProcessScorer, build_api
from serve.auth import MIN_TOKEN_CHARS, api_token, is_loopback
from tests.unit.test_serve_store import make_bundle, tiny_predictor

GOOD = "9f2c4e0b7a1d4c3e8f6a5b2d1c0e9f8a"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("embsum-serve", False),
])
def test_loopback_detection(host: str, loopback: bool):
    assert is_loopback(host) is loopback


def test_loopback_may_serve_without_a_token():
    assert api_token(ServeConfig(host="127.0.0.1"), {}) is None
    assert api_token(ServeConfig(host="127.0.0.1"), {"EMBSUM_API_TOKEN": GOOD}) == GOOD


def test_beyond_loopback_without_a_token_refuses_to_start():
    with pytest.raises(ValueError, match=r"serve.host='0.0.0.0' binds beyond loopback and no API token is set "
                                         r"\(env EMBSUM_API_TOKEN is empty\): refusing .* serve.auth=none"):
        api_token(ServeConfig(host="0.0.0.0"), {})
    assert api_token(ServeConfig(host="0.0.0.0"), {"EMBSUM_API_TOKEN": GOOD}) == GOOD
    # Explicitly off: no auth even beyond loopback, and a configured token is not even read.
    assert api_token(ServeConfig(host="0.0.0.0", auth="none"), {"EMBSUM_API_TOKEN": "CHANGE-ME"}) is None


def test_auth_token_mode_requires_one_everywhere(tmp_path):
    with pytest.raises(ValueError, match=r"serve.auth='token' but no API token is set"):
        api_token(ServeConfig(host="127.0.0.1", auth="token"), {})
    f = tmp_path / "token"
    f.write_text(GOOD + "\n")
    assert api_token(ServeConfig(host="127.0.0.1", auth="token", auth_token_file=str(f)), {}) == GOOD


@pytest.mark.parametrize("token", ["CHANGE-ME", "changeme", "Change_Me_Please_0123456789", "REPLACE-ME-WITH-A-TOKEN",
                                   "password", "your-token-goes-here", "placeholder-token-value", "<redacted>"])
def test_placeholder_tokens_are_refused(token: str):
    with pytest.raises(ValueError, match=r"the API token from env EMBSUM_API_TOKEN is a placeholder value") as e:
        api_token(ServeConfig(host="0.0.0.0"), {"EMBSUM_API_TOKEN": token})
    assert token not in str(e.value)  # never echoed


def test_short_tokens_are_refused_without_echoing_them(tmp_path):
    short = "k3Y-9x"
    f = tmp_path / "token"
    f.write_text(short)
    with pytest.raises(ValueError, match=rf"serve.auth_token_file='{f}' has {len(short)} characters; at least "
                                         rf"{MIN_TOKEN_CHARS} are required") as e:
        api_token(ServeConfig(auth_token_file=str(f)), {})
    assert short not in str(e.value)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_cfg, tokenizer):
    return make_bundle(tmp_path_factory.mktemp("emb"), tiny_predictor(tiny_cfg, tokenizer, seed=5), "3")


def test_openapi_declares_the_bearer_scheme_when_auth_is_on(bundle):
    spec = TestClient(build_api(InProcessScorer(bundle), ApiSettings(token=GOOD))).get("/openapi.json").json()
    assert spec["components"]["securitySchemes"][BEARER_SCHEME] == {
        "type": "http", "scheme": "bearer",
        "description": "Authorization: Bearer <token> (serve.auth_token_file or serve.auth_token_env)."}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            secured = op.get("security") == [{BEARER_SCHEME: []}]
            assert secured == path.startswith("/v1/"), (method, path, op.get("security"))
    open_spec = TestClient(build_api(InProcessScorer(bundle), ApiSettings())).get("/openapi.json").json()
    assert "securitySchemes" not in open_spec["components"]
    assert not any("security" in op for ops in open_spec["paths"].values() for op in ops.values())
