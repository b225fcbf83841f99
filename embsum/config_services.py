"""The ``ray``, ``mlflow`` and ``serve`` sections of the run configuration: the services the platform
runs on (the Ray cluster, MLflow tracking and registry, the Ray Serve scorer).

Part of ``embsum.config`` (which re-exports every section; import them from there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from embsum.config_parse import SECTION


@dataclass(frozen=True, config=SECTION)
class RayConfig:
    """Where and how Ray runs."""

    address: str | None = Field(
        default=None, description="Ray cluster address ('auto', 'ray://host:10001'); null starts a local cluster.")
    num_cpus: int | None = Field(
        default=None, ge=1, description="Logical CPUs of a local cluster; null = detected cores, at least 4 "
                                        "(oversubscribed so Data read tasks never starve train workers).")
    namespace: str = Field(default="embsum", description="Ray namespace for named actors and Serve.")
    include_dashboard: bool = Field(
        default=True, description="Start the Ray dashboard with a local cluster, on 127.0.0.1: the State API (Ray "
                                  "Train's placement-group cleaner polls it, and warns every second without it), `ray "
                                  "list`, the web UI. About 0.25 GB more memory (PSS).")
    temp_dir: str | None = Field(
        default=None, description="Ray's temp/session directory for a local cluster; null = Ray's default.")


@dataclass(frozen=True, config=SECTION)
class MlflowConfig:
    """Tracking and the model registry."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI; '' = sqlite:////WORKDIR/mlflow/mlflow.db (embedded).")
    artifact_location: str = Field(
        default="", description="Artifact root for new experiments; '' = WORKDIR/mlflow/artifacts.")
    experiment: str = Field(default="embsum", description="Experiment name.")
    registered_model: str = Field(default="embsum", description="Registered model name.")
    alias: str = Field(default="champion", description="Alias the gate moves and serving loads (models:/NAME@ALIAS).")
    gate_metric: str = Field(default="auc", description="Validation metric the gate compares (higher is better).")
    gate_floor: float = Field(
        default=0.0, ge=-1e9, le=1e9, description="A version is promoted only if its gate metric is above this floor "
                                                  "and above the current champion's.")
    http_timeout_s: int = Field(
        default=30, ge=1, le=3600, description="Seconds an HTTP call to a tracking server may wait for an answer "
                                               "(sets MLFLOW_HTTP_REQUEST_TIMEOUT, MLflow's default 120). Raise it "
                                               "for multi-GB model uploads through a slow artifact proxy.")
    http_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a failed HTTP call to a tracking server (connection errors, "
                                            "429, 5xx; sets MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLflow's default 7, "
                                            "about 4 minutes).")
    http_backoff_factor: int = Field(
        default=1, ge=0, le=120, description="Backoff between those retries: about factor * 2^retry seconds (sets "
                                             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLflow's default 2).")


@dataclass(frozen=True, config=SECTION)
class ServeConfig:
    """The Ray Serve scorer."""

    host: str = Field(
        default="127.0.0.1", description="HTTP bind address. Beyond loopback (e.g. 0.0.0.0) the API refuses to start "
                                         "without a token unless serve.auth is 'none'.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field(default="/", description="Application route prefix.")
    ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy", description="HTTP ingress when `embsum serve` starts Serve: 'haproxy' = Ray Serve's "
                                       "high-throughput mode (RAY_SERVE_ENABLE_HA_PROXY=1, "
                                       "RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy forwards to an HTTP server in each "
                                       "replica), 'proxy' = Serve's Python HTTP proxy (one Ray actor call per "
                                       "request; slower). A RayService sets the same env vars on its pods.")
    model_version: str = Field(
        default="", description="Registered version to serve; '' = the version the alias points to at deploy time, "
                                "resolved once: every replica (new ones from autoscaling and restarts included) loads "
                                "that number until the next rollout.")
    embeddings_dir: str = Field(
        default="", description="Precomputed embeddings root; '' = WORKDIR/embeddings. The subfolder v<VERSION> must "
                                "hold a manifest naming the served version.")
    max_batch_size: int = Field(default=16, ge=1, le=4096, description="@serve.batch max batch size.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0.0, le=10.0, description="@serve.batch wait for a fuller batch, seconds; 0 = batch what "
                                                  "queued while the previous batch ran (lowest latency; measured in "
                                                  "bench/serve_bench).")
    max_ongoing_requests: int = Field(
        default=64, ge=1, le=100000, description="Per replica; must be >= max_batch_size.")
    access_log: bool = Field(
        default=False, description="Serve's per-request access log line on the replica (a log write per request; "
                                   "latency by route is in the Prometheus metrics either way).")
    min_replicas: int = Field(default=1, ge=0, le=10000, description="Autoscaling: fewest scorer replicas.")
    max_replicas: int = Field(default=2, ge=1, le=10000, description="Autoscaling: most scorer replicas.")
    target_ongoing_requests: float = Field(
        default=8.0, ge=0.1, le=100000, description="Autoscaling target per replica.")
    upscale_delay_s: float = Field(
        default=10.0, ge=0.0, le=3600, description="Autoscaling: seconds the load must stay above target before a "
                                                   "replica is added (a replica takes longer than this to load its "
                                                   "bundle; shorter chases noise).")
    downscale_delay_s: float = Field(
        default=300.0, ge=0.0, le=86400, description="Autoscaling: seconds the load must stay below target before a "
                                                     "replica is removed (long: each scale-down and scale-up pair "
                                                     "reloads a model and its embeddings).")
    look_back_period_s: float = Field(
        default=30.0, ge=0.1, le=3600, description="Autoscaling: seconds of load averaged for each decision.")
    metrics_interval_s: float = Field(
        default=10.0, ge=0.1, le=3600, description="Autoscaling: how often each replica reports its load (Serve's "
                                                   "autoscaling_config.metrics_interval_s, marked deprecated in Ray "
                                                   "2.60 but still the one it reads); must be below "
                                                   "look_back_period_s.")
    num_cpus: float = Field(default=1.0, ge=0.0, le=1024, description="CPUs per scorer replica.")
    num_gpus: float = Field(default=0.0, ge=0.0, le=64, description="GPUs per scorer replica.")
    max_replicas_per_node: int = Field(
        default=0, ge=0, le=10000, description="Most scorer replicas on one Ray node; 0 = no limit. 1 on Kubernetes: "
                                               "replicas land on different pods, so losing a pod loses one replica.")
    memory_gb: float = Field(
        default=1.0, ge=0.0, le=4096, description="Memory reserved per scorer replica, GiB "
                                                  "(ray_actor_options.memory): twice the bundle (a rollout holds two) "
                                                  "plus the process; sizing in cluster/README.md. 0 = not declared.")
    request_timeout_s: float = Field(
        default=30.0, ge=0.0, le=3600, description="Seconds before Serve answers a request 408 "
                                                   "(http_options.request_timeout_s); 0 = no limit.")
    max_candidates: int = Field(
        default=1000, ge=1, le=10_000_000, description="Most candidates per /v1/score request (else 413).")
    max_cold_items: int = Field(
        default=64, ge=0, le=10_000_000, description="Most candidates per /v1/score request that need a T5 encode "
                                                     "(given by text, id unknown to the served embeddings) (else 413).")
    max_history: int = Field(default=200, ge=1, le=1_000_000, description="Most history items per request (else 413).")
    max_k: int = Field(default=1000, ge=1, le=1_000_000, description="Largest k for /v1/recommend.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1 << 31, description="Largest request body (else 413).")
    auth: Literal["auto", "token", "none"] = Field(
        default="auto", description="API auth: 'auto' = bearer token when one is set, required on a bind beyond "
                                    "loopback; 'token' = required on any bind; 'none' = no auth even beyond loopback "
                                    "(only behind a gateway that authenticates). Placeholder tokens (CHANGE-ME, ...) "
                                    "and tokens under 16 characters are refused.")
    auth_token_env: str = Field(
        default="EMBSUM_API_TOKEN", description="Env var with the bearer token (see serve.auth).")
    auth_token_file: str = Field(
        default="", description="File holding the bearer token (takes precedence over the env var).")
