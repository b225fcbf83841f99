"""Shared fixtures. Environment first: nothing may reach a hub or phone home."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds a comm op on first use (~36 s); cache it across test sessions.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from embsum.config import EmbSumConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Licensed data (MIND, Book-Crossing) is never copied into the repository: tests read it from
# ../shared/data beside the checkout, or from $EMBSUM_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("EMBSUM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path under the shared data folder; skips the test with a clear message when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set EMBSUM_SHARED_DATA to the folder holding mind/, "
                    f"book-crossing/, t5-tokenizer/)")
    return p


TINY = dict(
    random_init=True, tokenizer="bundled", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
    num_heads=4, num_sessions=3, items_per_session=2, session_tokens=24, content_tokens=12, summary_tokens=10,
    user_codes=4, content_codes=3, dropout=0.0,
)


@pytest.fixture(scope="session")
def tiny_cfg() -> EmbSumConfig:
    """A tiny T5 (random init, real vocabulary) that runs in milliseconds."""
    return EmbSumConfig(**TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from embsum.tokenization import EmbSumTokenizer

    return EmbSumTokenizer.from_config(tiny_cfg)
