"""Training objectives (DESIGN.md 2.6), pure functions of the model's outputs.

L = L_NCE + lambda * L_sum. L_NCE is the softmax cross-entropy of the positive (candidate 0)
against K negatives; L_sum is the teacher-forced token cross-entropy of the summary, padding
ignored (``summary_loss`` on logits; the model's forward computes it without materializing them,
embsum/linear_cross_entropy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from embsum.scoring import score


@dataclass
class LossParts:
    total: torch.Tensor
    nce: torch.Tensor
    summary: torch.Tensor


def nce_loss(scores: torch.Tensor, temperature: float = 1.0, batch_negatives: torch.Tensor | None = None
             ) -> torch.Tensor:
    """scores (B, 1 + K), positive first -> mean of -log(exp(s+/t) / sum_j exp(s_j/t)).

    ``batch_negatives`` (B, X), optional: more negatives per user (the other examples' candidates,
    see ``batch_negative_scores``); -inf entries are excluded.

    The temperature only rescales the training objective: rankings, metrics and served scores use
    the exact score. Scores grow like sqrt(d_model) (dot products of unit-RMS T5 states), so with
    t = 1 a t5-small-sized model starts at an NCE of ~14 (saturated softmax); t = sqrt(d_model)
    starts it near ln(1 + K)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # (B,)
    logits = scores if batch_negatives is None else torch.cat([scores, batch_negatives], dim=1)  # (B, C [+ X])
    return F.cross_entropy(logits.float() / temperature, target)


def batch_negative_scores(upe: torch.Tensor, cpe: torch.Tensor, cpe_key: torch.Tensor,
                          candidate_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch negatives: every user against every other example's candidates.

    upe (B, M, D), cpe/cpe_key (B, C, N, D), candidate_ids (B, C, Lc), labels (B, C) (1 = a
    positive; default: candidate 0) -> (B, B*C) scores; -inf where the candidate belongs to the
    user's own example (already scored) or is the same item (same tokens) as one of its positives.
    Costs one all-pairs ``score`` of already-encoded candidates.
    """
    b, c, n, d = cpe.shape
    s = score(upe, cpe.reshape(b * c, n, d), cpe_key.reshape(b * c, n, d))  # (B, B*C)
    own = torch.arange(b, device=s.device)[:, None] == torch.arange(b * c, device=s.device)[None, :] // c  # (B, B*C)
    flat = candidate_ids.reshape(b * c, -1)  # (B*C, Lc)
    if labels is None:
        labels = torch.zeros(b, c, dtype=torch.long, device=s.device)
        labels[:, 0] = 1
    same = (flat[None, None, :, :] == candidate_ids[:, :, None, :]).all(-1)  # (B, C, B*C)
    same_item = (same & (labels == 1)[:, :, None]).any(1)  # (B, B*C) equal to one of the user's positives
    return s.masked_fill(own | same_item, float("-inf"))


def grouped_rows(scores: torch.Tensor, labels: torch.Tensor, group: int,
                 batch_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Examples holding T = C' / group targets, each a block [positive, K negatives]:
    scores (B, T*C), labels (B, T*C) -> the blocks whose label is 1 as rows (R, C), positive first,
    and each row's in-batch negatives (R, X) (its user's row of ``batch_negatives``). Blocks
    labelled -1 (padding of an example short of T targets) are dropped."""
    b = scores.shape[0]
    rows = scores.view(b, -1, group)  # (B, T, C)
    keep = labels.view(b, -1, group)[:, :, 0] == 1  # (B, T)
    extra = None
    if batch_negatives is not None:
        extra = batch_negatives[:, None, :].expand(b, rows.shape[1], -1)[keep]  # (R, X)
    return rows[keep], extra


def summary_loss(logits: torch.Tensor, summary_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """logits (B, S, V), summary_ids (B, S) -> mean token NLL over non-pad labels (0 if none)."""
    labels = summary_ids.long().masked_fill(summary_ids == pad_id, -100)  # (B, S)
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0  # keeps the graph connected for DeepSpeed
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def embsum_loss(scores: torch.Tensor, summary_nll: torch.Tensor | None, summary_weight: float = 0.05,
                temperature: float = 1.0, batch_negatives: torch.Tensor | None = None) -> LossParts:
    """scores (B, 1 + K) and the teacher-forced summary's NLL (``EmbSumOutput.summary_nll``, the model
    computes it fused with its LM head) -> L_NCE + lambda * L_sum."""
    if summary_nll is None:
        raise ValueError("summary_nll is None: the training forward must be teacher-forced (pass summary_ids)")
    nce = nce_loss(scores, temperature, batch_negatives)
    return LossParts(total=nce + summary_weight * summary_nll, nce=nce, summary=summary_nll)
