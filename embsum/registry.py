"""MLflow tracking and the model registry: the only module that imports MLflow.

The served artefact is the consolidated model directory (safetensors + embsum.json + tokenizer),
logged as the run's ``model`` artifact folder and registered as a model version whose source is
that folder, so loading ``models:/NAME@ALIAS`` downloads files and never unpickles anything.
Promotion uses registered-model aliases (stages are deprecated in MLflow 3).

Failures are of two kinds and never confused: a version or alias that does not exist is a
``ValueError`` (``NotFound``); anything else the registry does wrong (server down, 5xx, a
timeout, refused credentials) is a ``RegistryError`` naming the registry URI and the error. So
an MLflow hiccup during the gate is an error, never "there is no champion" (which would promote
without comparing). The HTTP client's timeout and retries come from the config (mlflow.http_*),
in seconds: MLflow's defaults (120 s, 7 retries) made a dead server cost minutes per call.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from embsum.config import Config, MlflowConfig
from embsum.embeddings import check_manifest, read_manifest, version_dir

MODEL_ARTIFACT = "model"
_PARAM_MAX = 6000  # MLflow's param value limit
# MLflow error codes that mean "no such model, version or alias" (an alias lookup that finds
# nothing is INVALID_PARAMETER_VALUE in MLflow 3); any other failure is the registry's.
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
T = TypeVar("T")


class NotFound(ValueError):
    """The registry answered: no such registered model, version or alias."""


class RegistryError(RuntimeError):
    """The registry could not answer (unreachable, 5xx, timeout, auth): never read as "not found"."""


def client_env(m: MlflowConfig) -> dict[str, str]:
    """MLflow's HTTP client settings for mlflow.http_* (MLflow reads them from the environment on
    every request)."""
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(m.http_timeout_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(m.http_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(m.http_backoff_factor)}


@dataclass
class VersionInfo:
    name: str
    version: str
    run_id: str
    source: str
    aliases: list[str]
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)  # the run's latest metrics

    def metric(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class Registry:
    """A thin, typed facade over ``MlflowClient`` bound to one config (URI, experiment, model name)."""

    def __init__(self, cfg: Config) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = cfg.tracking_uri
        os.environ.update(client_env(cfg.mlflow))  # the config's timeouts, for this process's MLflow calls
        if self.uri.startswith("sqlite:"):
            Path(self.uri.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.name = cfg.mlflow.registered_model
        self.alias = cfg.mlflow.alias

    # ---- tracking --------------------------------------------------------------------------------------
    def experiment_id(self, name: str | None = None) -> str:
        name = name or self.cfg.mlflow.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.cfg.artifact_location)
        except Exception:  # a concurrent creator won the race
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, run_name: str, tags: dict[str, str] | None = None, experiment: str | None = None) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags or {})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params; MLflow params are immutable, so on a resumed run the ones that changed are
        kept as they were and returned (key -> (old, new)) and recorded in the tag 'resume_changes'."""
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:_PARAM_MAX])
                 for k, v in sorted(params.items())]
        old = self.client.get_run(run_id).data.params
        changed = {p.key: (old[p.key], p.value) for p in items if p.key in old and old[p.key] != p.value}
        items = [p for p in items if p.key not in old]
        if changed:
            self.client.set_tag(run_id, "resume_changes", json.dumps(changed)[:5000])
        for i in range(0, len(items), 100):  # log_batch caps params per call
            self.client.log_batch(run_id, params=items[i:i + 100])
        return changed

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of one metric, in step order (learning curves)."""
        return sorted((int(m.step), float(m.value)) for m in self.client.get_metric_history(run_id, key))

    # ---- registry --------------------------------------------------------------------------------------
    def _ask(self, what: str, call: Callable[[], T]) -> T:
        """Run one registry call: NotFound when the registry says the thing does not exist,
        RegistryError (naming the registry and the error) for every other failure."""
        from mlflow.exceptions import MlflowException

        try:
            return call()
        except MlflowException as e:
            first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
            if e.error_code in _NOT_FOUND:
                raise NotFound(f"model {self.name!r} has no {what} at {self.uri}: {first}") from None
            raise RegistryError(f"the model registry at {self.uri} failed to {what}: {first}") from None
        except Exception as e:  # noqa: BLE001 - requests/SQLAlchemy errors that MLflow did not wrap
            raise RegistryError(f"the model registry at {self.uri} failed to {what}: "
                                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                ) from None

    def log_and_register(self, run_id: str, model_dir: str | Path, tags: dict[str, str] | None = None) -> str:
        """Log the consolidated model folder as the run's ``model`` and register it -> version."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        try:
            self.client.create_registered_model(self.name)
        except MlflowException:
            pass  # already exists
        mv = self.client.create_model_version(self.name, source=source, run_id=run_id, tags=tags or {})
        return str(mv.version)

    def version(self, ref: str | int) -> VersionInfo:
        """A version by number ('3') or alias ('champion', '@champion'). NotFound (a ValueError) if
        unknown, RegistryError if the registry cannot answer."""
        ref = str(ref).lstrip("@")
        mv = self._ask(f"version or alias {ref!r}",
                       lambda: self.client.get_model_version(self.name, ref) if ref.isdigit()
                       else self.client.get_model_version_by_alias(self.name, ref))
        metrics = self._ask(f"run {mv.run_id} of version {mv.version}",
                            lambda: self.run_metrics(str(mv.run_id))) if mv.run_id else {}
        return VersionInfo(name=self.name, version=str(mv.version), run_id=mv.run_id or "", source=mv.source or "",
                           aliases=list(mv.aliases or []), tags=dict(mv.tags or {}), metrics=metrics)

    def resolve(self, ref: str | int | None = None, *, default: Literal["serving", "newest"] = "serving"
                ) -> VersionInfo:
        """The version a job is told to use: ``ref`` (a number or an alias), else by ``default``:
        'serving' = serve.model_version, else the version the alias points to (embed, serve);
        'newest' = the newest registered version (evaluate). A number is checked to exist: NotFound
        (a ValueError) if it does not, RegistryError if the registry cannot answer."""
        ref = str(ref) if ref is not None else ""
        if ref:
            return self.version(ref)
        if default == "serving":
            return self.version(self.cfg.serve.model_version or self.alias)
        versions = self.versions()
        if not versions:
            raise NotFound(f"no registered versions of {self.name!r} at {self.uri}: run `embsum train` first")
        return versions[-1]

    def champion(self) -> VersionInfo | None:
        """The version the alias points to; None only when the registry says no version holds it."""
        try:
            return self.version(self.alias)
        except NotFound:
            return None

    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first ([] only when the registry says there are none)."""
        found = self._ask("list its versions", lambda: self.client.search_model_versions(f"name = '{self.name}'"))
        return sorted((self.version(mv.version) for mv in found), key=lambda v: int(v.version))

    def embeddings_problem(self, version: str) -> str | None:
        """Why ``version`` cannot be served from its precomputed embeddings, or None when its
        manifest is in place (the gate promotes only a version that can serve)."""
        folder = version_dir(self.cfg.embeddings_dir, version)
        try:
            check_manifest(read_manifest(folder), model_name=self.name, model_version=version)
        except ValueError as e:
            return str(e)
        return None

    def promote(self, version: str | int) -> VersionInfo:
        """Point the alias at ``version`` (which must exist). No checks: ``gate`` is the checked path."""
        info = self.version(str(version))
        self._ask(f"move alias {self.alias!r} to version {info.version}",
                  lambda: self.client.set_registered_model_alias(self.name, self.alias, info.version))
        return self.version(info.version)

    @staticmethod
    def gate_value(info: VersionInfo, metric: str) -> tuple[str, float] | None:
        """The metric the gate compares: the evaluation job's ``valid_<m>`` (whole valid impressions),
        else the trainer's in-loop ``val_<m>``."""
        for key in (f"valid_{metric}", f"val_{metric}"):
            v = info.metric(key)
            if v is not None:
                return key, v
        return None

    def gate(self, version: str | int, metric: str | None = None, *, force: bool = False) -> tuple[bool, str]:
        """Promote ``version`` only if its embeddings are in place and its validation metric beats the
        floor and the current champion (``force``: embeddings only). A registry failure while
        comparing raises RegistryError and leaves the alias where it was."""
        metric = metric or self.cfg.mlflow.gate_metric
        cand = self.version(str(version))
        problem = self.embeddings_problem(cand.version)
        if problem:
            return False, f"version {cand.version} cannot serve: {problem}; alias {self.alias!r} unchanged"
        if force:
            self.promote(cand.version)
            return True, f"version {cand.version} promoted to {self.alias!r} (forced: no metric comparison)"
        got = self.gate_value(cand, metric)
        if got is None:
            return False, (f"version {cand.version} has no valid_{metric} or val_{metric} metric; "
                           f"alias {self.alias!r} unchanged")
        key, value = got
        floor = self.cfg.mlflow.gate_floor
        if value <= floor:
            return False, (f"version {cand.version} {key}={value:.4f} does not beat the floor "
                           f"{floor:.4f}; alias {self.alias!r} unchanged")
        try:
            champ = self.champion()
        except RegistryError as e:
            raise RegistryError(f"{e}; the gate cannot compare version {cand.version} with the champion, "
                                f"alias {self.alias!r} unchanged") from None
        if champ is not None and champ.version != cand.version:
            theirs = self.gate_value(champ, metric)
            if theirs is not None and value <= theirs[1]:
                return False, (f"version {cand.version} {key}={value:.4f} does not beat champion version "
                               f"{champ.version} ({theirs[0]}={theirs[1]:.4f}); alias {self.alias!r} stays on "
                               f"{champ.version}")
        self.promote(cand.version)
        prev = f" (was {champ.version})" if champ is not None and champ.version != cand.version else ""
        return True, f"version {cand.version} {key}={value:.4f} promoted to {self.alias!r}{prev}"

    def download(self, ref: str | int, dst: str | Path | None = None) -> Path:
        """Download a version's model folder (by number or alias) -> local path."""
        import mlflow

        info = self.version(ref)
        dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"embsum-v{info.version}-"))
        dst.mkdir(parents=True, exist_ok=True)
        local = self._ask(f"download version {info.version}", lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{info.version}", dst_path=str(dst), tracking_uri=self.uri))
        return Path(local)
