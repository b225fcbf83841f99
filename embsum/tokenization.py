"""Text -> token ids for EmbSum: item text, sessions with [SOS] markers, candidates, summaries.

The [SOS] marker is a reserved T5 sentinel (default ``<extra_id_0>``, id 32099) rather than a new
added token: every T5 checkpoint already has a trained embedding row for it, the tokenizer files
are used unchanged (so ``from_pretrained`` round-trips), and the embedding matrix is never
resized. In pretraining a sentinel's encoder state stands for a span in its context, which is
the role [SOS] plays for an item. Text that itself contains the marker cannot forge item
boundaries: marker ids are removed from tokenized text.

Items are tokenized once (``encode_texts``); sessions, candidates and summaries are assembled
from those id lists, so a catalog of N items costs N tokenizer calls however many histories use it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embsum.config import ModelConfig

BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "t5-tokenizer"


def resolve_tokenizer_path(cfg: ModelConfig) -> str:
    """'bundled' -> the packaged T5 tokenizer; '' -> the backbone's; else the name/path given."""
    if cfg.tokenizer == "bundled":
        return str(BUNDLED_TOKENIZER)
    return cfg.tokenizer or cfg.backbone


def load_tokenizer(name_or_path: str) -> Any:
    """A T5 tokenizer via ``AutoTokenizer.from_pretrained`` (a hub name or a local directory).

    Never ``T5Tokenizer(vocab_file=...)``: in transformers 5 that silently builds a 4-token vocab.
    """
    from transformers import AutoTokenizer

    path = str(BUNDLED_TOKENIZER) if name_or_path == "bundled" else name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {name_or_path!r} could not be loaded (a Hugging Face name needs the hub "
                         f"or its cache; a directory needs spiece.model or tokenizer.json): {e}") from None
    if len(tok) < 1000:
        raise ValueError(f"tokenizer {name_or_path!r} has only {len(tok)} tokens; expected a T5 vocabulary")
    return tok


def _missing(v: Any) -> bool:
    """None, NaN of any float type (numpy's float32 is no ``float``), pandas NA/NaT."""
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN and NaT are the values unequal to themselves
    except (TypeError, ValueError):  # pd.NA's comparison is NA, whose truth is a TypeError
        return type(v).__name__ == "NAType"


def format_item_text(record: Mapping[str, Any], fields: Sequence[str], max_chars: int) -> str:
    """Join the configured catalog fields (skipping empty ones) into one capped line of text. HTML
    entities are decoded ('&amp;' -> '&': catalogs scraped from the web carry them)."""
    parts: list[str] = []
    for f in fields:
        v = record.get(f)
        if _missing(v):
            continue
        s = " ".join(html.unescape(str(v)).split())
        if s:
            parts.append(s)
    return " | ".join(parts)[:max_chars]


