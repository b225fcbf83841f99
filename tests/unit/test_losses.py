"""Losses by hand; gradients reach every trainable parameter; a few AdamW steps learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embsum.config import ModelConfig
from embsum.losses import embsum_loss, nce_loss, summary_loss
from embsum.model import EmbSum
from embsum.scoring import score
from embsum.tokenization import EmbSumTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def test_nce_by_hand() -> None:
    rows = [[2.0, 1.0, 0.5, -1.0, 0.0], [0.1, 0.3, -0.2, 3.0, 0.3]]
    expected = sum(-math.log(math.exp(r[0]) / sum(math.exp(v) for v in r)) for r in rows) / len(rows)
    assert float(nce_loss(torch.tensor(rows))) == pytest.approx(expected, rel=1e-6)
    # A positive far above its negatives costs ~0; far below costs ~ the gap.
    assert float(nce_loss(torch.tensor([[50.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(nce_loss(torch.tensor([[0.0, 30.0]]))) == pytest.approx(30.0, rel=1e-6)


def _nll_reference(logits: np.ndarray, labels: np.ndarray, pad: int) -> float:
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == pad:
                continue
            row = logits[b, t].astype(np.float64)
            top = row.max()
            total += -(row[labels[b, t]] - top - math.log(np.exp(row - top).sum()))
            n += 1
    return total / n


def test_summary_loss_by_hand_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[3, 7, 1, 0, 0], [4, 1, 0, 0, 0]])
    loss = summary_loss(logits, labels, pad_id=0)
    assert float(loss) == pytest.approx(_nll_reference(logits.numpy(), labels.numpy(), 0), rel=1e-5)
    changed = logits.clone()
    changed[labels == 0] = torch.randn(int((labels == 0).sum()), 11, generator=g) * 100
    assert float(summary_loss(changed, labels)) == pytest.approx(float(loss), rel=1e-6)  # same arithmetic
    changed[0, 0, 3] += 5.0  # the label's logit at a real position: the loss must move
    assert abs(float(summary_loss(changed, labels)) - float(loss)) > 1e-3


def test_all_padding_summary_is_zero_and_connected() -> None:
    logits = torch.randn(2, 4, 9, requires_grad=True)
    loss = summary_loss(logits, torch.zeros(2, 4, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_total_is_nce_plus_lambda_summary() -> None:
    g = torch.Generator().manual_seed(1)
    scores, logits = torch.randn(3, 5, generator=g), torch.randn(3, 4, 13, generator=g)
    labels = torch.tensor([[5, 6, 1, 0], [2, 1, 0, 0], [9, 9, 9, 1]])
    nll = summary_loss(logits, labels)
    parts = embsum_loss(scores, nll, summary_weight=0.05)
    torch.testing.assert_close(parts.nce, nce_loss(scores))
    torch.testing.assert_close(parts.summary, nll)
    assert float(parts.total) == pytest.approx(float(parts.nce) + 0.05 * float(parts.summary), rel=1e-6)
    assert float(embsum_loss(scores, nll, summary_weight=0.0).total) == pytest.approx(float(parts.nce))
    with pytest.raises(ValueError, match="teacher-forced"):
        embsum_loss(scores, None)


def _batch(tok: EmbSumTokenizer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)

    def items(n: int) -> list[list[int]]:
        return [rng.integers(100, 20000, size=int(rng.integers(2, 9))).tolist() for _ in range(n)]

    b, c = 3, 1 + 4
    s = torch.as_tensor(tok.sessions_batch([items(5), items(2), items(7)])).long()
    cands = torch.as_tensor(tok.content_batch(items(b * c))).long().view(b, c, -1)
    y = torch.as_tensor(np.stack([tok.summary(t) for t in ["sports news fan", "likes cooking", "tech gadgets"]]))
    return s, cands, y.long()


def test_gradients_reach_every_trainable_parameter(tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer) -> None:
    assert tiny_cfg.dropout == 0.0
    model = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0).train()
    s, cands, y = _batch(tokenizer)
    out = model(s, cands, y)
    loss = embsum_loss(out.scores, out.summary_nll, summary_weight=0.05).total
    loss.backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool((p.grad != 0).any()))]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adamw_steps_reduce_the_loss(tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer) -> None:
    model = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    s, cands, y = _batch(tokenizer, seed=1)
    losses = []
    for _ in range(8):
        out = model(s, cands, y)
        parts = embsum_loss(out.scores, out.summary_nll, summary_weight=0.05)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        losses.append(parts.total.item())
    with torch.no_grad():
        out = model(s, cands, y)
        final = float(embsum_loss(out.scores, out.summary_nll, summary_weight=0.05).total)
    assert final < 0.8 * losses[0], losses + [final]


def test_grouped_rows_and_batch_negatives_with_several_targets() -> None:
    from embsum.losses import batch_negative_scores, grouped_rows

    torch.manual_seed(0)
    b, t, c, n, d, lc = 2, 2, 3, 2, 4, 5
    cands = torch.randint(3, 50, (b, t * c, lc))
    cands[1, 4] = cands[0, 0]  # user 1's negative is user 0's positive item
    labels = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 0, 0, -1, -1, -1]])
    upe, cpe, key = torch.randn(b, 3, d), torch.randn(b, t * c, n, d), torch.randn(b, t * c, n, d)
    own = score(upe, cpe, key)  # (B, T*C)
    extra = batch_negative_scores(upe, cpe, key, cands, labels)  # (B, B*T*C)
    assert extra.shape == (2, 12)
    assert torch.isinf(extra[0, :6]).all() and torch.isinf(extra[1, 6:]).all()  # own example excluded
    assert torch.isinf(extra[0, 10])  # user 1's candidate equal to user 0's positive: not a negative for 0
    assert torch.isfinite(extra[1, :6]).all()
    rows, rows_extra = grouped_rows(own, labels, c, extra)
    assert rows.shape == (3, 3) and rows_extra.shape == (3, 12)  # user 1's padding block is dropped
    assert torch.equal(rows[2], own[1, :3]) and torch.equal(rows_extra[1], extra[0])
    loss = nce_loss(rows, 2.0, rows_extra)
    manual = torch.stack([-torch.log_softmax(torch.cat([r, x]) / 2.0, 0)[0] for r, x in zip(rows, rows_extra,
                                                                                            strict=True)]).mean()
    assert loss == pytest.approx(float(manual), rel=1e-5)
