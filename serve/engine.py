"""What the scorer does with a request, as plain Python over one bundle (no Ray, no HTTP).

Each function takes a whole batch of requests and the bundle it was read from, resolves every
user and item (precomputed row, or text to encode on the fly), encodes all cold users and all
cold items of the batch in one Predictor call each, and scores the batch with one call of the
project's ``score`` (embsum/scoring.py): the same function training, evaluation and the embed
job use, so served scores equal offline ones. A request with unknown ids gets a ``Rejection``
(404 naming them) without failing the rest of its batch.

Queries and results are small plain dataclasses rather than the API's pydantic models: they
cross a process boundary (ingress -> scorer handle) on every request, and pickling 100 nested
pydantic objects costs more than scoring them. The API converts at its edge (serve/api.py).

The Serve deployment (serve/scorer.py) wraps these with @serve.batch; the bench's bare app and
the unit tests call them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embsum.scoring import score
from serve.bundle import Bundle
from serve.schemas import ModelResponse, RolloutError, SummaryResponse

# All-pairs scoring over the batch's union of candidates wastes U x I - sum(C) pair scores; below
# this factor that is cheaper than gathering a padded (U, C, N, D) copy of every request's items.
UNION_WASTE = 4.0
# Catalog scoring is chunked so the (U, M, I_chunk, N) intermediates stay near this many bytes.
CHUNK_BYTES = 256 << 20


Item = tuple[str | None, str | None]  # (item_id, text): a catalog id, a text, or both


@dataclass(frozen=True, slots=True)
class ScoreQuery:
    user_id: str | None
    history: list[Item] | None  # given: the user is encoded on the fly from it
    candidates: list[Item]


@dataclass(frozen=True, slots=True)
class RecommendQuery:
    user_id: str | None
    history: list[Item] | None
    k: int
    exclude: list[str] = field(default_factory=list)
    exclude_history: bool = True


@dataclass(frozen=True, slots=True)
class ScoreResult:
    model_version: str
    user_id: str | None
    user_encoded: bool
    item_ids: list[str | None]
    scores: list[float]
    encoded: list[bool]

    def to_json(self) -> dict[str, Any]:
        """The body of a ScoreResponse (serve/schemas.py)."""
        return {"model_version": self.model_version, "user_id": self.user_id, "user_encoded": self.user_encoded,
                "scores": [{"item_id": i, "score": s, "encoded": e}
                           for i, s, e in zip(self.item_ids, self.scores, self.encoded, strict=True)]}


@dataclass(frozen=True, slots=True)
class RecommendResult:
    model_version: str
    user_id: str | None
    user_encoded: bool
    item_ids: list[str]
    scores: list[float]
    texts: list[str]

    def to_json(self) -> dict[str, Any]:
        """The body of a RecommendResponse (serve/schemas.py)."""
        return {"model_version": self.model_version, "user_id": self.user_id, "user_encoded": self.user_encoded,
                "items": [{"item_id": i, "score": s, "text": t}
                          for i, s, t in zip(self.item_ids, self.scores, self.texts, strict=True)]}


@dataclass(frozen=True)
class Rejection:
    """A request the scorer refuses: the HTTP status and a message naming the problem."""

    status: int
    detail: str


class _Rejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(status, detail)


@dataclass
class BatchStats:
    """What one batch cost, for the metrics."""

    size: int = 0
    cold_users: int = 0
    cold_items: int = 0


def _unknown(kind: str, ids: Sequence[str], hint: str) -> _Rejected:
    shown = ", ".join(repr(i) for i in list(dict.fromkeys(ids))[:20])
    more = f" (and {len(set(ids)) - 20} more)" if len(set(ids)) > 20 else ""
    return _Rejected(404, f"unknown {kind} ids: {shown}{more}; {hint}")


# ---- resolving users and items ------------------------------------------------------------------
@dataclass
class _User:
    row: int | None = None  # precomputed UPE row
    texts: list[str] | None = None  # cold: history item texts, oldest first
    history_rows: list[int] = field(default_factory=list)  # known catalog rows in the history


def _resolve_user(b: Bundle, user_id: str | None, history: list[Item] | None) -> _User:
    store = b.store
    if history is None:
        row = store.user_index.get(user_id or "")
        if row is None:
            raise _unknown("user", [user_id or ""], "give the user's `history` (item ids and/or texts) to "
                                                    "encode an unknown user")
        rows = [r for r in (store.item_index.get(i) for i in store.histories[row]) if r is not None]
        return _User(row=row, history_rows=rows)
    texts, rows, missing = [], [], []
    for item_id, text in history:
        r = store.item_index.get(item_id) if item_id is not None else None
        if r is not None:
            texts.append(store.item_texts[r])  # the catalog text, exactly what the embed job encoded
            rows.append(r)
        elif text is not None:
            texts.append(text)
        else:
            missing.append(item_id or "")
    if missing:
        raise _unknown("history item", missing, "give their `text` to encode them")
    return _User(texts=texts, history_rows=rows)


def _user_matrix(b: Bundle, users: list[_User], stats: BatchStats) -> np.ndarray:
    """-> UPE (U, M, D) for the batch; all cold users encoded in one Predictor call."""
    cold = [u.texts for u in users if u.row is None]
    cold_upe = b.predictor.encode_user_texts(cold).upe if cold else None  # (Uc, M, D)
    stats.cold_users += len(cold)
    out, j = [], 0
    for u in users:
        if u.row is not None:
            out.append(b.store.upe[u.row])  # (M, D)
        else:
            out.append(cold_upe[j])
            j += 1
    return np.stack(out)  # (U, M, D)


def _score(upe: np.ndarray, cpe: np.ndarray, key: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return score(torch.from_numpy(upe), torch.from_numpy(cpe), torch.from_numpy(key)).numpy()


# ---- /v1/score -----------------------------------------------------------------------------------
def score_batch(b: Bundle, requests: Sequence[ScoreQuery]) -> tuple[list[ScoreResult | Rejection], BatchStats]:
    """Score every request's candidates with one ``score`` call for the whole batch."""
    store = b.store
    stats = BatchStats(size=len(requests))
    out: list[ScoreResult | Rejection | None] = [None] * len(requests)
    live: list[int] = []
    users: list[_User] = []
    req_keys: list[list[tuple[str, object]]] = []  # per live request: ("row", catalog row) | ("text", text)
    for i, req in enumerate(requests):
        try:
            user = _resolve_user(b, req.user_id, req.history)
            keys, missing = [], []
            for item_id, text in req.candidates:
                r = store.item_index.get(item_id) if item_id is not None else None
                if r is not None:
                    keys.append(("row", r))
                elif text is not None:
                    keys.append(("text", text))
                else:
                    missing.append(item_id or "")
            if missing:
                raise _unknown("candidate item", missing, "give their `text` to encode them")
        except _Rejected as e:
            out[i] = e.rejection
            continue
        live.append(i)
        users.append(user)
        req_keys.append(keys)
    if live:
        upe = _user_matrix(b, users, stats)  # (U, M, D)
        # The batch's union of candidates: known catalog rows first, then distinct cold texts.
        known = list(dict.fromkeys(k[1] for ks in req_keys for k in ks if k[0] == "row"))
        texts = list(dict.fromkeys(str(k[1]) for ks in req_keys for k in ks if k[0] == "text"))
        col = {("row", r): j for j, r in enumerate(known)}
        col.update({("text", t): len(known) + j for j, t in enumerate(texts)})
        cols = [np.array([col[k] for k in ks], dtype=np.int64) for ks in req_keys]
        rows = np.asarray(known, dtype=np.int64)
        cpe_u, key_u = store.cpe[rows], store.cpe_key[rows]  # (Ik, N, D) x2
        if texts:
            cold = b.predictor.encode_item_texts(texts)  # one T5 call for every cold item of the batch
            cpe_u, key_u = np.concatenate([cpe_u, cold.cpe]), np.concatenate([key_u, cold.key])  # (I, N, D)
            stats.cold_items += len(texts)
        n_union = len(known) + len(texts)
        total = sum(len(c) for c in cols)
        if len(cols) * n_union <= UNION_WASTE * total:
            pair = _score(upe, cpe_u, key_u)  # (U, I) all pairs over the union
            per_req = [pair[j, c] for j, c in enumerate(cols)]
        else:
            cmax = max(len(c) for c in cols)
            idx = np.zeros((len(cols), cmax), dtype=np.int64)  # (U, Cmax), padded with column 0
            for j, c in enumerate(cols):
                idx[j, : len(c)] = c
            padded = _score(upe, cpe_u[idx], key_u[idx])  # (U, Cmax) per-user candidates
            per_req = [padded[j, : len(c)] for j, c in enumerate(cols)]
        for j, i in enumerate(live):
            req = requests[i]
            out[i] = ScoreResult(model_version=b.version, user_id=req.user_id, user_encoded=users[j].row is None,
                                 item_ids=[c[0] for c in req.candidates], scores=per_req[j].tolist(),
                                 encoded=[k[0] == "text" for k in req_keys[j]])
    return out, stats  # type: ignore[return-value]


