"""One predictor for batch inference (evaluate, embed) and serving: model dir in, numpy out.

Wraps a loaded EmbSum in eval mode with batching and no_grad, so every consumer encodes users
and items, and scores, through the same code (DESIGN.md 2: the offline/online split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embsum.arrow_tensors import writable
from embsum.checkpoint import load_model, read_meta
from embsum.config import ModelConfig
from embsum.scoring import score


@dataclass
class UserEmbeddings:
    upe: np.ndarray  # (B, M, D) float32
    summary_ids: np.ndarray  # (B, S) int32
    summaries: list[str]


@dataclass
class ItemEmbeddings:
    cpe: np.ndarray  # (I, N, D) float32
    key: np.ndarray  # (I, N, D) float32, gelu(B W_s)


class Predictor:
    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self.cfg: ModelConfig = model.cfg
        self.batch_size = batch_size
        self.device = torch.device(device)

    @classmethod
    def from_dir(cls, path: str | Path, *, expect: ModelConfig | None = None, batch_size: int = 64,
                 device: str | None = None) -> Predictor:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_model(path, expect=expect, device=device)
        return cls(model, tok, batch_size=batch_size, device=device)

    @staticmethod
    def meta(path: str | Path) -> dict[str, Any]:
        return read_meta(path)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(writable(a, np.int64)).to(self.device)

    # ---- users -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_users(self, session_ids: np.ndarray, summary_ids: np.ndarray | None = None,
                     *, with_text: bool = True) -> UserEmbeddings:
        """session_ids (B, G, L) -> UPE (B, M, D); summary generated unless given (teacher-forced)."""
        upes, sids = [], []
        for i in range(0, len(session_ids), self.batch_size):
            s = self._t(session_ids[i:i + self.batch_size])  # (b, G, L)
            y = None if summary_ids is None else self._t(summary_ids[i:i + self.batch_size])  # (b, S)
            enc = self.model.user_encoding(s, y)
            upes.append(enc.upe.float().cpu().numpy())
            sids.append(enc.summary_ids.to(torch.int32).cpu().numpy())
        m, d, s_len = self.cfg.user_codes, self.model.d_model, self.cfg.summary_tokens
        upe = np.concatenate(upes) if upes else np.zeros((0, m, d), np.float32)  # (B, M, D)
        ids = np.concatenate(sids) if sids else np.zeros((0, s_len), np.int32)  # (B, S)
        texts = [self.tok.decode(r) for r in ids] if with_text else []
        return UserEmbeddings(upe=upe, summary_ids=ids, summaries=texts)

    def encode_user_texts(self, histories: Sequence[Sequence[str]]) -> UserEmbeddings:
        """Cold path: histories given as item texts (oldest first)."""
        return self.encode_users(self.tok.sessions_from_texts(histories))

    # ---- items -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, content_ids: np.ndarray) -> ItemEmbeddings:
        """content_ids (I, Lc) -> CPE (I, N, D) and score key (I, N, D)."""
        cpes, keys = [], []
        for i in range(0, len(content_ids), self.batch_size):
            cpe, key = self.model.encode_content(self._t(content_ids[i:i + self.batch_size]))  # (b, N, D) x2
            cpes.append(cpe.float().cpu().numpy())
            keys.append(key.float().cpu().numpy())
        n, d = self.cfg.content_codes, self.model.d_model
        empty = np.zeros((0, n, d), np.float32)
        return ItemEmbeddings(cpe=np.concatenate(cpes) if cpes else empty, key=np.concatenate(keys) if keys else empty)

    def encode_item_tokens(self, token_ids: Sequence[Sequence[int]]) -> ItemEmbeddings:
        return self.encode_items(self.tok.content_batch(token_ids))

    def encode_item_texts(self, texts: Sequence[str]) -> ItemEmbeddings:
        return self.encode_items(self.tok.content_from_texts(texts))

    # ---- scores ----------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def score(upe: np.ndarray, cpe: np.ndarray, key: np.ndarray) -> np.ndarray:
        """All pairs: upe (U, M, D), cpe/key (I, N, D) -> (U, I) float32, via the one ``score``."""
        return score(torch.from_numpy(writable(upe, np.float32)), torch.from_numpy(writable(cpe, np.float32)),
                     torch.from_numpy(writable(key, np.float32))).numpy()
