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
# Where DeepSpeed would JIT-build ops (training skips its CPU comm op: train/deepspeed_setup.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))

# A suite started as a background job (`cmd &` in a script, nohup, some CI runners) inherits SIGINT
# ignored, and every child it starts would keep it ignored (Python leaves an ignored SIGINT ignored):
# the Ctrl-C tests would then wait forever. Take Python's default back, as a terminal's job has it.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from embsum.config import ModelConfig  # noqa: E402

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
def tiny_cfg() -> ModelConfig:
    """A tiny T5 (random init, real vocabulary) that runs in milliseconds."""
    return ModelConfig(**TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from embsum.tokenization import EmbSumTokenizer

    return EmbSumTokenizer.from_config(tiny_cfg)


def assert_f32_close(actual, desired, rtol: float = 1e-5) -> None:
    """Two float32 results of the same arithmetic done in another order (chunked, batched, another
    BLAS kernel: the order differs between CPUs and libraries) agree to ``rtol`` of the largest
    magnitude compared. A float32 sum's rounding error grows with the size of what it adds up, not
    with its result, so the absolute part of the tolerance is ``rtol`` times that scale: a fixed
    atol of 1e-6 on scores near 10 is about one unit in the last place and failed on an AMD EPYC
    where an Intel Xeon passed. rtol 1e-5 is ~80 ulps; comparisons through the whole encoder with
    different batch shapes use 1e-4."""
    import numpy as np

    def arr(x):
        return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)

    a, d = arr(actual), arr(desired)
    assert a.shape == d.shape, (a.shape, d.shape)
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(d).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Unit tests first: they are fast (a broken build fails in minutes) and they must run before an
    integration fixture connects this process to a Ray cluster for the rest of the session (the unit
    tests' no-Ray guard, tests/unit/conftest.py, checks that nothing starts or joins Ray)."""
    unit = str(Path(__file__).parent / "unit")
    items.sort(key=lambda item: 0 if str(item.path).startswith(unit) else 1)  # stable: order within each kept
