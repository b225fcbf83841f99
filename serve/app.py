"""The Serve application: ``build_app(args)``, what ``serve run``/``serve deploy``, a RayService's
serveConfigV2 (``import_path: embsum.serve.app:build_app``) and serve/control.py's ``deploy`` build.

``build_app`` resolves the model version once (serve.model_version, else the version the alias
points to, through ``Registry.resolve``) and hands it to the scorer as ``user_config``. Every
replica, including those autoscaling adds later and those Serve restarts, loads that pinned
number: moving the alias changes nothing served until the next rollout (serve/control.py).

Args of ``build_app``: ``{"config": "ray_config.yaml", "overrides": ["serve.port=8100", ...]}``
(``overrides`` may also be one whitespace-separated string, as ``serve run ... overrides=...``
passes it), or ``{"values": {...}}``, a whole config mapping (what ``deploy`` sends, so the
cluster builds exactly the config the caller validated).

The application is one deployment, EmbSumScorer (serve/deployment.py: HTTP ingress and scorer in
one replica; why there is no separate ingress is said there).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from embsum.config import Config, ServeConfig, config_from_dict, load_config, replace
from embsum.registry import Registry
from embsum.runtime import setup_env

from .auth import api_token
from .deployment import DEPLOYMENT_NAME, EmbSumScorer

APP_NAME = "embsum"
IMPORT_PATH = "embsum.serve.app:build_app"
_ARGS = ("config", "overrides", "values")


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


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "IMPORT_PATH", "actor_options", "application", "autoscaling_config",
           "build_app", "config_from_args", "http_options"]
