"""A real `mlflow server` process for tests, and a real HTTP proxy in front of it that fails on demand.

``MlflowServer``: ``mlflow server`` on 127.0.0.1 and a free port, with a SQLite backend and an
artifact proxy (--serve-artifacts) in a temporary folder, as the cluster's MLflow runs
(cluster/base/mlflow.yaml) minus PostgreSQL. About 10-15 s to start on 2 cores.

``FaultyProxy``: forwards every request to the server unchanged, except those whose path contains
``fail_path`` while ``failing`` is set: they get ``503 Service Unavailable`` (what a restarting
server or an overloaded ingress answers). ``stop()`` closes the port, so the proxy then behaves
like a killed server (connection refused). ``hits`` counts the failed requests.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ALIAS_PATH = "/registered-models/alias"  # MLflow's REST path of get_model_version_by_alias


def free_port() -> int:
    """A free port in 18000-18999 (other people may run services on the defaults meanwhile)."""
    for port in random.sample(range(18000, 19000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 18000-18999")


class MlflowServer:
    """``start_script``: run the server through this script (cluster/base/mlflow-start.sh) instead of
    `mlflow server`; it gets the options only, the backend store from MLFLOW_BACKEND_STORE_URI, and
    ``env`` on top of this process's environment."""

    def __init__(self, root: Path, start_script: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.root, self.start_script, self.env = root, start_script, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        options = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        store = f"sqlite:///{self.root / 'mlflow.db'}"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", **self.env)
        if self.start_script is None:
            cmd = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", store, *options]
        else:
            cmd = ["sh", str(self.start_script), *options]
            env.update(MLFLOW_BACKEND_STORE_URI=store, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
        self.log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        # Its own process group: stop() ends the server and its uvicorn workers, nothing else.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(self.proc.pid, sig)  # the group this server started (our child's id)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if getattr(self, "log", None):
            self.log.close()


class FaultyProxy:
    def __init__(self, upstream_port: int, fail_path: str = ALIAS_PATH) -> None:
        self.upstream_port, self.fail_path = upstream_port, fail_path
        self.failing = False
        self.hits = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.failing and proxy.fail_path in self.path:
                    proxy.hits += 1
                    msg = b"Service Unavailable"
                    self.send_response(503)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
