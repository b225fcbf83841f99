"""The run configuration: typed, frozen sections of ``ray_config.yaml``, validated once.

Every field carries a one-line doc and its allowed range in ``metadata``; the README's config
reference is generated from them (``embsum config-docs``), so docs and code cannot drift.
``load_config(path, overrides)`` reads YAML, applies dotted overrides (``train.lr=3e-4``) and
raises ``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from embsum.typed_config import build, check_key_path, flatten, merge, parse_scalar, reference
from embsum.typed_config import field_doc as _f


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs."""

    address: str | None = _f(None, "Ray cluster address ('auto', 'ray://host:10001'); null starts a local cluster.")
    num_cpus: int | None = _f(None, "Logical CPUs of a local cluster; null = detected cores, at least 4 "
                              "(oversubscribed so Data read tasks never starve train workers).", lo=1)
    namespace: str = _f("embsum", "Ray namespace for named actors and Serve.")
    include_dashboard: bool = _f(True, "Start the Ray dashboard with a local cluster, on 127.0.0.1: the State API "
                                 "(Ray Train's placement-group cleaner polls it, and warns every second without "
                                 "it), `ray list`, the web UI. About 0.25 GB more memory (PSS).")
    temp_dir: str | None = _f(None, "Ray's temp/session directory for a local cluster; null = Ray's default.")


@dataclass(frozen=True)
class TeacherConfig:
    """Who writes the user-interest summaries that supervise the decoder."""

    kind: Literal["offline", "openai"] = _f("offline", "'offline': deterministic summary from the history, no LLM; "
                                            "'openai': an OpenAI-compatible chat-completions endpoint.")
    base_url: str = _f("http://127.0.0.1:8001/v1", "Endpoint base URL (vLLM, TGI, a hosted API); "
                       "'/chat/completions' is appended.")
    model: str = _f("mistralai/Mixtral-8x22B-Instruct-v0.1", "Model name sent in the request.")
    api_key_env: str = _f("OPENAI_API_KEY", "Environment variable holding the bearer key (unset = no auth header).")
    prompt_version: str = _f("v1", "Version tag of the prompt; part of the cache key and stored with each summary.")
    max_items: int = _f(30, "Most recent history items shown to the teacher.", lo=1, hi=1000)
    max_concurrency: int = _f(8, "Concurrent requests per summarize worker.", lo=1, hi=1024)
    timeout_s: float = _f(60.0, "Per-request timeout in seconds.", lo=0.01, hi=3600)
    max_retries: int = _f(4, "Retries per request on timeouts, 429 and 5xx, with exponential backoff.", lo=0, hi=20)
    backoff_s: float = _f(1.0, "First backoff delay in seconds; doubles per retry, with jitter.", lo=0.0, hi=600)
    max_tokens: int = _f(96, "max_tokens sent to the endpoint.", lo=8, hi=4096)
    temperature: float = _f(0.0, "Sampling temperature sent to the endpoint.", lo=0.0, hi=2.0)
    prompt_template: str = _f("", "Prompt template file ('' = the built-in one); {history} is replaced by the "
                              "user's recent items, one per line.")
    cache_dir: str = _f("", "Response cache (one JSON file per sha256(prompt_version, model, prompt)); "
                        "'' = WORKDIR/cache/teacher. Shared storage on multi-node clusters.")
    max_failure_fraction: float = _f(0.05, "Summarize fails (after writing its report and failure list) when "
                                     "more than this share of training users got no summary.", lo=0.0, hi=1.0)
    num_workers: int = _f(2, "Most summarize actors (the pool grows from 1 as input queues up); each holds "
                          "one teacher and items lookup. Requests in flight <= num_workers * max_concurrency.",
                          lo=1, hi=4096)
    cpus_per_worker: float = _f(0.5, "CPUs reserved per summarize actor (the chat teacher mostly waits on "
                                "the network; the offline teacher and tokenizer use some CPU).", lo=0.01, hi=1024)
    facet_fields: list[str] = _f(lambda: ["category", "subcategory", "book_author", "author", "publisher"],
                                 "Offline teacher: catalog columns counted as interests (missing ones ignored).",
                                 factory=True)
    title_fields: list[str] = _f(lambda: ["title", "book_title"],
                                 "Offline teacher: catalog columns whose frequent terms are reported.", factory=True)
    entity_fields: list[str] = _f(lambda: ["title_entities", "abstract_entities"],
                                  "Offline teacher: MIND-style JSON entity columns.", factory=True)