class EmbSumTokenizer:
    """Builds the fixed-shape id arrays the model consumes, from one tokenizer and one model config."""

    def __init__(self, tokenizer: Any, cfg: ModelConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        sos = tokenizer.convert_tokens_to_ids(cfg.sos_token)
        if sos is None or sos == tokenizer.unk_token_id:
            raise ValueError(f"model.sos_token={cfg.sos_token!r} is not in the tokenizer's vocabulary; "
                             f"use a reserved sentinel such as '<extra_id_0>'")
        self.sos_id: int = int(sos)
        self.pad_id: int = int(tokenizer.pad_token_id)
        self.eos_id: int = int(tokenizer.eos_token_id)
        # Each history item gets an equal slice of its session so that no item's marker is ever
        # truncated away: (L - 1) // P tokens including the marker (the 1 is the session's EOS).
        self.item_budget: int = (cfg.session_tokens - 1) // cfg.items_per_session
        # Ids that text may never produce: the tokenizer maps the literal strings '<extra_id_0>',
        # '</s>' and '<pad>' to these, which would forge item boundaries, end a session or
        # summary early, or be masked out as padding.
        self._reserved: frozenset[int] = frozenset({self.sos_id, self.pad_id, self.eos_id})

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> EmbSumTokenizer:
        return cls(load_tokenizer(resolve_tokenizer_path(cfg)), cfg)

    # ---- text -> ids ------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Tokenize without special tokens; drop marker/pad/EOS ids; cap at ``max_tokens`` (default: fits any slot)."""
        cap = max_tokens if max_tokens is not None else max(self.cfg.content_tokens, self.item_budget)
        if len(texts) == 0:  # len, not truthiness: numpy/pyarrow batches are ambiguous as bools
            return []
        out = self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=cap + 8)["input_ids"]
        return [[t for t in ids if t not in self._reserved][:cap] for ids in out]

    # ---- ids -> model inputs ----------------------------------------------------------------
    def sessions(self, history: Sequence[Sequence[int]]) -> np.ndarray:
        """One user's history (item id lists, oldest first) -> session ids (G, L).

        Keeps the most recent G * P items, fills sessions in order (oldest first), each session
        ``[SOS] item ... [SOS] item </s>`` padded with 0. Unused sessions stay all padding.
        """
        c = self.cfg
        out = np.full((c.num_sessions, c.session_tokens), self.pad_id, dtype=np.int32)  # (G, L)
        recent = list(history)[-(c.num_sessions * c.items_per_session):]  # (no truthiness: numpy input)
        for g in range(c.num_sessions):
            chunk = recent[g * c.items_per_session:(g + 1) * c.items_per_session]
            if not chunk:
                break
            ids: list[int] = []
            for item in chunk:
                ids.append(self.sos_id)
                ids.extend(list(item)[: self.item_budget - 1])
            ids.append(self.eos_id)
            out[g, : len(ids)] = ids
        return out

    def content(self, item: Sequence[int]) -> np.ndarray:
        """One candidate item's ids -> ``[SOS] text </s>`` padded to content_tokens (Lc,)."""
        lc = self.cfg.content_tokens
        ids = [self.sos_id, *list(item)[: lc - 2], self.eos_id]
        out = np.full((lc,), self.pad_id, dtype=np.int32)  # (Lc,)
        out[: len(ids)] = ids
        return out

    def summary(self, text: str) -> np.ndarray:
        """A teacher summary -> label ids ``text </s>`` padded with 0 to summary_tokens (S,)."""
        s = self.cfg.summary_tokens
        ids = self.encode_texts([text], max_tokens=s - 1)[0] if text else []
        out = np.full((s,), self.pad_id, dtype=np.int32)  # (S,)
        out[: len(ids) + 1] = [*ids, self.eos_id]
        return out

    def empty_summary(self) -> np.ndarray:
        """The EOS-only summary row (S,): what an example without a teacher summary is teacher-forced on
        (training without summaries, the probe). The one builder of it: this tokenizer's EOS id."""
        return self.summary("")

    # ---- batch helpers ----------------------------------------------------------------------
    def sessions_batch(self, histories: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        return np.stack([self.sessions(h) for h in histories]) if len(histories) else \
            np.zeros((0, self.cfg.num_sessions, self.cfg.session_tokens), dtype=np.int32)  # (B, G, L)

    def content_batch(self, items: Sequence[Sequence[int]] | pa.ListArray) -> np.ndarray:
        """``content`` of every item at once -> (I, Lc) int32 (vectorized over Arrow lists)."""
        lc = self.cfg.content_tokens
        return padded_rows(items, lc, self.pad_id, head=self.sos_id, tail=self.eos_id)[0]  # (I, Lc)

    def content_from_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.content_batch(self.encode_texts(texts, self.cfg.content_tokens))  # (I, Lc)

    def sessions_from_texts(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        flat = [t for h in histories for t in h]
        ids = iter(self.encode_texts(flat, self.item_budget))
        return self.sessions_batch([[next(ids) for _ in h] for h in histories])  # (B, G, L)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # The keyword matches Hugging Face's decode, so either tokenizer works where text is made.
        return self.tok.decode([int(i) for i in ids if int(i) not in (self.pad_id,)],
                               skip_special_tokens=skip_special_tokens)


def padded_rows(lists: Sequence[Sequence[int]] | pa.ListArray, width: int, pad: int, *, head: int | None = None,
                tail: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> rows ``[head] + ids[:room] + [tail]`` padded to ``width`` with ``pad``
    ((N, width) int32) and their lengths ((N,) int64), where room = width minus the head and tail.
    One vectorized pass over the Arrow values: no Python int per token."""
    arr = lists if isinstance(lists, pa.ListArray) else pa.array(list(lists), pa.list_(pa.int32()))
    n, start = len(arr), int(head is not None)
    room = width - start - int(tail is not None)
    out = np.full((n, width), pad, dtype=np.int32)  # (N, width)
    if n == 0:
        return out, np.zeros(0, dtype=np.int64)
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)  # (N+1,) into arr.values
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.int32)
    keep = np.minimum(np.diff(offsets), room)  # (N,) ids kept per row
    rows = np.repeat(np.arange(n), keep)  # (K,) row of each kept id
    within = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)  # (K,) its place in the row
    out[rows, start + within] = values[offsets[:-1][rows] + within]
    if head is not None:
        out[:, 0] = head
    if tail is not None:
        out[np.arange(n), start + keep] = tail
    return out, start + keep + int(tail is not None)
