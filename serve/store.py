"""The in-memory embedding store of one model version: what a scorer replica scores from.

Loaded once per version from the folder `embsum embed` wrote (embsum/embeddings.py is the
format), checked against the model it will be paired with, and never mutated afterwards: a
rollout builds a new store beside the old one and swaps a reference, so a request never sees a
half-loaded or mixed store. The item matrices are contiguous float32, so scoring the whole
catalog is two GEMMs with no copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embsum.embeddings import ITEMS_DIR, USERS_DIR, Manifest, check_manifest, read_manifest, read_table, version_dir


def _owned(a: np.ndarray) -> np.ndarray:
    # A C-contiguous float32 copy this process owns: Arrow's zero-copy buffers are read-only, and
    # torch.from_numpy refuses to promise anything about read-only memory.
    return np.array(a, dtype=np.float32, order="C", copy=True)


@dataclass(frozen=True)
class EmbeddingStore:
    manifest: Manifest
    path: Path
    item_ids: list[str]
    item_index: dict[str, int]
    item_texts: list[str]
    cpe: np.ndarray  # (I, N, D) float32, C-contiguous
    cpe_key: np.ndarray  # (I, N, D) float32, gelu(B W_s)
    user_ids: list[str]
    user_index: dict[str, int]
    upe: np.ndarray  # (U, M, D) float32
    histories: list[list[str]]  # item ids, oldest first
    summaries: list[str]  # generated offline by the model's decoder

    @property
    def version(self) -> str:
        return str(self.manifest.model_version)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def describe(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (what /v1/model reports)."""
        return {**asdict(self.manifest), "path": str(self.path)}

    @classmethod
    def load(cls, root: str | Path, *, model_name: str, model_version: str,
             shapes: tuple[int, int, int] | None = None) -> EmbeddingStore:
        """Read ``root/v<version>``. ``shapes`` = the model's (M, N, D); a mismatch is refused.

        Raises ``ValueError`` naming the folder and the problem: missing manifest, a manifest of
        another model or version, counts or shapes that disagree with the manifest or the model.
        """
        folder = version_dir(root, model_version)
        manifest = read_manifest(folder)
        check_manifest(manifest, model_name=model_name, model_version=model_version)
        items = read_table(folder, ITEMS_DIR)
        users = read_table(folder, USERS_DIR)
        cpe, key, upe = items.arrays["cpe"], items.arrays["cpe_key"], users.arrays["upe"]
        m, n, d = manifest.user_codes, manifest.content_codes, manifest.d_model
        problems = []
        if len(items) != manifest.items or len(users) != manifest.users:
            problems.append(f"{len(items)} items / {len(users)} users on disk but the manifest says "
                            f"{manifest.items} / {manifest.users}")
        if cpe.shape[1:] != (n, d) or key.shape != cpe.shape:
            problems.append(f"cpe {cpe.shape} / cpe_key {key.shape}, expected (I, {n}, {d})")
        if upe.shape[1:] != (m, d):
            problems.append(f"upe {upe.shape}, expected (U, {m}, {d})")
        if shapes is not None and shapes != (m, n, d):
            problems.append(f"the manifest's (M, N, D) = {(m, n, d)} but the model's is {shapes}")
        for kind, table in (("item", items), ("user", users)):
            if len(table.index) != len(table.ids):
                problems.append(f"duplicate {kind} ids")
        if problems:
            raise ValueError(f"embeddings at {folder} are inconsistent: " + "; ".join(problems))
        return cls(
            manifest=manifest, path=folder,
            item_ids=items.ids, item_index=items.index,
            item_texts=[str(t) if t is not None else "" for t in items.columns.get("text", [""] * len(items))],
            cpe=_owned(cpe), cpe_key=_owned(key), user_ids=users.ids, user_index=users.index, upe=_owned(upe),
            histories=[[str(i) for i in (h if h is not None else [])] for h in users.columns.get("history", [])],
            summaries=[str(s) if s is not None else "" for s in users.columns.get("summary", [""] * len(users))],
        )