@dataclass(frozen=True)
class DataConfig:
    """Raw logs in, tokenized training/evaluation shards out."""

    format: Literal["mind", "logs", "synthetic"] = _f(
        "synthetic", "'mind': behaviors.tsv + news.tsv; 'logs': generic engagement log + item catalog; "
        "'synthetic': generate a MIND-format demo set under workdir.")
    interactions: str = _f("", "Engagement log path or URI (file, directory or glob; s3://, gs:// work). "
                           "MIND: behaviors.tsv.")
    items: str = _f("", "Item catalog path or URI. MIND: news.tsv.")
    interactions_format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = _f(
        "auto", "File format of the log; 'auto' uses the file extension.")
    items_format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = _f("auto", "File format of the catalog.")
    user_col: str = _f("user_id", "Log column holding the user id.")
    item_col: str = _f("item_id", "Log column holding the item id.")
    timestamp_col: str | None = _f(None, "Log column holding the event time (ISO-8601, epoch seconds or "
                                   "'%m/%d/%Y %I:%M:%S %p'); null = no time (see event_order).")
    event_order: Literal["auto", "timestamp", "file", "random"] = _f(
        "auto", "Order of a user's events, which decides histories and held-out positives: 'timestamp' (needs "
        "timestamp_col), 'file' (only when the log's row order IS chronological), 'random' (a seeded random order "
        "per user, independent of row order: a log without time carries no order); 'auto' = timestamp when "
        "timestamp_col is set, else random.")
    label_col: str | None = _f(None, "Log column with a 0/1 click label or a rating; null = every row is a positive.")
    positive_threshold: float = _f(1.0, "A row is positive when label_col >= this (e.g. 8 for 1-10 ratings).")
    ignore_labels: list[float] = _f(list, "Label values that are neither positive nor negative and are "
                                    "dropped, counted (e.g. Book-Crossing's implicit 0).", factory=True)
    impression_col: str | None = _f(None, "Log column grouping rows into impressions; null = none.")
    item_id_col: str = _f("item_id", "Catalog column holding the item id.")
    item_text_fields: list[str] = _f(lambda: ["title", "category", "abstract"],
                                     "Catalog columns joined (in order) into an item's text.", factory=True)
    item_text_max_chars: int = _f(400, "Cap on an item's formatted text length, in characters.", lo=8, hi=100000)
    history_source: Literal["log", "column"] = _f(
        "column", "MIND: history from the impression's history column ('column') or from the user's "
                  "earlier clicks in the log ('log').")
    negatives: int = _f(4, "K: sampled negatives per training example (C = 1 + K candidates).", lo=1, hi=1000)
    eval_negatives: int = _f(49, "Sampled negatives per held-out evaluation impression (logs).", lo=1, hi=100000)
    eval_positives: int = _f(1, "Held-out positives per valid/test user (logs): each is one impression against "
                             "eval_negatives unseen items; more give a tighter confidence interval.", lo=1, hi=10000)
    valid_fraction: float = _f(0.1, "Share of users (by hash) in the validation split.", lo=0.0, hi=0.5)
    test_fraction: float = _f(0.1, "Share of users (by hash) in the test split.", lo=0.0, hi=0.5)
    min_history: int = _f(1, "Examples whose history has fewer items are skipped (counted).", lo=0, hi=10000)
    max_examples_per_user: int = _f(50, "Cap on training examples per user (most recent kept).", lo=1, hi=1000000)
    targets_per_example: int = _f(1, "T: positives per training example, sharing one history: the user side "
                                  "(sessions, summary, UPE: most of a step) is encoded once for T positives, each "
                                  "with its own K negatives.", lo=1, hi=256)
    views_per_user: int = _f(1, "Random event order only: each train user's positives are regrouped this many "
                             "times, each time with fresh random histories (more, and more varied, examples per "
                             "pass; a pass over V views is like V passes with new histories).", lo=1, hi=1000)
    seed: int = _f(0, "Seed for splits and negative sampling.")
    synth_users: int = _f(400, "Synthetic set: number of users.", lo=1, hi=10_000_000)
    synth_items: int = _f(600, "Synthetic set: number of items.", lo=10, hi=10_000_000)
    synth_impressions: int = _f(2000, "Synthetic set: number of impressions.", lo=1, hi=100_000_000)
    teacher: TeacherConfig = _f(TeacherConfig, "Teacher that writes the supervision summaries.", factory=True)


