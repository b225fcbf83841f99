"""Process environment and the Ray connection, set up once per program (never at import time)."""

from __future__ import annotations

import os
from typing import Any

from embsum.config import RayConfig

# Nothing reaches a model hub or phones home; DeepSpeed picks the CPU accelerator when no GPU is
# visible. setdefault: a user's explicit setting always wins.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Keeps a local Ray cluster on 127.0.0.1 instead of the machine's eth0 address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def setup_env(offline: bool = True) -> None:
    for k, v in QUIET_ENV.items():
        if not offline and k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            continue
        os.environ.setdefault(k, v)


def worker_env() -> dict[str, str]:
    """Env vars every Ray worker gets (runtime_env), so workers behave like the driver."""
    env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}
    for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "EMBSUM_SHARED_DATA"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


def local_num_cpus(cfg: RayConfig) -> int:
    """Logical CPUs for a local cluster: at least 4, so Ray Data read tasks never starve behind
    train workers on a 2-core machine (a measured hang, see stack-notes)."""
    return cfg.num_cpus or max(4, os.cpu_count() or 1)


def init_ray(cfg: RayConfig, *, log_to_driver: bool = True) -> Any:
    """Connect to ``cfg.address`` or start a local cluster. Idempotent. Raises ``ValueError`` with
    the address when a given cluster cannot be reached."""
    import ray

    setup_env()
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": worker_env()}
    if cfg.address:
        _check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, namespace=cfg.namespace, runtime_env=runtime_env,
                     log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot reach the Ray cluster at ray.address={cfg.address!r}: {e}") from None
        return ray
    # No runtime_env here: a local cluster's raylet and workers inherit this process's environment
    # (setup_env ran above), and a job with a runtime_env cannot use the workers the raylet
    # prestarts without one: they idled while the job started its own (1-1.5 CPU-s each).
    kwargs: dict[str, Any] = {}
    if cfg.temp_dir:
        kwargs["_temp_dir"] = cfg.temp_dir
    num_cpus = local_num_cpus(cfg)
    system = local_system_config(num_cpus)
    if system:
        kwargs["_system_config"] = system
    # address="local": always a new cluster. Without it ray.init joins whatever `ray start` cluster
    # /tmp/ray/ray_current_cluster names (someone else's, on a shared machine) and then refuses num_cpus.
    ray.init(address="local", num_cpus=num_cpus, namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
             log_to_driver=log_to_driver, **kwargs)
    return ray


def local_system_config(num_cpus: int) -> dict[str, Any]:
    """Raylet settings for a cluster this process starts (never for one it joins).

    ``num_workers_soft_limit``: Ray keeps at most this many worker processes around and kills idle
    ones above it after a second (default: num_cpus). Ray Data's own actors (its stats and
    autoscaling coordinators) hold workers too, so between the stages of one job idle task workers
    were killed and started again for the next stage: each start imports ray, pyarrow and embsum,
    about 1-1.5 CPU-seconds on a 2-core machine. Measured on the prepare job, 50k impressions: one
    to four fresh workers per run at the default, none at 2 x num_cpus, 13.9 -> 13.0 CPU-s.
    An environment variable RAY_num_workers_soft_limit still wins (Ray reads it itself).
    """
    if os.environ.get("RAY_num_workers_soft_limit"):
        return {}
    return {"num_workers_soft_limit": 2 * num_cpus}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, instead of Ray's minute-long GCS retries."""
    import socket

    target = address.split("://", 1)[-1].rstrip("/")
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot reach the Ray cluster at ray.address={address!r}: {e}") from None


def use_hash_shuffle(ctx: Any) -> None:
    """Make a Ray DataContext use a hash shuffle, which ``repartition(keys=...)`` needs (Ray 2.60's
    default, SHUFFLE_V2: map and reduce tasks, no long-lived actors), unless it already does (an
    environment's RAY_DATA_DEFAULT_SHUFFLE_STRATEGY may pick a sort-based one)."""
    from ray.data.context import ShuffleStrategy

    if ctx.shuffle_strategy not in (ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.HASH_SHUFFLE):
        ctx.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
