"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, for tests.

It validates the request body the way a strict server would (model, messages as a list of
{role, content}), answers with the real response shape, and misbehaves on demand:

    ok            200 with a deterministic summary of the prompt
    fail_then_ok  500 for the first ``fail_times`` requests, then ok
    rate_limit    429 with ``Retry-After: <retry_after>`` for the first ``fail_times`` requests, then ok
    always_500    500 forever
    slow          sleeps ``slow_s`` (longer than the client's timeout) before answering
    bad_request   400 with an OpenAI-style error body

``fail_marker``: any request whose user message contains this string gets a 500 whatever the mode
(a partially failing endpoint: some users always fail, the others succeed). ``delay_s`` delays
every answer, so concurrent requests overlap and ``max_in_flight`` is meaningful.

Usage::

    with FakeLLM() as llm:
        llm.mode = "fail_then_ok"; llm.fail_times = 2
        url = llm.base_url          # http://127.0.0.1:<port>/v1
        ...; llm.requests, llm.max_in_flight, llm.bodies, llm.headers
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeLLM:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.fail_times = 0
        self.retry_after = "1"
        self.slow_s = 5.0
        self.delay_s = 0.0
        self.fail_marker: str | None = None
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by release(): sleeping handlers answer now
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-llm", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.max_in_flight = 0
            self.bodies.clear()
            self.headers.clear()

    def release(self, timeout: float = 5.0) -> None:
        """Wake handlers still sleeping (slow mode, delays) and wait until none is in flight, so
        requests a client gave up on do not leak into the next test's counts."""
        with self._lock:
            old, self._wake = self._wake, threading.Event()
        old.set()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def start(self) -> FakeLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- protocol ---------------------------------------------------------------------------
    def respond(self, body: dict[str, Any], n: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, json body, extra headers) for the n-th (1-based) request."""
        problem = _validate(body)
        if problem:
            return 400, _error(problem, "invalid_request_error"), {}
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if self.fail_marker and self.fail_marker in user:
            return 500, _error("injected failure for this prompt", "server_error"), {}
        mode = self.mode
        if mode == "always_500" or (mode == "fail_then_ok" and n <= self.fail_times):
            return 500, _error("internal error", "server_error"), {}
        if mode == "rate_limit" and n <= self.fail_times:
            return 429, _error("rate limit reached", "rate_limit_exceeded"), {"Retry-After": self.retry_after}
        if mode == "bad_request":
            return 400, _error("context length exceeded", "invalid_request_error"), {}
        if mode == "slow":
            self._wake.wait(self.slow_s)
        digest = hashlib.sha256(user.encode()).hexdigest()[:8]
        content = f"The user follows topic {digest} and reads widely."
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        completion_tokens = len(content.split())
        return 200, {
            "id": f"chatcmpl-{digest}{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, {}


def _validate(body: Any) -> str:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be {{role, content}}"
    if not any(m["role"] == "user" for m in msgs):
        return "no user message"
    for k, tp in (("max_tokens", int), ("temperature", (int, float))):
        if k in body and not isinstance(body[k], tp):
            return f"'{k}' has the wrong type"
    return ""


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _handler_for(llm: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real server

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route {self.path}", "not_found"), {})
                return
            with llm._lock:
                llm.requests += 1
                n = llm.requests
                llm.in_flight += 1
                llm.max_in_flight = max(llm.max_in_flight, llm.in_flight)
                llm.headers.append(dict(self.headers))
            try:
                try:
                    body = json.loads(raw)
                except ValueError:
                    status, payload, extra = 400, _error("body is not JSON", "invalid_request_error"), {}
                else:
                    with llm._lock:
                        llm.bodies.append(body)
                    if llm.delay_s:
                        llm._wake.wait(llm.delay_s)
                    status, payload, extra = llm.respond(body, n)
            finally:
                # Counted out before the answer is written: once the client has its answer it may
                # send the next request, which must not overlap this one in the count.
                with llm._lock:
                    llm.in_flight -= 1
            self._send(status, payload, extra)

        def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and went away (slow mode)

    return Handler
