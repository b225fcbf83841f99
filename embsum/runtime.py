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
    kwargs: dict[str, Any] = {}
    if cfg.temp_dir:
        kwargs["_temp_dir"] = cfg.temp_dir
    ray.init(num_cpus=local_num_cpus(cfg), namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
             runtime_env=runtime_env, log_to_driver=log_to_driver, **kwargs)
    return ray


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