@dataclass(frozen=True)
class EmbSumConfig:
    """The EmbSum model: T5 backbone, session layout, poly-attention heads."""

    backbone: str = _f("t5-small", "Hugging Face name or local path of the T5 checkpoint (from_pretrained).")
    random_init: bool = _f(False, "Build T5 from the shape fields below with random weights instead of loading "
                           "backbone (offline demo and tests).")
    tokenizer: str = _f("", "Tokenizer name or path; '' = backbone; 'bundled' = the T5 tokenizer shipped in embsum.")
    d_model: int = _f(512, "random_init: hidden size (t5-small: 512).", lo=8, hi=16384)
    d_kv: int = _f(64, "random_init: size per attention head (t5-small: 64).", lo=4, hi=1024)
    d_ff: int = _f(2048, "random_init: feed-forward size (t5-small: 2048).", lo=8, hi=65536)
    num_layers: int = _f(6, "random_init: encoder layers (t5-small: 6).", lo=1, hi=128)
    num_decoder_layers: int = _f(6, "random_init: decoder layers (t5-small: 6).", lo=1, hi=128)
    num_heads: int = _f(8, "random_init: attention heads (t5-small: 8).", lo=1, hi=256)
    vocab_size: int = _f(32128, "random_init: vocabulary rows (t5-small: 32128 >= 32100 tokens).", lo=100, hi=1_000_000)
    dropout: float = _f(0.1, "Dropout rate inside T5.", lo=0.0, hi=0.9)
    sos_token: str = _f("<extra_id_0>", "Item start marker; a reserved T5 sentinel, so no vocabulary change "
                        "(see embsum/tokenization.py).")
    num_sessions: int = _f(4, "G: sessions per user history.", lo=1, hi=256)
    items_per_session: int = _f(5, "P: items per session; history length H = G * P.", lo=1, hi=256)
    session_tokens: int = _f(128, "L: tokens per session (each item gets (L - 1) // P tokens incl. its marker).",
                             lo=8, hi=4096)
    content_tokens: int = _f(48, "Tokens per candidate item (marker + text + EOS).", lo=4, hi=4096)
    summary_tokens: int = _f(48, "Max summary tokens (teacher-forced length and generation bound, incl. EOS).",
                             lo=2, hi=1024)
    summary_no_repeat_ngram: int = _f(3, "Summary generation never repeats an n-gram of this size "
                                      "(the standard summarization guard against 'and and and' loops); 0 = off.",
                                      lo=0, hi=64)
    summary_num_beams: int = _f(1, "Beam width of summary generation (1 = greedy). The UPE's global vector is read "
                                "from the generated summary, so this is part of the model: stored with each version "
                                "and used by validation, evaluate, embed and serve alike.", lo=1, hi=16)
    user_codes: int = _f(8, "M: user poly-embedding codes.", lo=1, hi=1024)
    content_codes: int = _f(4, "N: content poly-embedding codes.", lo=1, hi=1024)


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train + DeepSpeed."""

    num_workers: int = _f(2, "Ray Train workers (one per GPU on GPU clusters).", lo=1, hi=4096)
    use_gpu: bool = _f(False, "One GPU per worker; bf16 by default.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker.", lo=0.01, hi=1024)
    deepspeed_config: str = _f("train/deepspeed/zero2.json", "DeepSpeed config file (JSON or YAML), relative to "
                               "the config file's folder or absolute. Batch, lr and precision keys are filled in.")
    zero_stage: int | None = _f(None, "Overrides the file's zero_optimization.stage (0-3).", lo=0, hi=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "'auto' = bf16 on GPU, fp32 on CPU; fp16 is refused (T5 overflows in fp16).")
    batch_size: int = _f(16, "Micro-batch of examples per worker.", lo=1, hi=65536)
    grad_accum: int = _f(1, "Gradient accumulation steps.", lo=1, hi=4096)
    lr: float = _f(5e-4, "Peak learning rate (AdamW).", lo=1e-8, hi=1.0)
    weight_decay: float = _f(0.01, "AdamW weight decay.", lo=0.0, hi=1.0)
    warmup_steps: int = _f(50, "Linear warmup steps, then linear decay to 0 at max_steps.", lo=0, hi=10_000_000)
    max_steps: int = _f(600, "Optimizer steps in total.", lo=1, hi=100_000_000)
    grad_clip: float = _f(1.0, "Gradient-norm clip (0 = off).", lo=0.0, hi=1e6)
    summary_weight: float = _f(0.05, "lambda in L = L_NCE + lambda * L_sum.", lo=0.0, hi=100.0)
    in_batch_negatives: bool = _f(True, "NCE also scores each user against the other examples' candidates in the "
                                  "micro-batch (B*C more negatives, no extra encoding).")
    nce_temperature: float = _f(0.0, "NCE logits are score / t (training only; ranking is unchanged); "
                                "0 = sqrt(d_model).", lo=0.0, hi=1e6)
    checkpoint_every: int = _f(200, "Save (collectively) every N steps; also at the end.", lo=1, hi=100_000_000)
    keep_checkpoints: int = _f(2, "Checkpoints kept, best by validation AUC.", lo=1, hi=1000)
    eval_batches: int = _f(20, "Validation batches per checkpoint (0 = no validation).", lo=0, hi=1_000_000)
    eval_batch_size: int = _f(0, "Validation micro-batch per worker (0 = batch_size). Validation has no backward "
                              "pass, so a larger batch reads more of the valid set for the same time.", lo=0, hi=65536)
    log_every: int = _f(10, "Report metrics every N steps.", lo=1, hi=1_000_000)
    max_failures: int = _f(1, "Worker failures a run survives (restart from the latest checkpoint).", lo=-1, hi=1000)
    run_name: str = _f("", "Ray Train run name; rerunning a name resumes from its latest checkpoint. "
                       "'' = a fresh timestamped name per run.")
    storage_path: str = _f("", "Checkpoint storage (local dir, s3://, NFS); '' = WORKDIR/ray_results. "
                           "Must be shared storage on multi-node clusters.")
    seed: int = _f(0, "Seed for model init and data order.")
    fail_at_step: int | None = _f(None, "Testing only: rank 1 kills itself once at this step.", lo=1)


@dataclass(frozen=True)
class InferConfig:
    """Model inference outside training: the batch jobs (evaluate, embed) and the model batch of every predictor."""

    actors: int = _f(2, "Batch inference (evaluate, embed): model replicas in the Ray Data actor pool.",
                     lo=1, hi=100000)
    batch_size: int = _f(64, "Rows per model call: batch inference, and the scorer's encodes of unknown users "
                         "and items.", lo=1, hi=65536)
    rows_per_call: int = _f(2048, "Batch inference: most rows per actor call (the Ray Data batch; the model "
                            "sees batch_size at a time). Fewer, larger calls cost less per row.", lo=1, hi=10_000_000)
    cpus: float = _f(1.0, "Batch inference: CPUs per actor.", lo=0.01, hi=1024)
    gpus: float = _f(0.0, "Batch inference: GPUs per actor (e.g. 1 or 0.5 on GPU clusters).", lo=0.0, hi=64)


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking and the model registry."""

    tracking_uri: str = _f("", "MLflow tracking URI; '' = sqlite:////WORKDIR/mlflow/mlflow.db (embedded).")
    artifact_location: str = _f("", "Artifact root for new experiments; '' = WORKDIR/mlflow/artifacts.")
    experiment: str = _f("embsum", "Experiment name.")
    registered_model: str = _f("embsum", "Registered model name.")
    alias: str = _f("champion", "Alias the gate moves and serving loads (models:/NAME@ALIAS).")
    gate_metric: str = _f("auc", "Validation metric the gate compares (higher is better).")
    gate_floor: float = _f(0.0, "A version is promoted only if its gate metric is above this floor "
                           "and above the current champion's.", lo=-1e9, hi=1e9)
    http_timeout_s: int = _f(30, "Seconds an HTTP call to a tracking server may wait for an answer (sets "
                             "MLFLOW_HTTP_REQUEST_TIMEOUT, MLflow's default 120). Raise it for multi-GB model "
                             "uploads through a slow artifact proxy.", lo=1, hi=3600)
    http_retries: int = _f(2, "Retries of a failed HTTP call to a tracking server (connection errors, 429, 5xx; "
                           "sets MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLflow's default 7, about 4 minutes).", lo=0, hi=10)
    http_backoff_factor: int = _f(1, "Backoff between those retries: about factor * 2^retry seconds (sets "
                                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLflow's default 2).", lo=0, hi=120)


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve scorer."""

    host: str = _f("127.0.0.1", "HTTP bind address. Beyond loopback (e.g. 0.0.0.0) the API refuses to start "
                   "without a token unless serve.auth is 'none'.")
    port: int = _f(8000, "HTTP port.", lo=1, hi=65535)
    route_prefix: str = _f("/", "Application route prefix.")
    ingress: Literal["haproxy", "proxy"] = _f(
        "haproxy", "HTTP ingress when `embsum serve` starts Serve: 'haproxy' = Ray Serve's high-throughput mode "
        "(RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy forwards to an HTTP server in each "
        "replica), 'proxy' = Serve's Python HTTP proxy (one Ray actor call per request; slower). A RayService "
        "sets the same env vars on its pods.")
    model_version: str = _f("", "Registered version to serve; '' = the version the alias points to at deploy "
                            "time, resolved once: every replica (new ones from autoscaling and restarts "
                            "included) loads that number until the next rollout.")
    embeddings_dir: str = _f("", "Precomputed embeddings root; '' = WORKDIR/embeddings. The subfolder "
                             "v<VERSION> must hold a manifest naming the served version.")
    max_batch_size: int = _f(16, "@serve.batch max batch size.", lo=1, hi=4096)
    batch_wait_timeout_s: float = _f(0.0, "@serve.batch wait for a fuller batch, seconds; 0 = batch what queued "
                                     "while the previous batch ran (lowest latency; measured in bench/serve_bench).",
                                     lo=0.0, hi=10.0)
    max_ongoing_requests: int = _f(64, "Per replica; must be >= max_batch_size.", lo=1, hi=100000)
    access_log: bool = _f(False, "Serve's per-request access log line on the replica (a log write per request; "
                          "latency by route is in the Prometheus metrics either way).")
    min_replicas: int = _f(1, "Autoscaling: fewest scorer replicas.", lo=0, hi=10000)
    max_replicas: int = _f(2, "Autoscaling: most scorer replicas.", lo=1, hi=10000)
    target_ongoing_requests: float = _f(8.0, "Autoscaling target per replica.", lo=0.1, hi=100000)
    upscale_delay_s: float = _f(10.0, "Autoscaling: seconds the load must stay above target before a replica is "
                                "added (a replica takes longer than this to load its bundle; shorter chases "
                                "noise).", lo=0.0, hi=3600)
    downscale_delay_s: float = _f(300.0, "Autoscaling: seconds the load must stay below target before a replica "
                                  "is removed (long: each scale-down and scale-up pair reloads a model and its "
                                  "embeddings).", lo=0.0, hi=86400)
    look_back_period_s: float = _f(30.0, "Autoscaling: seconds of load averaged for each decision.",
                                   lo=0.1, hi=3600)
    metrics_interval_s: float = _f(10.0, "Autoscaling: how often each replica reports its load (Serve's "
                                   "autoscaling_config.metrics_interval_s, marked deprecated in Ray 2.60 but "
                                   "still the one it reads); must be below look_back_period_s.", lo=0.1, hi=3600)
    num_cpus: float = _f(1.0, "CPUs per scorer replica.", lo=0.0, hi=1024)
    num_gpus: float = _f(0.0, "GPUs per scorer replica.", lo=0.0, hi=64)
    max_replicas_per_node: int = _f(0, "Most scorer replicas on one Ray node; 0 = no limit. 1 on Kubernetes: "
                                    "replicas land on different pods, so losing a pod loses one replica.",
                                    lo=0, hi=10000)
    memory_gb: float = _f(1.0, "Memory reserved per scorer replica, GiB (ray_actor_options.memory): twice the "
                          "bundle (a rollout holds two) plus the process; sizing in cluster/README.md. "
                          "0 = not declared.", lo=0.0, hi=4096)
    request_timeout_s: float = _f(30.0, "Seconds before Serve answers a request 408 (http_options."
                                  "request_timeout_s); 0 = no limit.", lo=0.0, hi=3600)
    max_candidates: int = _f(1000, "Most candidates per /v1/score request (else 413).", lo=1, hi=10_000_000)
    max_cold_items: int = _f(64, "Most candidates per /v1/score request that need a T5 encode (given by text, "
                             "id unknown to the served embeddings) (else 413).", lo=0, hi=10_000_000)
    max_history: int = _f(200, "Most history items per request (else 413).", lo=1, hi=1_000_000)
    max_k: int = _f(1000, "Largest k for /v1/recommend.", lo=1, hi=1_000_000)
    max_body_bytes: int = _f(1_048_576, "Largest request body (else 413).", lo=1024, hi=1 << 31)
    auth: Literal["auto", "token", "none"] = _f(
        "auto", "API auth: 'auto' = bearer token when one is set, required on a bind beyond loopback; 'token' = "
        "required on any bind; 'none' = no auth even beyond loopback (only behind a gateway that authenticates). "
        "Placeholder tokens (CHANGE-ME, ...) and tokens under 16 characters are refused.")
    auth_token_env: str = _f("EMBSUM_API_TOKEN", "Env var with the bearer token (see serve.auth).")
    auth_token_file: str = _f("", "File holding the bearer token (takes precedence over the env var).")


@dataclass(frozen=True)
class Config:
    """The whole run configuration (``ray_config.yaml``)."""

    workdir: str = _f("runs", "Where everything is written (data, mlflow, checkpoints, embeddings); "
                      "relative to the current directory.")
    ray: RayConfig = _f(RayConfig, "Ray cluster.", factory=True)
    data: DataConfig = _f(DataConfig, "Data preparation.", factory=True)
    model: EmbSumConfig = _f(EmbSumConfig, "Model.", factory=True)
    train: TrainConfig = _f(TrainConfig, "Training.", factory=True)
    infer: InferConfig = _f(InferConfig, "Batch inference and model batches.", factory=True)
    mlflow: MlflowConfig = _f(MlflowConfig, "Tracking and registry.", factory=True)
    serve: ServeConfig = _f(ServeConfig, "Serving.", factory=True)

    def __post_init__(self) -> None:
        # Cross-field rules live here; single-field ranges are checked when the config is built.
        if self.serve.max_ongoing_requests < self.serve.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests={self.serve.max_ongoing_requests} must be >= "
                             f"serve.max_batch_size={self.serve.max_batch_size} or batches never fill")
        if self.serve.look_back_period_s <= self.serve.metrics_interval_s:
            raise ValueError(f"serve.look_back_period_s={self.serve.look_back_period_s} must be > "
                             f"serve.metrics_interval_s={self.serve.metrics_interval_s} (the window must hold "
                             f"at least one load report)")
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError(f"serve.min_replicas={self.serve.min_replicas} must be <= "
                             f"serve.max_replicas={self.serve.max_replicas}")
        if self.data.valid_fraction + self.data.test_fraction >= 1.0:
            raise ValueError(f"data.valid_fraction={self.data.valid_fraction} + data.test_fraction="
                             f"{self.data.test_fraction} must be < 1 (no users left to train on)")
        d = self.data
        if d.event_order == "timestamp" and d.format == "logs" and not d.timestamp_col:
            raise ValueError("data.event_order='timestamp' needs data.timestamp_col (the log has no time column "
                             "configured); use 'random', or 'file' if the rows are in chronological order")
        if d.format != "logs" and d.event_order in ("file", "random"):
            raise ValueError(f"data.event_order={d.event_order!r} applies to data.format='logs' only "
                             f"(format {d.format!r} has timestamps); use 'auto'")
        m = self.model
        if (m.session_tokens - 1) // m.items_per_session < 2:
            raise ValueError(f"model.session_tokens={m.session_tokens} leaves fewer than 2 tokens per item for "
                             f"model.items_per_session={m.items_per_session}; allowed: session_tokens >= "
                             f"2 * items_per_session + 1")
        if self.train.precision == "fp16":
            raise ValueError("train.precision='fp16' is refused: T5 overflows in fp16; use 'bf16' (GPU) or 'fp32'")
        if self.train.precision == "bf16" and not self.train.use_gpu:
            pass  # bf16 on CPU works with DeepSpeed (slowly); allowed on purpose

    # ---- derived paths (absolute, so Ray workers in other cwd's agree) ----
    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.workdir_path / "data"

    @property
    def embeddings_dir(self) -> Path:
        return Path(self.serve.embeddings_dir).expanduser().resolve() if self.serve.embeddings_dir \
            else self.workdir_path / "embeddings"

    @property
    def storage_path(self) -> str:
        return self.train.storage_path or str(self.workdir_path / "ray_results")

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return "sqlite:///" + str(self.workdir_path / "mlflow" / "mlflow.db")  # four slashes: absolute path

    @property
    def artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.workdir_path / "mlflow" / "artifacts").as_uri()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. {'train.lr': 0.0005}; what MLflow logs as params."""
        return flatten(self.to_dict())

    def fingerprint(self, section: str) -> str:
        """Short stable hash of one section (e.g. 'model' for embedding manifests)."""
        blob = json.dumps(dataclasses.asdict(getattr(self, section)), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS = ("ray", "data", "model", "train", "infer", "mlflow", "serve")
# Keys that moved: a config file or override naming the old key still works, with a FutureWarning
# naming the new one.
MOVED_KEYS = {f"train.infer_{k}": f"infer.{k}" for k in ("actors", "batch_size", "rows_per_call", "cpus", "gpus")}


def _moved_key(key: str) -> str:
    new = MOVED_KEYS.get(key)
    if new is not None:
        warnings.warn(f"config key {key} is now {new}; {key} will be removed", FutureWarning, stacklevel=4)
    return new or key


def _move_keys(raw: dict[str, Any]) -> None:
    """Old keys of a config mapping (MOVED_KEYS) -> their new place, in place."""
    for old in MOVED_KEYS:
        section, name = old.split(".")
        values = raw.get(section)
        if isinstance(values, dict) and name in values:
            new = _moved_key(old)
            new_section, new_name = new.split(".")
            dest = raw.setdefault(new_section, {})
            if isinstance(dest, dict) and new_name in dest:
                raise ValueError(f"{old} and {new} are both set: {old} is the old name of {new}; keep {new}")
            if isinstance(dest, dict):
                dest[new_name] = values.pop(name)


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a mapping plus ``key=value`` overrides."""
    raw: dict[str, Any] = json.loads(json.dumps(values or {}))  # deep copy, plain types
    _move_keys(raw)
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        key, text = ov.split("=", 1)
        key = _moved_key(key.strip())
        check_key_path(Config, key)
        merge(raw, key, parse_scalar(text))
    return build(Config, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``ray_config.yaml`` (or defaults when ``path`` is None) and apply dotted overrides.

    Relative paths become absolute here: ``train.deepspeed_config`` against the config file's
    folder (or the installed package), ``workdir``, ``train.storage_path`` and
    ``serve.embeddings_dir`` against the current directory.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r}: expected a mapping of sections {list(SECTIONS)}")
        values = loaded or {}
        ds = (values.get("train") or {}).get("deepspeed_config")
        if isinstance(ds, str) and ds and not Path(ds).is_absolute() and "://" not in ds:
            values.setdefault("train", {})["deepspeed_config"] = str(p.resolve().parent / ds)
    cfg = config_from_dict(values, overrides)
    # Relative paths resolve here, once, against the caller's working directory: Ray workers,
    # actors and Serve replicas run in other directories and must see the same absolute paths.
    ds = cfg.train.deepspeed_config
    if ds and "://" not in ds and not Path(ds).is_absolute() and not Path(ds).exists():
        # The packaged default (train/deepspeed/*.json) when run from outside the repository.
        packaged = Path(__file__).resolve().parents[1] / ds
        if packaged.exists():
            cfg = replace(cfg, "train.deepspeed_config", str(packaged))
    for key in ("train.deepspeed_config", "workdir", "train.storage_path", "serve.embeddings_dir"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value and "://" not in value and not Path(value).is_absolute():
            cfg = replace(cfg, key, str(Path(value).expanduser().resolve()))
    return cfg


def replace(cfg: Config, dotted: str, value: Any) -> Config:
    """A copy of ``cfg`` with one dotted field changed (validated like an override)."""
    return config_from_dict(cfg.to_dict(), [f"{dotted}={json.dumps(value)}"])


def config_reference() -> str:
    """Markdown table of every key, its default and its doc (the README's config reference)."""
    return reference(Config)
