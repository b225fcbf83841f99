"""The operator's control plane of the Serve app: ``deploy`` / ``rollout`` / ``status`` /
``shutdown`` / ``serve_until_stopped``, and the stage program ``python -m embsum.serve.control``
that `embsum serve ...` runs.

``deploy`` and ``rollout`` resolve the version once in the driver and submit it as the scorer's
user_config inside a declarative app config (the application itself is serve/app.py). Serve keeps
the built deployment, user_config included, in its checkpoint, so a controller restart does not
re-resolve it either. Rollouts change only that user_config, so Serve reconfigures the running
scorer replicas in place (serve/scorer.py): no restart, no dropped request. That in-place path
exists only for declaratively deployed applications (an app config with an import path, as
``serve deploy`` and a RayService's serveConfigV2 send): an imperative ``serve.run`` gives every
redeploy a new code version and replaces the replicas. Ray has no public Python call for a
declarative deploy (the ``serve deploy`` CLI posts to the dashboard's REST API, which local
clusters here run without), so ``_apply`` uses the controller client that ``serve run config.yaml``
uses; states come from the public ``serve.status()``.

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
import logging
import threading
import time
from typing import Any

from ray import serve

from embsum import events
from embsum.config import Config, replace
from embsum.registry import Registry
from embsum.runtime import SERVE_STOP_TIMEOUT_S, default_local_serve_drain, worker_env

from .app import APP_NAME, IMPORT_PATH, config_from_args, http_options
from .auth import api_token
from .deployment import DEPLOYMENT_NAME
from .ingress import serve_env
from .lifecycle import StopSignals, shutdown_serve

logger = logging.getLogger(__name__)

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


def serve_until_stopped(*, own_cluster: bool, stop_timeout_s: float = SERVE_STOP_TIMEOUT_S,
                        signals: StopSignals | None = None) -> None:
    """Block until SIGINT or SIGTERM (``signals``, armed already, or armed here), then shut Serve down,
    waiting at most ``stop_timeout_s`` for it, and stop the local Ray cluster if this process started it."""
    if signals is None:
        with StopSignals() as armed:
            _wait_then_stop(armed, own_cluster, stop_timeout_s)
    else:
        _wait_then_stop(signals, own_cluster, stop_timeout_s)


def _wait_then_stop(signals: StopSignals, own_cluster: bool, stop_timeout_s: float) -> None:
    while not signals.stopping.wait(1.0):
        pass
    signals.ignore()
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


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "deploy", "rollout", "serve_env", "serve_until_stopped", "shutdown", "status"]


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
        with StopSignals() as signals:  # armed before anyone can find the record and send a stop
            record_foreground(record, url=url, version=served)
            try:
                events.progress(f"serving v{served} on {url}")
                events.note(f"serving v{served} on {url} - Ctrl-C or `embsum serve stop` to stop")
                serve_until_stopped(own_cluster=cfg.ray.address is None, signals=signals)
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
    if a.action == "shutdown":  # bounded: a stuck Serve must not hold up the caller (a run's exit, Ctrl-C)
        from embsum.runtime import init_ray

        init_ray(cfg.ray)
        _handles.clear()
        clean = shutdown_serve()
        where = f"on the cluster at {cfg.ray.address}"
        events.summary(f"Serve shut down {where}" if clean else
                       f"Serve did not shut down within {SERVE_STOP_TIMEOUT_S:.0f}s {where}")
        return {"shutdown": clean}
    raise ValueError(f"unknown action {a.action!r}")


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    def add(p: Any) -> None:
        p.add_argument("action", choices=["run", "deploy", "rollout", "status", "shutdown"])
        p.add_argument("--version", default=None, help="run/deploy/rollout: the version to pin (default: "
                                                       "serve.model_version, else the alias's, resolved once)")

    return stage_main("python -m embsum.serve.control", __doc__, _cli, argv, add)


if __name__ == "__main__":
    import sys

    sys.exit(main())
