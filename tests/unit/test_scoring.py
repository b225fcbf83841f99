"""score() against an explicit per-pair loop of the DESIGN formula, in both of its forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embsum.scoring import score
from tests.conftest import assert_f32_close

M, N, D = 3, 2, 5


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(x)


def _pair(a: np.ndarray, b: np.ndarray, w_s: np.ndarray) -> float:
    """K = flatten(A B^T); W_p = softmax(flatten(A gelu(B W_s)^T)); s = W_p . K (loops, float64)."""
    gb = _gelu(b @ w_s)  # (N, D)
    k = [sum(a[m, d] * b[n, d] for d in range(D)) for m in range(M) for n in range(N)]
    g = [sum(a[m, d] * gb[n, d] for d in range(D)) for m in range(M) for n in range(N)]
    top = max(g)
    e = [math.exp(v - top) for v in g]
    return sum(ei / sum(e) * ki for ei, ki in zip(e, k, strict=True))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"upe": rng.normal(size=(4, M, D)), "cpe": rng.normal(size=(6, N, D)), "w_s": rng.normal(size=(D, D)),
            "cand": rng.normal(size=(4, 3, N, D))}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_all_pairs_matches_the_loop(data) -> None:
    upe, cpe, w_s = data["upe"], data["cpe"], data["w_s"]
    got = score(_t(upe), _t(cpe), _t(_gelu(cpe @ w_s)))
    assert got.shape == (4, 6)
    ref = np.array([[_pair(upe[i], cpe[j], w_s) for j in range(6)] for i in range(4)])
    assert_f32_close(got, ref)


def test_per_user_candidates_match_the_loop(data) -> None:
    upe, cand, w_s = data["upe"], data["cand"], data["w_s"]
    got = score(_t(upe), _t(cand), _t(_gelu(cand @ w_s)))
    assert got.shape == (4, 3)
    ref = np.array([[_pair(upe[u], cand[u, c], w_s) for c in range(3)] for u in range(4)])
    assert_f32_close(got, ref)


def test_order_of_flattening_matters(data) -> None:
    # K and W_p must be flattened the same way: swapping M and N in one of them changes the score.
    upe, cpe, w_s = data["upe"], data["cpe"], data["w_s"]
    a, b = upe[0], cpe[0]
    gb = _gelu(b @ w_s)
    k = (a @ b.T).reshape(-1)
    g_wrong = (a @ gb.T).T.reshape(-1)
    w_wrong = np.exp(g_wrong - g_wrong.max())
    wrong = float((w_wrong / w_wrong.sum()) @ k)
    got = float(score(_t(upe[:1]), _t(cpe[:1]), _t(gb[None]))[0, 0])
    assert_f32_close(got, _pair(a, b, w_s))
    assert abs(got - wrong) > 1e-4


def test_empty_user_or_item_sets(data) -> None:
    upe, cpe, w_s = _t(data["upe"]), _t(data["cpe"]), data["w_s"]
    key = _t(_gelu(data["cpe"] @ w_s))
    assert score(upe[:0], cpe, key).shape == (0, 6)
    assert score(upe, cpe[:0], key[:0]).shape == (4, 0)


@pytest.mark.parametrize("upe_shape,cpe_shape,key_shape,match", [
    ((2, M, D), (3, N, D), (3, N, D + 1), "same shape"),
    ((M, D), (3, N, D), (3, N, D), "upe must be"),
    ((2, M, D + 1), (3, N, D), (3, N, D), "upe must be"),
    ((2, M, D), (3, 2, N, D), (3, 2, N, D), "per-user"),
    ((2, M, D), (N, D), (N, D), "cpe must be"),
    ((2, M, D), (1, 2, 3, N, D), (1, 2, 3, N, D), "cpe must be"),
    ((2, M, D), (), (), "cpe must be"),
])
def test_shape_errors(upe_shape, cpe_shape, key_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        score(torch.zeros(upe_shape), torch.zeros(cpe_shape), torch.zeros(key_shape))