# ---- /v1/recommend -------------------------------------------------------------------------------
def catalog_scores(upe: np.ndarray, cpe: np.ndarray, key: np.ndarray) -> np.ndarray:
    """upe (U, M, D) against every item (I, N, D) -> (U, I), in item chunks of bounded memory."""
    u, m, _ = upe.shape
    n = cpe.shape[1]
    chunk = max(1, CHUNK_BYTES // max(1, u * m * n * 4 * 3))
    if chunk >= len(cpe):
        return _score(upe, cpe, key)
    return np.concatenate([_score(upe, cpe[s:s + chunk], key[s:s + chunk]) for s in range(0, len(cpe), chunk)],
                          axis=1)


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k best of ``scores`` (I,), best first, ties by index; excluded never chosen."""
    s = scores.astype(np.float64, copy=True)
    if exclude is not None and len(exclude):
        s[exclude] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros((0,), dtype=np.int64)
    part = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    return part[np.lexsort((part, -s[part]))]


def recommend_batch(b: Bundle, requests: Sequence[RecommendQuery]
                    ) -> tuple[list[RecommendResult | Rejection], BatchStats]:
    """Rank the whole catalog for every request with one chunked ``score`` over the catalog."""
    store = b.store
    stats = BatchStats(size=len(requests))
    out: list[RecommendResult | Rejection | None] = [None] * len(requests)
    live, users = [], []
    for i, req in enumerate(requests):
        try:
            users.append(_resolve_user(b, req.user_id, req.history))
            live.append(i)
        except _Rejected as e:
            out[i] = e.rejection
    if live:
        upe = _user_matrix(b, users, stats)  # (U, M, D)
        scores = catalog_scores(upe, store.cpe, store.cpe_key)  # (U, I)
        for j, i in enumerate(live):
            req = requests[i]
            excl = [r for r in (store.item_index.get(x) for x in req.exclude) if r is not None]
            if req.exclude_history:
                excl.extend(users[j].history_rows)
            best = top_k(scores[j], req.k, np.unique(np.asarray(excl, dtype=np.int64)))
            out[i] = RecommendResult(model_version=b.version, user_id=req.user_id, user_encoded=users[j].row is None,
                                     item_ids=[store.item_ids[r] for r in best], scores=scores[j, best].tolist(),
                                     texts=[store.item_texts[r] for r in best])
    return out, stats  # type: ignore[return-value]


# ---- /v1/users/{id}/summary ----------------------------------------------------------------------
def user_summary(b: Bundle, user_id: str) -> SummaryResponse | Rejection:
    row = b.store.user_index.get(user_id)
    if row is None:
        return Rejection(404, f"unknown user id {user_id!r}: no precomputed summary in the v{b.version} embeddings")
    return SummaryResponse(model_version=b.version, user_id=user_id, summary=b.store.summaries[row])


# ---- /v1/model -----------------------------------------------------------------------------------
def describe(b: Bundle, *, alias: str, requested: str, error: RolloutError | None) -> ModelResponse:
    return ModelResponse(model_name=b.model_name, model_version=b.version, aliases=list(b.aliases), alias=alias,
                         requested_version=requested, loaded_at=b.loaded_at, embeddings=b.store.describe(),
                         last_rollout_error=error)
