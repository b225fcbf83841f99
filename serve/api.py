"""The HTTP API as a plain FastAPI app over any scorer: each Serve replica (serve/deployment.py) runs
it over its own in-process Scorer, and the unit tests and the bench's bare uvicorn app run it over
an in-process scorer too, so every HTTP behaviour (validation, limits, auth, errors) is one code path.

Errors: every error body is ``{"detail": "<message naming the field, ids or limit>"}``.
401 missing/wrong bearer token; 404 unknown ids; 413 over a configured limit or serve.max_body_bytes;
422 invalid JSON or a field of the wrong type/shape; 503 no model loaded yet. Bad input never
yields a 5xx (tests/unit/test_serve_api.py and tests/integration/test_serve.py fuzz it).
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from embsum.config import ServeConfig

from . import engine
from .bundle import Bundle
from .engine import Item, RecommendQuery, RecommendResult, Rejection, ScoreQuery, ScoreResult
from .schemas import (
    ErrorResponse,
    ItemRef,
    ModelResponse,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    Status,
    SummaryResponse,
)

OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
MODEL_VERSION_HEADER = "X-Model-Version"
BEARER_SCHEME = "bearerAuth"


class ScorerClient(Protocol):
    """What the API needs from a scorer (serve/scorer.Scorer in a replica, or the bench's direct one)."""

    async def score(self, query: ScoreQuery) -> ScoreResult | Rejection: ...
    async def recommend(self, query: RecommendQuery) -> RecommendResult | Rejection: ...
    async def summary(self, user_id: str) -> SummaryResponse | Rejection: ...
    async def model_info(self) -> ModelResponse | Rejection: ...
    async def ready(self) -> Status: ...


class Observer(Protocol):
    def observe(self, route: str, code: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class ApiSettings:
    max_candidates: int = 1000
    max_history: int = 200
    max_k: int = 1000
    max_body_bytes: int = 1 << 20
    max_cold_items: int | None = None  # enforced by the scorer (only it knows which ids are unknown)
    token: str | None = None  # None = auth off

    @classmethod
    def from_config(cls, s: ServeConfig, token: str | None = None) -> ApiSettings:
        return cls(max_candidates=s.max_candidates, max_history=s.max_history, max_k=s.max_k,
                   max_body_bytes=s.max_body_bytes, max_cold_items=s.max_cold_items, token=token)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: any string (even one echoing odd input) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": detail}, status_code=status, headers=headers)


# ---- ASGI middlewares (before any body parsing, so a refused request costs nothing) --------------
class _BodyLimit:
    """413 for bodies over the limit, by Content-Length or, when chunked, by counting."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # no length given: read it all (bounded) before the app sees any of it
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._too_big(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_big(self, scope: dict, receive: Callable, send: Callable) -> None:
        await _error(413, f"request body is larger than serve.max_body_bytes={self.limit}")(scope, receive, send)


class _BearerAuth:
    """401 unless ``Authorization: Bearer <token>``; health, readiness and the API docs stay open."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or _route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != b"bearer" or not given.strip():
            return await _error(401, "missing bearer token (Authorization: Bearer <token>)", challenge)(
                scope, receive, send)
        if not hmac.compare_digest(given.strip(), self.token):
            return await _error(401, "invalid bearer token", challenge)(scope, receive, send)
        return await self.app(scope, receive, send)


class _Timing:
    """Reports route template, status code and seconds of every response to the observer, and tells
    the client how long the app took before it answered: ``Server-Timing: app;dur=<ms>`` (W3C Server
    Timing), so a caller can tell the app's time from the network's and the ingress's."""

    def __init__(self, app: Any, observer: Observer) -> None:
        self.app, self.observer = app, observer

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, code = time.perf_counter(), 500

        async def send_wrapper(msg: dict) -> None:
            nonlocal code
            if msg["type"] == "http.response.start":
                code = msg["status"]
                dur = f"app;dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()
                msg = {**msg, "headers": [*msg.get("headers", ()), (b"server-timing", dur)]}
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.observer.observe(_route_label(_route_path(scope)), code, time.perf_counter() - t0)


_SUMMARY = re.compile(r"^/v1/users/.+/summary$")
_ROUTES = ("/v1/score", "/v1/recommend", "/v1/model", "/healthz", "/readyz")


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _route_label(path: str) -> str:
    """Bounded label set for metrics: the route template, never a raw path with ids in it."""
    if path in _ROUTES:
        return path
    return "/v1/users/{user_id}/summary" if _SUMMARY.match(path) else "other"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            where = "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 10
    return "; ".join(parts) + (f"; and {more} more errors" if more > 0 else "")


def _items(refs: list[ItemRef] | None) -> list[Item] | None:
    return None if refs is None else [(r.item_id, r.text) for r in refs]


# ---- the app -----------------------------------------------------------------------------------------
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when auth is on)."},
    404: {"model": ErrorResponse, "description": "Unknown user or item ids (named in the message)."},
    413: {"model": ErrorResponse, "description": "Over a configured limit (named in the message)."},
    422: {"model": ErrorResponse, "description": "Invalid JSON or field (named in the message)."},
    503: {"model": ErrorResponse, "description": "No model loaded yet."},
}


