"""The fused LM head + cross-entropy against torch's unfused layer: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from embsum.linear_cross_entropy import IGNORE, linear_cross_entropy


def _case(n: int = 37, d: int = 8, v: int = 50, seed: int = 0, ignored: int = 5
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:ignored]] = IGNORE
    return states, weight, labels


def _reference(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float
               ) -> tuple[float, torch.Tensor, torch.Tensor]:
    s, w = states.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = F.cross_entropy(s @ w.t(), labels, ignore_index=IGNORE)
    (scale * loss).backward()
    assert s.grad is not None and w.grad is not None
    return float(loss), s.grad, w.grad


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 10_000])  # one row, 7 rows (a ragged last chunk), all
def test_loss_and_gradients_equal_the_unfused_layer(chunk_elements: int) -> None:
    states, weight, labels = _case()
    want, want_gs, want_gw = _reference(states, weight, labels, scale=0.3)
    loss = linear_cross_entropy(states, weight, labels, chunk_elements=chunk_elements)
    (0.3 * loss).backward()  # the upstream scale (lambda) reaches both gradients
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert states.grad is not None and weight.grad is not None
    torch.testing.assert_close(states.grad, want_gs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, want_gw, rtol=1e-10, atol=1e-12)
    assert not bool(states.grad[labels == IGNORE].any())  # ignored positions get no gradient


def test_every_label_ignored_gives_zero_connected_to_the_graph() -> None:
    states, weight, labels = _case()
    loss = linear_cross_entropy(states, weight, torch.full_like(labels, IGNORE))
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert states.grad is not None and weight.grad is not None
    assert not bool(states.grad.any()) and not bool(weight.grad.any())


def test_without_grad_it_only_computes_the_loss() -> None:
    states, weight, labels = _case()
    want = float(F.cross_entropy(states @ weight.t(), labels, ignore_index=IGNORE))
    with torch.no_grad():
        loss = linear_cross_entropy(states, weight, labels, chunk_elements=100)
    assert not loss.requires_grad and float(loss) == pytest.approx(want, rel=1e-12)


def test_bfloat16_follows_the_unfused_layer_with_fp32_softmax() -> None:
    states, weight, labels = _case(n=64, d=16, v=200, seed=3)
    s16, w16 = states.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(s16, w16, labels, chunk_elements=1000)
    loss.backward()
    assert loss.dtype == torch.float32 and s16.grad is not None and w16.grad is not None
    assert s16.grad.dtype == w16.grad.dtype == torch.bfloat16
    want, want_gs, want_gw = _reference(states, weight, labels, scale=1.0)
    assert float(loss) == pytest.approx(want, rel=2e-2)
    torch.testing.assert_close(s16.grad.double(), want_gs, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(w16.grad.double(), want_gw, rtol=5e-2, atol=5e-3)


def test_shapes_are_checked() -> None:
    states, weight, labels = _case()
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(states, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(states, weight, labels[:-1])
