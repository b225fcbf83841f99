"""Poly-attention against a plain-loop reference; padding is invisible (property test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embsum.poly_attention import PolyAttention
from tests.conftest import assert_f32_close


def _reference(z: np.ndarray, mask: np.ndarray, w_f: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """alpha_a = softmax over valid t of c_a . tanh(W_f z_t); A_a = sum_t alpha_a,t z_t. Python loops."""
    b_, t_, d_ = z.shape
    m_ = codes.shape[0]
    out = np.zeros((b_, m_, d_))
    for b in range(b_):
        valid = [t for t in range(t_) if mask[b, t]]
        keys = {t: [math.tanh(sum(w_f[i, j] * z[b, t, j] for j in range(d_))) for i in range(d_)] for t in valid}
        for a in range(m_):
            logit = {t: sum(codes[a, i] * keys[t][i] for i in range(d_)) for t in valid}
            top = max(logit.values())
            e = {t: math.exp(v - top) for t, v in logit.items()}
            total = sum(e.values())
            for t in valid:
                for i in range(d_):
                    out[b, a, i] += e[t] / total * z[b, t, i]
    return out


@pytest.fixture(scope="module")
def poly() -> PolyAttention:
    torch.manual_seed(0)
    return PolyAttention(d_model=6, num_codes=3)


def test_matches_loop_reference(poly: PolyAttention) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        got = poly(z, mask)
    ref = _reference(z.double().numpy(), mask.numpy(), poly.proj.weight.double().detach().numpy(),
                     poly.codes.double().detach().numpy())
    assert got.shape == (3, 3, 6)
    assert_f32_close(got, ref)
    # One valid row: every code returns that row.
    assert_f32_close(got[2], np.repeat(z[2, 3:4].numpy(), 3, axis=0))


def test_codes_differ_so_attention_is_not_trivial(poly: PolyAttention) -> None:
    z = torch.randn(1, 7, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = poly(z, torch.ones(1, 7, dtype=torch.bool))
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(n_valid=st.integers(1, 4), n_pad=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       pad_values=st.lists(finite, min_size=1, max_size=24), special=st.sampled_from([None, "nan", "inf"]))
def test_padding_rows_change_nothing(poly: PolyAttention, n_valid: int, n_pad: int, seed: int,
                                     pad_values: list[float], special: str | None) -> None:
    d = 6
    z = torch.randn(1, n_valid, d, generator=torch.Generator().manual_seed(seed))
    pad = torch.tensor((pad_values * (n_pad * d))[: n_pad * d], dtype=torch.float32).view(1, n_pad, d)
    if special == "nan":
        pad[0, 0, 0] = float("nan")
    elif special == "inf":
        pad[0, -1, -1] = float("inf")
    base_mask = torch.ones(1, n_valid, dtype=torch.bool)
    z2 = torch.cat([z, pad], dim=1)
    mask2 = torch.cat([base_mask, torch.zeros(1, n_pad, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = poly(z, base_mask)
        b = poly(z2, mask2)
    assert torch.isfinite(b).all()
    assert_f32_close(b, a)


def test_all_padding_row_is_finite_and_padding_gets_no_gradient(poly: PolyAttention) -> None:
    z = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = poly(z, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert (z.grad[~mask] == 0).all()
    assert (z.grad[mask] != 0).any()
    assert poly.codes.grad is not None and poly.proj.weight.grad is not None
    assert torch.isfinite(poly.proj.weight.grad).all()
    poly.zero_grad()