def build_api(scorer: ScorerClient, settings: ApiSettings, observer: Observer | None = None) -> FastAPI:
    """The FastAPI app; ``settings`` carry the limits and the token (None = auth off)."""
    s = settings
    app = FastAPI(title="EmbSum recommender API", version="1", description=_description(s),
                  default_response_class=AsciiJSONResponse)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> AsciiJSONResponse:
        return _error(422, _validation_message(exc))

    _add_v1_routes(app, scorer, s)
    _add_probes(app, scorer)
    _document_limits(app, s)
    # The last added runs first: timing sees every response, then auth, then the size check.
    app.add_middleware(_BodyLimit, limit=s.max_body_bytes)
    if s.token:
        app.add_middleware(_BearerAuth, token=s.token)
    if observer is not None:
        app.add_middleware(_Timing, observer=observer)
    return app


def _description(s: ApiSettings) -> str:
    """The OpenAPI description: what the API does, this deployment's limits and its auth."""
    return ("Scores and recommendations from the EmbSum model served by Ray Serve. Known users and "
            "items are scored from precomputed embeddings; unknown ones given by text are encoded on "
            f"the fly. Limits: {s.max_candidates} candidates, {s.max_history} history items, "
            f"k <= {s.max_k}, {s.max_body_bytes} body bytes"
            + (f", {s.max_cold_items} candidates to encode per request" if s.max_cold_items is not None
               else "") + " (413 above). Auth: "
            f"{'bearer token required on /v1/* (securityScheme bearerAuth)' if s.token else 'off'}.")


def _reply(result: Any, response: Response) -> Any:
    """A scorer's answer as the HTTP response: its error, or its body with the model version header."""
    if isinstance(result, Rejection):
        return _error(result.status, result.detail)
    version = {MODEL_VERSION_HEADER: str(result.model_version)}
    if isinstance(result, ScoreResult):  # already the documented shape: no re-validation
        return Response(result.json_bytes(), media_type="application/json", headers=version)
    if isinstance(result, RecommendResult):
        return AsciiJSONResponse(result.to_json(), headers=version)
    response.headers.update(version)
    return result


def _over(what: str, n: int, limit: int, key: str) -> AsciiJSONResponse | None:
    """413 naming the field and the serve.* limit when ``n`` exceeds it, else None."""
    if n > limit:
        return _error(413, f"{what}: {n} is more than serve.{key}={limit}")
    return None


def _history_limit(history: list | None, s: ApiSettings) -> AsciiJSONResponse | None:
    return _over("history", len(history), s.max_history, "max_history") if history else None


