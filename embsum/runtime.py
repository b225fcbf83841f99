"""Process environment and the Ray connection, set up once per program (never at import time)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
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

# Process settings every embsum process and Ray worker gets (setdefault: a user's setting wins).
# Arrow's default memory pool in pyarrow's wheels (mimalloc) keeps the pages it frees for reuse, so
# a process that once held blocks keeps their memory while it lives: Ray Data's read worker, idle
# between reads at the training peak, held 267-271 MB PSS instead of 171-177 (bench/train_memory.py). With
# the C library's allocator, freed blocks go back to the system, and on the prepare job (200k
# impressions, 2 runs each, AMD EPYC) the tree peaked at 3,175-3,276 MB PSS instead of 3,394-3,505,
# the Ray job took 16.5-17.1 s instead of 17.0-24.1 and the one-process pandas baseline 19.9-21.4 s
# instead of 22.1-24.3 (mimalloc with MIMALLOC_PURGE_DELAY=0: 2,990-3,011 MB but 18.6 s).
PROCESS_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


# How long a Serve replica that is being stopped keeps answering on a local cluster (Ray Serve's
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S; a RayService keeps Ray's default, 30 s). Behind
# HAProxy a stopping replica (a scale-down, a shutdown) must keep answering until no HAProxy sends
# to it any more: the controller's update reaches the HAProxy manager, which writes a new config
# and starts a new HAProxy that takes the listeners over. That took 0.7-2.3 s on a 2-core machine
# in the integration tests' Serve logs ("Stopping Replica" to "Successfully performed graceful
# HAProxy reload"), up to 9 s on the same machine saturated. A replica that closes earlier closes
# HAProxy's keep-alive connections while HAProxy still sends on them, and HAProxy then drops the
# client's connection without an answer (its rule for a keep-alive request that fails: the client
# is to retry); a client that does not retry POSTs loses the request. With the 1-2 s drains used
# before, a scale-down under load lost ~1 request in 10,000 (bench/drain_bench.py reproduces it).
# 10 s is over 4x the quiet-machine worst case; the cost is at a stop, which waits for the drain.
SERVE_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_SERVE_DRAIN_S = 10.0
# A local stop waits this long for serve.shutdown() (the drain, then the replicas' and HAProxy's exit).
SERVE_STOP_TIMEOUT_S = LOCAL_SERVE_DRAIN_S + 10.0


def default_local_serve_drain() -> None:
    """Set LOCAL_SERVE_DRAIN_S for the Serve processes of a local cluster (serve/ingress.py forwards
    RAY_SERVE_* variables to them), unless the caller set the variable."""
    os.environ.setdefault(SERVE_DRAIN_ENV, f"{LOCAL_SERVE_DRAIN_S:g}")


def process_env() -> None:
    """PROCESS_ENV for this process and the processes it starts, unless set. Arrow picks its pool
    when pyarrow is imported: `embsum` calls this first thing (its stages and a local cluster's
    workers inherit it); Ray workers of a cluster reached by address get it from worker_env()."""
    for k, v in PROCESS_ENV.items():
        os.environ.setdefault(k, v)


def setup_env(offline: bool = True) -> None:
    """QUIET_ENV and PROCESS_ENV for this process and a local cluster it starts, unless set."""
    for k, v in QUIET_ENV.items():
        if not offline and k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            continue
        os.environ.setdefault(k, v)
    process_env()


def worker_env() -> dict[str, str]:
    """Env vars every Ray worker gets (runtime_env), so workers behave like the driver."""
    env = {k: os.environ.get(k, v) for k, v in {**QUIET_ENV, **PROCESS_ENV}.items()}
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
    local_cluster_env()
    kwargs: dict[str, Any] = {}
    if cfg.temp_dir:
        kwargs["_temp_dir"] = cfg.temp_dir
    if cfg.include_dashboard:
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=_pin_api_server())
    num_cpus = local_num_cpus(cfg)
    system = local_system_config(num_cpus)
    if system:
        kwargs["_system_config"] = system
    # address="local": always a new cluster. Without it ray.init joins whatever `ray start` cluster
    # /tmp/ray/ray_current_cluster names (someone else's, on a shared machine) and then refuses num_cpus.
    ray.init(address="local", num_cpus=num_cpus, namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
             log_to_driver=log_to_driver, **kwargs)
    return ray


# For a cluster this process starts (its raylet, hence every worker, inherits this environment):
# - Ray Train's preemption watcher is an actor per run (about 0.2 GB RSS) that polls Ray Core's
#   node-drain state, which only a cloud or KubeRay autoscaler sets: a local cluster has nothing to
#   preempt. A RayService keeps Ray's default (on).
# - MAX_JOBS=1: DeepSpeed's CPU accelerator JIT-compiles its shared-memory comm op on a machine's
#   first training run (cached in TORCH_EXTENSIONS_DIR after); ninja's default of one compiler per
#   core ran two cc1plus of ~0.7 GB RSS each, the largest item of the train stage's peak on a fresh
#   machine (bench/train_memory.py). One at a time costs seconds, once.
# - Ray Data's parquet reader lists a dataset's files through a pool of FooterReader actors, 32 of
#   them by default, each a worker process (about 0.2 GB RSS) that reads footers with 128 I/O
#   threads: for the train stage's two one-file datasets six such processes were alive at its peak
#   (1.2 GB RSS). One actor reads the footers of every file a single machine holds.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "MAX_JOBS": "1",
                     "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def local_cluster_env() -> None:
    """LOCAL_CLUSTER_ENV, unless the caller set the variables."""
    for k, v in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(k, v)


def _pin_api_server() -> int:
    """A free port for the dashboard of the cluster this process starts, named in RAY_API_SERVER_ADDRESS
    before the start, so the cluster's own processes inherit it. Ray's State API client (which Ray
    Train's placement-group cleaner calls with no address) otherwise looks for "the" cluster on
    the machine and fails ("Found multiple active Ray instances") where several run: tests, a
    benchmark, a colleague's. Set even over an inherited value: no one else knows this port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def local_system_config(num_cpus: int) -> dict[str, Any]:
    """Raylet settings for a cluster this process starts (never for one it joins).

    ``num_workers_soft_limit``: Ray keeps at most this many worker processes around and kills idle
    ones above it after a second (default: num_cpus). Ray Data's own actors (its stats and
    autoscaling coordinators) hold workers too, so between the stages of one job idle task workers
    were killed and started again for the next stage: each start imports ray, pyarrow and embsum,
    about 1-1.5 CPU-seconds on a 2-core machine. Measured on the prepare job, 50k impressions: one
    to four fresh workers per run at the default, none at 2 x num_cpus, 13.9 -> 13.0 CPU-s.

    ``worker_maximum_startup_concurrency``: how many workers the raylet starts at once. Ray derives
    it from the physical cores (2 here), not from the logical CPUs the cluster declares (4, on
    purpose, see local_num_cpus), and warns every driver once the workers alive reach 4x it ("8
    PYTHON worker processes have been started ... 4x the maximum expected startup concurrency
    (2)"): measured, the tiny CLI test's train stage held 12, the demo's 16 (2 train workers,
    Train's controller, cleaner and preemption watcher, Ray Data's coordinators, stats,
    autoscaling and location actors, read tasks, the idle workers kept above). Set to the declared
    CPUs: a small run stays under the warning; the demo's train stage still reaches it once (in
    the logs only, see embsum/console.py).

    ``prestart_worker_first_driver``: off. Ray starts one idle worker per logical CPU when the first
    driver connects, for tasks without a runtime_env; Ray Train's and Ray Data's actors carry one
    (Train forwards its RAY_TRAIN_* variables) and never use them: in the train stage all four sat
    idle until its data was read (0.33 GB RSS, bench/train_memory.py). Tasks start the workers they
    need instead (the read tasks' workers then idle under num_workers_soft_limit like any other).

    Each is left to Ray when its environment variable (RAY_<name>) is set: Ray reads it itself.
    """
    wanted = {"num_workers_soft_limit": 2 * num_cpus, "worker_maximum_startup_concurrency": num_cpus,
              "prestart_worker_first_driver": False}
    return {k: v for k, v in wanted.items() if not os.environ.get(f"RAY_{k}")}


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


# ---- a foreground `embsum serve start`, found by `embsum serve stop` -----------------------------------
def foreground_record(workdir: Path, port: int) -> Path:
    """Where a foreground server on ``port`` records its process (one per workdir and port)."""
    return Path(workdir) / "serve" / f"foreground-{port}.json"


def record_foreground(path: Path, **info: Any) -> None:
    """Write this process's id (and ``info``) to ``path``; `embsum serve stop` signals it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "started": time.time(), **info}))
    tmp.replace(path)


def foreground_pid(path: Path) -> int | None:
    """The recorded server's process id if that process still runs and is that server (a pid is
    reused once its process ended); a stale record is removed."""
    import psutil

    try:
        rec = json.loads(path.read_text())
        proc = psutil.Process(int(rec["pid"]))
        # A process started after the record was written is another one that got the same id.
        if proc.is_running() and proc.create_time() <= float(rec["started"]) + 1 \
                and any("serve.control" in part for part in proc.cmdline()):
            return proc.pid
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass
    path.unlink(missing_ok=True)
    return None
