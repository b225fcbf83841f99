"""The run configuration: typed, frozen sections of ``ray_config.yaml``, validated once.

Each section is a frozen pydantic dataclass (strict types, ``extra="forbid"``: see
``embsum.config_parse.SECTION``); every field is a ``Field`` with its description and inclusive
range (``ge``/``le``). The README's config reference is generated from them (``embsum config
--docs``), so docs and code cannot drift. ``load_config(path, overrides)`` reads YAML, applies
dotted overrides (``train.lr=3e-4``) and raises ``ValueError`` naming the key, the value and what
is allowed. Being dataclasses, sections also work with ``dataclasses.asdict``/``replace`` (which
validates too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic.dataclasses import dataclass

from embsum.config_parse import SECTION, build, check_key_path, flatten, merge, parse_scalar, reference


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
class TeacherConfig:
    """Who writes the user-interest summaries that supervise the decoder."""

    kind: Literal["offline", "openai"] = Field(
        default="offline", description="'offline': deterministic summary from the history, no LLM; 'openai': an "
                                       "OpenAI-compatible chat-completions endpoint.")
    base_url: str = Field(
        default="http://127.0.0.1:8001/v1", description="Endpoint base URL (vLLM, TGI, a hosted API); "
                                                        "'/chat/completions' is appended.")
    model: str = Field(default="mistralai/Mixtral-8x22B-Instruct-v0.1", description="Model name sent in the request.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the bearer key (unset = no auth header).")
    prompt_version: str = Field(
        default="v1", description="Version tag of the prompt; part of the cache key and stored with each summary.")
    max_items: int = Field(default=30, ge=1, le=1000, description="Most recent history items shown to the teacher.")
    max_concurrency: int = Field(default=8, ge=1, le=1024, description="Concurrent requests per summarize worker.")
    timeout_s: float = Field(default=60.0, ge=0.01, le=3600, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        default=4, ge=0, le=20, description="Retries per request on timeouts, 429 and 5xx, with exponential backoff.")
    backoff_s: float = Field(
        default=1.0, ge=0.0, le=600, description="First backoff delay in seconds; doubles per retry, with jitter.")
    max_tokens: int = Field(default=96, ge=8, le=4096, description="max_tokens sent to the endpoint.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature sent to the endpoint.")
    prompt_template: str = Field(
        default="", description="Prompt template file ('' = the built-in one); {history} is replaced by the user's "
                                "recent items, one per line.")
    cache_dir: str = Field(
        default="", description="Response cache (one JSON file per sha256(prompt_version, model, prompt)); '' = "
                                "WORKDIR/cache/teacher. Shared storage on multi-node clusters.")
    max_failure_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Summarize fails (after writing its report and failure list) when "
                                                  "more than this share of training users got no summary.")
    num_workers: int = Field(
        default=2, ge=1, le=4096, description="Most summarize actors (the pool grows from 1 as input queues up); each "
                                              "holds one teacher and items lookup. Requests in flight <= num_workers "
                                              "* max_concurrency.")
    cpus_per_worker: float = Field(
        default=0.5, ge=0.01, le=1024, description="CPUs reserved per summarize actor (the chat teacher mostly waits "
                                                   "on the network; the offline teacher and tokenizer use some CPU).")
    facet_fields: list[str] = Field(
        default_factory=lambda: ["category", "subcategory", "book_author", "author", "publisher"],
        description="Offline teacher: catalog columns counted as interests (missing ones ignored).")
    title_fields: list[str] = Field(
        default_factory=lambda: ["title", "book_title"], description="Offline teacher: catalog columns whose frequent "
                                                                     "terms are reported.")
    entity_fields: list[str] = Field(
        default_factory=lambda: ["title_entities", "abstract_entities"],
        description="Offline teacher: MIND-style JSON entity columns.")


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    """Raw logs in, tokenized training/evaluation shards out."""

    format: Literal["mind", "logs", "synthetic"] = Field(
        default="synthetic", description="'mind': behaviors.tsv + news.tsv; 'logs': generic engagement log + item "
                                         "catalog; 'synthetic': generate a MIND-format demo set under workdir.")
    interactions: str = Field(
        default="", description="Engagement log path or URI (file, directory or glob; s3://, gs:// work). MIND: "
                                "behaviors.tsv.")
    items: str = Field(default="", description="Item catalog path or URI. MIND: news.tsv.")
    interactions_format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field(
        default="auto", description="File format of the log; 'auto' uses the file extension.")
    items_format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field(
        default="auto", description="File format of the catalog.")
    user_col: str = Field(default="user_id", description="Log column holding the user id.")
    item_col: str = Field(default="item_id", description="Log column holding the item id.")
    timestamp_col: str | None = Field(
        default=None, description="Log column holding the event time (ISO-8601, epoch seconds or '%m/%d/%Y %I:%M:%S "
                                  "%p'); null = no time (see event_order).")
    event_order: Literal["auto", "timestamp", "file", "random"] = Field(
        default="auto", description="Order of a user's events, which decides histories and held-out positives: "
                                    "'timestamp' (needs timestamp_col), 'file' (only when the log's row order IS "
                                    "chronological), 'random' (a seeded random order per user, independent of row "
                                    "order: a log without time carries no order); 'auto' = timestamp when "
                                    "timestamp_col is set, else random.")
    label_col: str | None = Field(
        default=None, description="Log column with a 0/1 click label or a rating; null = every row is a positive.")
    positive_threshold: float = Field(
        default=1.0, description="A row is positive when label_col >= this (e.g. 8 for 1-10 ratings).")
    ignore_labels: list[float] = Field(
        default_factory=list, description="Label values that are neither positive nor negative and are dropped, "
                                          "counted (e.g. Book-Crossing's implicit 0).")
    impression_col: str | None = Field(
        default=None, description="Log column grouping rows into impressions; null = none.")
    item_id_col: str = Field(default="item_id", description="Catalog column holding the item id.")
    item_text_fields: list[str] = Field(
        default_factory=lambda: ["title", "category", "abstract"], description="Catalog columns joined (in order) "
                                                                               "into an item's text.")
    item_text_max_chars: int = Field(
        default=400, ge=8, le=100000, description="Cap on an item's formatted text length, in characters.")
    history_source: Literal["log", "column"] = Field(
        default="column", description="MIND: history from the impression's history column ('column') or from the "
                                      "user's earlier clicks in the log ('log').")
    negatives: int = Field(
        default=4, ge=1, le=1000, description="K: sampled negatives per training example (C = 1 + K candidates).")
    eval_negatives: int = Field(
        default=49, ge=1, le=100000, description="Sampled negatives per held-out evaluation impression (logs).")
    eval_positives: int = Field(
        default=1, ge=1, le=10000, description="Held-out positives per valid/test user (logs): each is one impression "
                                               "against eval_negatives unseen items; more give a tighter confidence "
                                               "interval.")
    valid_fraction: float = Field(
        default=0.1, ge=0.0, le=0.5, description="Share of users (by hash) in the validation split.")
    test_fraction: float = Field(default=0.1, ge=0.0, le=0.5, description="Share of users (by hash) in the test split.")
    min_history: int = Field(
        default=1, ge=0, le=10000, description="Examples whose history has fewer items are skipped (counted).")
    max_examples_per_user: int = Field(
        default=50, ge=1, le=1000000, description="Cap on training examples per user (most recent kept).")
    targets_per_example: int = Field(
        default=1, ge=1, le=256, description="T: positives per training example, sharing one history: the user side "
                                             "(sessions, summary, UPE: most of a step) is encoded once for T "
                                             "positives, each with its own K negatives.")
    views_per_user: int = Field(
        default=1, ge=1, le=1000, description="Random event order only: each train user's positives are regrouped "
                                              "this many times, each time with fresh random histories (more, and more "
                                              "varied, examples per pass; a pass over V views is like V passes with "
                                              "new histories).")
    seed: int = Field(default=0, description="Seed for splits and negative sampling.")
    synth_users: int = Field(default=400, ge=1, le=10_000_000, description="Synthetic set: number of users.")
    synth_items: int = Field(default=600, ge=10, le=10_000_000, description="Synthetic set: number of items.")
    synth_impressions: int = Field(
        default=2000, ge=1, le=100_000_000, description="Synthetic set: number of impressions.")
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="Teacher that writes the supervision summaries.")


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    """The EmbSum model: T5 backbone, session layout, poly-attention heads."""

    backbone: str = Field(
        default="t5-small", description="Hugging Face name or local path of the T5 checkpoint (from_pretrained).")
    random_init: bool = Field(
        default=False, description="Build T5 from the shape fields below with random weights instead of loading "
                                   "backbone (offline demo and tests).")
    tokenizer: str = Field(
        default="", description="Tokenizer name or path; '' = backbone; 'bundled' = the T5 tokenizer shipped in "
                                "embsum.")
    d_model: int = Field(default=512, ge=8, le=16384, description="random_init: hidden size (t5-small: 512).")
    d_kv: int = Field(default=64, ge=4, le=1024, description="random_init: size per attention head (t5-small: 64).")
    d_ff: int = Field(default=2048, ge=8, le=65536, description="random_init: feed-forward size (t5-small: 2048).")
    num_layers: int = Field(default=6, ge=1, le=128, description="random_init: encoder layers (t5-small: 6).")
    num_decoder_layers: int = Field(default=6, ge=1, le=128, description="random_init: decoder layers (t5-small: 6).")
    num_heads: int = Field(default=8, ge=1, le=256, description="random_init: attention heads (t5-small: 8).")
    vocab_size: int = Field(
        default=32128, ge=100, le=1_000_000, description="random_init: vocabulary rows (t5-small: 32128 >= 32100 "
                                                         "tokens).")
    dropout: float = Field(default=0.1, ge=0.0, le=0.9, description="Dropout rate inside T5.")
    sos_token: str = Field(
        default="<extra_id_0>", description="Item start marker; a reserved T5 sentinel, so no vocabulary change (see "
                                            "embsum/tokenization.py).")
    num_sessions: int = Field(default=4, ge=1, le=256, description="G: sessions per user history.")
    items_per_session: int = Field(
        default=5, ge=1, le=256, description="P: items per session; history length H = G * P.")
    session_tokens: int = Field(
        default=128, ge=8, le=4096, description="L: tokens per session (each item gets (L - 1) // P tokens incl. its "
                                                "marker).")
    content_tokens: int = Field(
        default=48, ge=4, le=4096, description="Tokens per candidate item (marker + text + EOS).")
    summary_tokens: int = Field(
        default=48, ge=2, le=1024, description="Max summary tokens (teacher-forced length and generation bound, incl. "
                                               "EOS).")
    summary_no_repeat_ngram: int = Field(
        default=3, ge=0, le=64, description="Summary generation never repeats an n-gram of this size (the standard "
                                            "summarization guard against 'and and and' loops); 0 = off.")
    summary_num_beams: int = Field(
        default=1, ge=1, le=16, description="Beam width of summary generation (1 = greedy). The UPE's global vector "
                                            "is read from the generated summary, so this is part of the model: stored "
                                            "with each version and used by validation, evaluate, embed and serve "
                                            "alike.")
    user_codes: int = Field(default=8, ge=1, le=1024, description="M: user poly-embedding codes.")
    content_codes: int = Field(default=4, ge=1, le=1024, description="N: content poly-embedding codes.")


EmbSumConfig = ModelConfig  # the model section's former name, kept for code written against it


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    """Ray Train + DeepSpeed."""

    num_workers: int = Field(default=2, ge=1, le=4096, description="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; bf16 by default.")
    cpus_per_worker: float = Field(default=1.0, ge=0.01, le=1024, description="CPUs reserved per worker.")
    deepspeed_config: str = Field(
        default="train/deepspeed/zero2.json", description="DeepSpeed config file (JSON or YAML), relative to the "
                                                          "config file's folder or absolute. Batch, lr and precision "
                                                          "keys are filled in.")
    zero_stage: int | None = Field(
        default=None, ge=0, le=3, description="Overrides the file's zero_optimization.stage (0-3).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="'auto' = bf16 on GPU, fp32 on CPU; fp16 is refused (T5 overflows in fp16).")
    batch_size: int = Field(default=16, ge=1, le=65536, description="Micro-batch of examples per worker.")
    grad_accum: int = Field(default=1, ge=1, le=4096, description="Gradient accumulation steps.")
    lr: float = Field(default=5e-4, ge=1e-8, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    warmup_steps: int = Field(
        default=50, ge=0, le=10_000_000, description="Linear warmup steps, then linear decay to 0 at max_steps.")
    max_steps: int = Field(default=600, ge=1, le=100_000_000, description="Optimizer steps in total.")
    grad_clip: float = Field(default=1.0, ge=0.0, le=1e6, description="Gradient-norm clip (0 = off).")
    summary_weight: float = Field(default=0.05, ge=0.0, le=100.0, description="lambda in L = L_NCE + lambda * L_sum.")
    in_batch_negatives: bool = Field(
        default=True, description="NCE also scores each user against the other examples' candidates in the "
                                  "micro-batch (B*C more negatives, no extra encoding).")
    nce_temperature: float = Field(
        default=0.0, ge=0.0, le=1e6, description="NCE logits are score / t (training only; ranking is unchanged); 0 = "
                                                 "sqrt(d_model).")
    checkpoint_every: int = Field(
        default=200, ge=1, le=100_000_000, description="Save (collectively) every N steps; also at the end.")
    keep_checkpoints: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept, best by validation AUC.")
    eval_batches: int = Field(
        default=20, ge=0, le=1_000_000, description="Validation batches per checkpoint (0 = no validation).")
    eval_batch_size: int = Field(
        default=0, ge=0, le=65536, description="Validation micro-batch per worker (0 = batch_size). Validation has no "
                                               "backward pass, so a larger batch reads more of the valid set for the "
                                               "same time.")
    log_every: int = Field(default=10, ge=1, le=1_000_000, description="Report metrics every N steps.")
    max_failures: int = Field(
        default=1, ge=-1, le=1000, description="Worker failures a run survives (restart from the latest checkpoint).")
    run_name: str = Field(
        default="", description="Ray Train run name; rerunning a name resumes from its latest checkpoint. '' = a "
                                "fresh timestamped name per run.")
    storage_path: str = Field(
        default="", description="Checkpoint storage (local dir, s3://, NFS); '' = WORKDIR/ray_results. Must be shared "
                                "storage on multi-node clusters.")
    seed: int = Field(default=0, description="Seed for model init and data order.")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="Testing only: rank 1 kills itself once at this step.")


@dataclass(frozen=True, config=SECTION)
class InferConfig:
    """Model inference outside training: the batch jobs (evaluate, embed) and the model batch of every predictor."""

    actors: int = Field(
        default=2, ge=1, le=100000, description="Batch inference (evaluate, embed): model replicas in the Ray Data "
                                                "actor pool.")
    batch_size: int = Field(
        default=64, ge=1, le=65536, description="Rows per model call: batch inference, and the scorer's encodes of "
                                                "unknown users and items.")
    rows_per_call: int = Field(
        default=2048, ge=1, le=10_000_000, description="Batch inference: most rows per actor call (the Ray Data "
                                                       "batch; the model sees batch_size at a time). Fewer, larger "
                                                       "calls cost less per row.")
    cpus: float = Field(default=1.0, ge=0.01, le=1024, description="Batch inference: CPUs per actor.")
    gpus: float = Field(
        default=0.0, ge=0.0, le=64, description="Batch inference: GPUs per actor (e.g. 1 or 0.5 on GPU clusters).")


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


@dataclass(frozen=True, config=SECTION)
class Config:
    """The whole run configuration (``ray_config.yaml``)."""

    workdir: str = Field(
        default="runs", description="Where everything is written (data, mlflow, checkpoints, embeddings); relative to "
                                    "the current directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data preparation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    infer: InferConfig = Field(default_factory=InferConfig, description="Batch inference and model batches.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="Tracking and registry.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")

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
        # The packaged default (train/deepspeed/*.json) when run from outside the repository: train/
        # is embsum/train in an installed wheel, the folder beside embsum/ in a checkout.
        here = Path(__file__).resolve().parent
        packaged = next((p for p in (here / ds, here.parent / ds) if p.exists()), None)
        if packaged is not None:
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
