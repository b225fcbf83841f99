"""A bundle: one registered model version and the embeddings that version made, loaded together.

The scorer holds exactly one bundle and replaces it whole (DESIGN.md 2: scores are only right
when the UPE/CPE and the model that encodes cold users and items come from the same version).
A bundle is immutable after ``load_bundle`` returns, so a request that read the reference once
can finish on it while a rollout swaps in the next one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embsum.config import Config
from embsum.embeddings import check_manifest, read_manifest, version_dir
from embsum.predictor import Predictor

from .store import EmbeddingStore


@dataclass(frozen=True)
class Bundle:
    model_name: str
    version: str
    aliases: tuple[str, ...]
    predictor: Predictor
    store: EmbeddingStore
    loaded_at: float


def load_bundle(cfg: Config, requested: str = "") -> Bundle:
    """Load ``requested`` (a version number, or '' for the alias) with its embeddings, completely.

    The embeddings manifest is checked before anything is downloaded (a missing embed job is the
    common failure and costs nothing to detect); then the model folder is downloaded from the
    registry, loaded, and deleted again (the weights live in memory); then the store is read and
    checked against the model's shapes and fingerprint. Any problem is a ``ValueError`` that
    names the version and the cause.
    """
    from embsum.registry import Registry

    root = cfg.embeddings_dir
    if requested.isdigit():  # fail fast, before the registry round trip and the download
        check_manifest(read_manifest(version_dir(root, requested)), model_name=cfg.mlflow.registered_model,
                       model_version=requested)
    registry = Registry(cfg)
    info = registry.resolve(requested)
    manifest = read_manifest(version_dir(root, info.version))
    check_manifest(manifest, model_name=registry.name, model_version=info.version)
    tmp = Path(tempfile.mkdtemp(prefix=f"embsum-serve-v{info.version}-"))
    try:
        model_dir = registry.download(info.version, tmp)
        meta: dict[str, Any] = Predictor.meta(model_dir)
        predictor = Predictor.from_dir(model_dir, batch_size=cfg.infer.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fingerprint = str(meta.get("metadata", {}).get("model_fingerprint", ""))
    if fingerprint and manifest.model_fingerprint and fingerprint != manifest.model_fingerprint:
        raise ValueError(f"embeddings for v{info.version} were made with model fingerprint "
                         f"{manifest.model_fingerprint}, but the registered model has {fingerprint}: "
                         f"rerun `embsum embed` for v{info.version}")
    shapes = (predictor.cfg.user_codes, predictor.cfg.content_codes, predictor.model.d_model)
    store = EmbeddingStore.load(root, model_name=registry.name, model_version=info.version, shapes=shapes)
    return Bundle(model_name=registry.name, version=info.version, aliases=tuple(info.aliases),
                  predictor=predictor, store=store, loaded_at=time.time())
