"""A small HTTP client for the served API (what `embsum recommend` / `embsum score` call).

Plain httpx, no Ray or Serve import: it talks to any deployment (local, KubeRay) by URL. Every
failure is an ``ApiError`` whose message says what happened in words: the server's own message
for 4xx/5xx (it names the field, ids or limit), or that nothing answers at the URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from embsum.config import Config, ServeConfig

DEFAULT_TIMEOUT_S = 30.0


class ApiError(RuntimeError):
    """A failed API call: ``status`` is the HTTP status (0 when no response came back)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def read_token(s: ServeConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API's bearer token: serve.auth_token_file if set (it must exist and be non-empty), else
    the env var named by serve.auth_token_env; neither = None (the server then starts without auth
    only on a loopback bind or with serve.auth=none: serve/auth.py). Shared by the server and this
    client, so both read the same secret the same way."""
    if s.auth_token_file:
        path = Path(s.auth_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"serve.auth_token_file={s.auth_token_file!r} cannot be read: {e}") from None
        if not token:
            raise ValueError(f"serve.auth_token_file={s.auth_token_file!r} is empty")
        return token
    env = os.environ if environ is None else environ
    token = (env.get(s.auth_token_env) or "").strip() if s.auth_token_env else ""
    return token or None


def base_url(cfg: Config) -> str:
    """http://HOST:PORT/PREFIX of the config's deployment (a 0.0.0.0 bind is reached on loopback)."""
    s = cfg.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def _items(refs: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """'id' -> {"item_id": "id"}; mappings ({"text": ...}, {"item_id": ..., "text": ...}) as given."""
    return [{"item_id": r} if isinstance(r, str) else dict(r) for r in refs]


def _call(method: str, url: str, path: str, *, token: str | None, body: Any = None,
          timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    import httpx

    full = url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, full, json=body, headers=headers, timeout=timeout)
    except httpx.ConnectError as e:
        raise ApiError(f"cannot reach the EmbSum API at {url}: {e} (is it deployed? `embsum serve`)") from None
    except httpx.TimeoutException:
        raise ApiError(f"the EmbSum API at {url} did not answer {method} {path} within {timeout}s") from None
    except httpx.HTTPError as e:
        raise ApiError(f"{method} {full} failed: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text.strip() or r.reason_phrase
        raise ApiError(f"HTTP {r.status_code} from {method} {path}: {detail}", status=r.status_code)
    try:
        return r.json()
    except ValueError:
        raise ApiError(f"{method} {full} answered {r.status_code} with a body that is not JSON") from None


def recommend(url: str, user_id: str, k: int = 10, token: str | None = None, *,
              exclude: Sequence[str] = (), exclude_history: bool = True,
              timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """POST /v1/recommend for a known user -> {"model_version", "items": [{"item_id", "score", "text"}]}."""
    body = {"user_id": user_id, "k": k, "exclude": list(exclude), "exclude_history": exclude_history}
    return _call("POST", url, "/v1/recommend", token=token, body=body, timeout=timeout)


def score(url: str, candidates: Sequence[str | Mapping[str, Any]], user_id: str | None = None,
          token: str | None = None, *, history: Sequence[str | Mapping[str, Any]] | None = None,
          timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """POST /v1/score. Candidates and history items are ids (str) or {"item_id"?, "text"?} mappings;
    give ``user_id`` of a known user, or ``history`` for any user."""
    body: dict[str, Any] = {"candidates": _items(candidates)}
    if user_id is not None:
        body["user_id"] = user_id
    if history is not None:
        body["history"] = _items(history)
    return _call("POST", url, "/v1/score", token=token, body=body, timeout=timeout)


def summary(url: str, user_id: str, token: str | None = None, *,
            timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """GET /v1/users/{user_id}/summary -> {"user_id", "summary", "model_version"}."""
    from urllib.parse import quote

    return _call("GET", url, f"/v1/users/{quote(user_id, safe='')}/summary", token=token, timeout=timeout)


def model(url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """GET /v1/model -> name, version, aliases, embeddings manifest, last rollout error."""
    return _call("GET", url, "/v1/model", token=token, timeout=timeout)


def wait_ready(url: str, timeout_s: float = 120.0, token: str | None = None) -> dict[str, Any]:
    """Poll GET /readyz until the app answers 200 (the HTTP proxy accepts connections before the
    app is ready, so any error means 'not yet'); ApiError after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            return _call("GET", url, "/readyz", token=token, timeout=5.0)
        except ApiError as e:
            last = str(e)
        time.sleep(0.5)
    raise ApiError(f"the EmbSum API at {url} was not ready within {timeout_s:.0f}s: {last}")
