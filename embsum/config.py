"""The run configuration: typed, frozen sections of ``ray_config.yaml``, validated once.

Each section is a frozen pydantic dataclass (strict types, ``extra="forbid"``: see
``embsum.config_parse.SECTION``); every field is a ``Field`` with its description and inclusive
range (``ge``/``le``). The README's config reference is generated from them (``embsum config
--docs``), so docs and code cannot drift. ``load_config(path, overrides)`` reads YAML, applies
dotted overrides (``train.lr=3e-4``) and raises ``ValueError`` naming the key, the value and what
is allowed. Being dataclasses, sections also work with ``dataclasses.asdict``/``replace`` (which
validates too).

The sections live in modules named for what they configure (``embsum.config_data``: data and its
teacher; ``embsum.config_model``: model, train, infer; ``embsum.config_services``: ray, mlflow,
serve); this module is the root ``Config`` with its cross-field rules, loading and overrides, and
re-exports every section: ``from embsum.config import ServeConfig`` is the import to use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic.dataclasses import dataclass

from embsum.config_data import DataConfig, TeacherConfig
from embsum.config_model import EmbSumConfig, InferConfig, ModelConfig, TrainConfig
from embsum.config_parse import SECTION, build, check_key_path, flatten, merge, parse_scalar, reference
from embsum.config_services import MlflowConfig, RayConfig, ServeConfig

__all__ = ["MOVED_KEYS", "SECTIONS", "Config", "DataConfig", "EmbSumConfig", "InferConfig", "MlflowConfig",
           "ModelConfig", "RayConfig", "ServeConfig", "TeacherConfig", "TrainConfig", "config_from_dict",
           "config_reference", "load_config", "replace"]


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
