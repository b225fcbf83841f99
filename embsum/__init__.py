"""EmbSum: T5 + poly-attention user/item embeddings with an LLM-supervised interest summary.

Importing ``embsum`` is cheap and side-effect free (no Ray, no MLflow, no torch/transformers
until a model symbol is used): Ray workers and the CLI import it freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embsum.config import Config, EmbSumConfig, ModelConfig, load_config

__version__ = "0.1.0"
__all__ = ["Config", "EmbSum", "EmbSumConfig", "ModelConfig", "EmbSumTokenizer", "load_config", "load_model",
           "save_model", "score", "__version__"]

_LAZY = {
    "EmbSum": "embsum.model",
    "score": "embsum.scoring",
    "EmbSumTokenizer": "embsum.tokenization",
    "load_model": "embsum.checkpoint",
    "save_model": "embsum.checkpoint",
}

if TYPE_CHECKING:
    from embsum.checkpoint import load_model, save_model
    from embsum.model import EmbSum
    from embsum.scoring import score
    from embsum.tokenization import EmbSumTokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embsum' has no attribute {name!r}")