def _add_v1_routes(app: FastAPI, scorer: ScorerClient, s: ApiSettings) -> None:
    """/v1/score, /v1/recommend, /v1/users/{id}/summary and /v1/model: limits checked here (413),
    the rest answered by the scorer."""

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, summary="Score candidates for a user")
    async def score(body: ScoreRequest, response: Response) -> Any:
        refused = (_over("candidates", len(body.candidates), s.max_candidates, "max_candidates")
                   or _history_limit(body.history, s))
        return refused or _reply(await scorer.score(
            ScoreQuery(user_id=body.user_id, history=_items(body.history), candidates=_items(body.candidates) or [])),
            response)

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS,
              summary="Top k of the whole catalog for a user")
    async def recommend(body: RecommendRequest, response: Response) -> Any:
        if "k" not in body.model_fields_set and body.k > s.max_k:  # the default k never exceeds the limit
            body = body.model_copy(update={"k": s.max_k})
        refused = (_over("k", body.k, s.max_k, "max_k") or _history_limit(body.history, s)
                   or _over("exclude", len(body.exclude), s.max_candidates, "max_candidates"))
        return refused or _reply(await scorer.recommend(
            RecommendQuery(user_id=body.user_id, history=_items(body.history), k=body.k, exclude=body.exclude,
                           exclude_history=body.exclude_history)), response)

    @app.get("/v1/users/{user_id:path}/summary", response_model=SummaryResponse, responses=ERRORS,
             summary="The user's precomputed interest summary")
    async def summary(user_id: str, response: Response) -> Any:
        return _reply(await scorer.summary(user_id), response)

    @app.get("/v1/model", response_model=ModelResponse, responses=ERRORS,
             summary="The served model version, its embeddings and the last rollout error")
    async def model(response: Response) -> Any:
        return _reply(await scorer.model_info(), response)


def _add_probes(app: FastAPI, scorer: ScorerClient) -> None:
    """/healthz (liveness) and /readyz (readiness: 503 until a model and its embeddings are loaded)."""

    @app.get("/healthz", response_model=Status, summary="Liveness: the process answers")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}},
             summary="Readiness: a model version and its embeddings are loaded")
    async def readyz() -> Any:
        try:
            status = await scorer.ready()
        except Exception as e:  # noqa: BLE001 - a scorer that cannot answer is simply not ready
            status = Status(status=f"scorer unavailable: {type(e).__name__}")
        if status.status != "ok":
            return AsciiJSONResponse(status.model_dump(), status_code=503)
        return status


def _document_limits(app: FastAPI, s: ApiSettings) -> None:
    """Put this deployment's limits into the OpenAPI schema (the API doc states what 413 enforces),
    and with auth on, the bearer scheme that every /v1/* operation requires (401 without it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec["components"]["schemas"]
            for name in ("ScoreRequest", "RecommendRequest"):
                props = schemas[name]["properties"]
                for option in props["history"].get("anyOf", [props["history"]]):
                    if option.get("type") == "array":
                        option["maxItems"] = s.max_history
            schemas["ScoreRequest"]["properties"]["candidates"]["maxItems"] = s.max_candidates
            schemas["RecommendRequest"]["properties"]["k"]["maximum"] = s.max_k
            schemas["RecommendRequest"]["properties"]["exclude"]["maxItems"] = s.max_candidates
            if s.token:
                spec["components"]["securitySchemes"] = {BEARER_SCHEME: {
                    "type": "http", "scheme": "bearer",
                    "description": "Authorization: Bearer <token> (serve.auth_token_file or serve.auth_token_env)."}}
                for path, ops in spec["paths"].items():
                    if path.startswith("/v1/"):
                        for op in ops.values():
                            op["security"] = [{BEARER_SCHEME: []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class InProcessScorer:
    """A ScorerClient over a bundle in this process (no Ray): unit tests and the bench's bare app."""

    def __init__(self, bundle: Bundle, alias: str = "champion", max_cold_items: int | None = None) -> None:
        self.bundle, self.alias, self.max_cold_items = bundle, alias, max_cold_items

    async def score(self, query: ScoreQuery) -> ScoreResult | Rejection:
        return engine.score_batch(self.bundle, [query], self.max_cold_items)[0][0]

    async def recommend(self, query: RecommendQuery) -> RecommendResult | Rejection:
        return engine.recommend_batch(self.bundle, [query])[0][0]

    async def summary(self, user_id: str) -> SummaryResponse | Rejection:
        return engine.user_summary(self.bundle, user_id)

    async def model_info(self) -> ModelResponse | Rejection:
        return engine.describe(self.bundle, alias=self.alias, requested=self.bundle.version, error=None)

    async def ready(self) -> Status:
        return Status(status="ok", model_version=self.bundle.version)

