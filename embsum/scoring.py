"""The EmbSum score (DESIGN.md 2.5): a pure function of precomputed embeddings, no T5 needed.

K_ij = flatten(A_i B_j^T), W_p = softmax(flatten(A_i gelu(B_j W_s)^T)), s_ij = W_p . K_ij.
``cpe_key = gelu(B_j W_s)`` depends on the item alone, so it is computed once per item with B_j
(``EmbSum.encode_content``) and stored beside it. Training, evaluation, precompute and serving
all call this one function.
"""

from __future__ import annotations

import torch


def score(upe: torch.Tensor, cpe: torch.Tensor, cpe_key: torch.Tensor) -> torch.Tensor:
    """Relevance scores.

    - all pairs: upe (U, M, D), cpe and cpe_key (I, N, D) -> (U, I);
    - per-user candidates: upe (U, M, D), cpe and cpe_key (U, C, N, D) -> (U, C).

    The all-pairs form is two GEMMs of (U*M, D) x (D, I*N), so scoring a whole catalog runs at
    matrix-multiply speed. Callers chunk U x I when it would not fit in memory.
    """
    if cpe.shape != cpe_key.shape:
        raise ValueError(f"cpe {tuple(cpe.shape)} and cpe_key {tuple(cpe_key.shape)} must have the same shape")
    if cpe.dim() not in (3, 4):  # checked first: a 0-d cpe has no last dimension to compare
        raise ValueError(f"cpe must be (I, N, D) or (U, C, N, D); got {tuple(cpe.shape)}")
    if upe.dim() != 3 or upe.shape[-1] != cpe.shape[-1]:
        raise ValueError(f"upe must be (U, M, D) with D = {cpe.shape[-1]}; got {tuple(upe.shape)}")
    u, m, d = upe.shape
    if cpe.dim() == 3:
        i, n, _ = cpe.shape
        a = upe.reshape(u * m, d)  # (U*M, D)
        k = (a @ cpe.reshape(i * n, d).T).view(u, m, i, n)  # (U, M, I, N)
        g = (a @ cpe_key.reshape(i * n, d).T).view(u, m, i, n)  # (U, M, I, N)
        k = k.permute(0, 2, 1, 3).reshape(u, i, m * n)  # (U, I, M*N)
        g = g.permute(0, 2, 1, 3).reshape(u, i, m * n)  # (U, I, M*N)
    elif cpe.dim() == 4:
        if cpe.shape[0] != u:
            raise ValueError(f"per-user candidates need cpe (U={u}, C, N, D); got {tuple(cpe.shape)}")
        k = torch.einsum("umd,ucnd->ucmn", upe, cpe).flatten(-2)  # (U, C, M*N)
        g = torch.einsum("umd,ucnd->ucmn", upe, cpe_key).flatten(-2)  # (U, C, M*N)
    else:
        raise ValueError(f"cpe must be (I, N, D) or (U, C, N, D); got {tuple(cpe.shape)}")
    w = torch.softmax(g.float(), dim=-1).to(k.dtype)  # (U, *, M*N)
    return (w * k).sum(-1)  # (U, I) or (U, C)
