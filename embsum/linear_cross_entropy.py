"""The summary's token loss without its (tokens x vocabulary) logits: a linear layer and a
cross-entropy fused, a chunk of tokens at a time.

``cross_entropy(states @ W.T, labels)`` holds the logits, their log-softmax and, in the backward,
two more tensors of the same (N, V) shape: with T5's 32,128-token vocabulary that is 66 MB each
for a batch of 16 x 32 summary tokens, the largest transient of a training step of the demo's
model (bench/train_memory.py), and it grows with batch x summary length x vocabulary on a GPU.
Here each chunk's logits are made, turned into the loss and into the gradients of the states and
of the weight at once (softmax - one-hot), and freed: the peak is one chunk's logits, and the
backward only scales the stored gradients. The matrix products are the same three as the
unfused layer's forward and backward; the gradients are computed even if no backward follows,
so use it for losses that are trained on (evaluation needs no summary loss).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100  # label of a position that does not count (padding), as in F.cross_entropy
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M (16 MB in fp32), 130 tokens of a 32k vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        """states (N, D), weight (V, D), labels (N,) -> mean NLL over labels != IGNORE (0 if none)."""
        n = states.shape[0]
        valid = labels != IGNORE  # (N,)
        acc = torch.promote_types(states.dtype, torch.float32)  # softmax and sums: fp32 at least
        count = valid.sum().clamp(min=1).to(acc)  # ()
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_states = torch.empty_like(states) if want_grad else None  # (N, D)
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_grad else None  # (V, D)
        total = torch.zeros((), dtype=acc, device=states.device)  # ()
        for lo in range(0, n, chunk):
            h = states[lo:lo + chunk]  # (c, D)
            y = labels[lo:lo + chunk]  # (c,)
            keep = valid[lo:lo + chunk]  # (c,)
            logits = (h @ weight.t()).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (c,)
            total += ((lse - target) * keep).sum()
            if grad_states is None or grad_weight is None:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place of the logits
            rows = torch.arange(h.shape[0], device=h.device)  # (c,)
            probs[rows, y.clamp(min=0)] -= 1.0  # d NLL / d logits = softmax - one-hot
            probs *= keep[:, None]  # (c, V) ignored positions contribute nothing
            grad_states[lo:lo + chunk] = (probs.to(weight.dtype) @ weight).to(states.dtype)  # (c, D)
            grad_weight += probs.t() @ h.to(acc)  # (V, D)
        if grad_states is not None and grad_weight is not None:
            ctx.save_for_backward(grad_states / count.to(states.dtype), (grad_weight / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_states, grad_weight = ctx.saved_tensors
        g = grad_out.to(grad_states.dtype)  # () the upstream scale (the summary loss's weight)
        return grad_states * g, grad_weight * g.to(grad_weight.dtype), None, None


def linear_cross_entropy(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """states (N, D), weight (V, D) of a bias-free linear layer, labels (N,) in [0, V) or IGNORE ->
    ``F.cross_entropy(states @ weight.T, labels, ignore_index=IGNORE)`` (0, still connected to the
    graph, when every label is IGNORE), computed in chunks of ``chunk_elements`` logits."""
    if states.ndim != 2 or weight.ndim != 2 or states.shape[1] != weight.shape[1]:
        raise ValueError(f"states (N, D) and weight (V, D) expected, got {tuple(states.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != states.shape[:1]:
        raise ValueError(f"labels (N,) = {tuple(labels.shape)} does not match states {tuple(states.shape)}")
    chunk = max(1, chunk_elements // weight.shape[0])
    out: torch.Tensor = _LinearCrossEntropy.apply(states, weight, labels.long(), chunk)
    return out
