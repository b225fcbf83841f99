"""Poly-attention (DESIGN.md 2.3-2.4): a few learned codes each pool a set of vectors.

alpha_a = softmax(c_a . tanh(Z W_f)^T) over the valid rows of Z, A_a = alpha_a Z.
Used twice with separate weights: M user codes over [item vectors; global vector] (UPE) and
N content codes over a candidate's token states (CPE).
"""

from __future__ import annotations

import torch
from torch import nn


class PolyAttention(nn.Module):
    def __init__(self, d_model: int, num_codes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)  # W_f
        # Codes start at the scale of a unit-RMS input so initial attention is neither flat nor peaked.
        self.codes = nn.Parameter(torch.randn(num_codes, d_model) * d_model**-0.5)  # (M, D)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z (B, T, D), mask (B, T) bool (True = valid; each row needs one) -> (B, M, D)."""
        # Padded rows are zeroed first: a weight of exactly 0 still turns inf/NaN padding into NaN
        # (0 * inf), in the output and in W_f's gradient.
        z = z.masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        keys = torch.tanh(self.proj(z))  # (B, T, D)
        logits = torch.einsum("md,btd->bmt", self.codes.to(keys.dtype), keys)  # (B, M, T)
        # finfo.min rather than -inf: exp underflows to exactly 0, so padding carries no weight,
        # and a row that is all padding gives a finite result (0) instead of NaN.
        logits = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)  # (B, M, T)
        alpha = torch.softmax(logits.float(), dim=-1).to(z.dtype)  # (B, M, T)
        return torch.bmm(alpha, z)  # (B, M, D)
