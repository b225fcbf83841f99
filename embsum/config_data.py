"""The ``data`` section of the run configuration and its ``data.teacher``: raw logs in, tokenized
training/evaluation shards out, and who writes the user-interest summaries that supervise the decoder.

Part of ``embsum.config`` (which re-exports every section; import them from there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from embsum.config_parse import SECTION


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
