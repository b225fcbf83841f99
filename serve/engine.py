"""What the scorer does with a request, as plain Python over one bundle (no Ray, no HTTP).

Each function takes a whole batch of requests and the bundle it was read from, resolves every
user and item (precomputed row, or text to encode on the fly), encodes all cold users and all
cold items of the batch in one Predictor call each, and scores the batch with one call of the
project's ``score`` (embsum/scoring.py): the same function training, evaluation and the embed
job use, so served scores equal offline ones. A request with unknown ids gets a ``Rejection``
(404 naming them) without failing the rest of its batch.

Queries and results are small plain dataclasses rather than the API's pydantic models: building
and reading 100 nested pydantic objects per request costs more than scoring them, and a result
writes its own JSON bytes (``ScoreResult.json_bytes``). The API converts at its edge (serve/api.py).

The Serve deployment (serve/scorer.py) wraps these with @serve.batch; the bench's bare app and
the unit tests call them directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # the C escaper
from typing import Any

import numpy as np
import torch

from embsum.scoring import score

from .bundle import Bundle
from .schemas import ModelResponse, RolloutError, SummaryResponse

# All-pairs scoring over the batch's union of candidates wastes U x I - sum(C) pair scores; below
# this factor that is cheaper than gathering a padded (U, C, N, D) copy of every request's items.
UNION_WASTE = 4.0
# Catalog scoring is chunked so the (U, M, I_chunk, N) intermediates stay near this many bytes.
CHUNK_BYTES = 256 << 20


Item = tuple[str | None, str | None]  # (item_id, text): a catalog id, a text, or both


def _jstr(s: str | None) -> str:
    return "null" if s is None else encode_basestring_ascii(s)


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

    def json_bytes(self) -> bytes:
        """``to_json()`` as compact ASCII JSON, byte for byte what ``json.dumps(..., ensure_ascii=True,
        separators=(",", ":"))`` writes, in half its time (no per-item dicts; strings through the
        json module's C escaper, floats through the same repr). Non-finite scores take json.dumps
        itself, which refuses them as it always did."""
        if not all(math.isfinite(x) for x in self.scores):
            return json.dumps(self.to_json(), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
        items = ",".join([f'{{"item_id":{_jstr(i)},"score":{x!r},"encoded":{"true" if e else "false"}}}'
                          for i, x, e in zip(self.item_ids, self.scores, self.encoded, strict=True)])
        return (f'{{"model_version":{_jstr(self.model_version)},"user_id":{_jstr(self.user_id)},'
                f'"user_encoded":{"true" if self.user_encoded else "false"},"scores":[{items}]}}').encode("ascii")


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


def _distinct_users(users: list[_User]) -> tuple[list[_User], np.ndarray]:
    """-> (the batch's distinct users, (U,) each request's index among them). Known users are the
    same user when they have the same UPE row; a cold user (encoded from its history) is its own."""
    distinct: list[_User] = []
    first: dict[int, int] = {}
    at = np.empty(len(users), dtype=np.int64)  # (U,)
    for j, u in enumerate(users):
        k = len(distinct) if u.row is None else first.setdefault(u.row, len(distinct))
        if k == len(distinct):
            distinct.append(u)
        at[j] = k
    return distinct, at


def _user_matrix(b: Bundle, users: list[_User], stats: BatchStats) -> tuple[np.ndarray, np.ndarray]:
    """-> (UPE (Ud, M, D) of the batch's distinct users, (U,) each request's row in it); all cold
    users encoded in one Predictor call."""
    users, at = _distinct_users(users)
    cold = [u.texts for u in users if u.row is None and u.texts is not None]  # _resolve_user: cold ones have texts
    cold_upe = b.predictor.encode_user_texts(cold).upe if cold else None  # (Uc, M, D)
    stats.cold_users += len(cold)
    out, j = [], 0
    for u in users:
        if u.row is not None:
            out.append(b.store.upe[u.row])  # (M, D)
        else:
            assert cold_upe is not None  # a user without a row is cold
            out.append(cold_upe[j])
            j += 1
    return np.stack(out), at  # (Ud, M, D), (U,)


def _score(upe: np.ndarray, cpe: np.ndarray, key: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return score(torch.from_numpy(upe), torch.from_numpy(cpe), torch.from_numpy(key)).numpy()


# ---- /v1/score -----------------------------------------------------------------------------------
def is_light(requests: Sequence[ScoreQuery], max_candidates: int) -> bool:
    """True when scoring ``requests`` needs no encoder call (no history, no candidate given by
    text) and the batch has at most ``max_candidates`` DISTINCT candidates: a few milliseconds at
    most. Distinct, not summed: requests that share candidates are scored all pairs over their
    union (``score_batch``), so 16 requests for the same 100 items cost about 3x one request,
    not 16x."""
    seen: set[str | None] = set()
    for q in requests:
        if q.history is not None:
            return False
        for item_id, text in q.candidates:
            if text is not None:
                return False
            seen.add(item_id)
        if len(seen) > max_candidates:
            return False
    return True


def _candidate_keys(b: Bundle, candidates: list[Item], texts: dict[str, int],
                    max_cold: int | None = None) -> np.ndarray:
    """-> (C,) int64: the catalog row of each candidate, or -1 - j for the batch's j-th cold text
    (added to ``texts`` only once the whole request is known to be valid). More than ``max_cold``
    distinct cold texts (T5 encodes) in one request is a 413."""
    index = b.store.item_index
    rows = [index.get(item_id) if item_id is not None else None for item_id, _ in candidates]
    if None in rows:
        missing = [item_id or "" for (item_id, text), r in zip(candidates, rows, strict=True)
                   if r is None and text is None]
        if missing:
            raise _unknown("candidate item", missing, "give their `text` to encode them")
        cold = len({text for (_, text), r in zip(candidates, rows, strict=True) if r is None})
        if max_cold is not None and cold > max_cold:
            raise _Rejected(413, f"cold items: {cold} candidates need a T5 encode (given by text, id not in the "
                                 f"served embeddings), more than serve.max_cold_items={max_cold}")
        rows = [r if r is not None else -1 - texts.setdefault(str(text), len(texts))
                for (_, text), r in zip(candidates, rows, strict=True)]
    return np.asarray(rows, dtype=np.int64)


def score_batch(b: Bundle, requests: Sequence[ScoreQuery], max_cold_items: int | None = None
                ) -> tuple[list[ScoreResult | Rejection], BatchStats]:
    """Score every request's candidates with one ``score`` call for the whole batch.

    Every candidate is a key: its catalog row, or a negative index into the batch's distinct cold
    texts. The batch's union of keys (one ``np.unique``, which also gives each candidate its
    column) is scored all pairs when that wastes little (``UNION_WASTE``), else each request's own
    candidates are gathered into a padded (U, C, N, D) block straight from the store. Requests of
    the batch that name the same known user share one UPE row: the all-pairs score then costs
    (distinct users x union), not (requests x union).
    """
    store = b.store
    stats = BatchStats(size=len(requests))
    out: list[ScoreResult | Rejection | None] = [None] * len(requests)
    live: list[int] = []
    users: list[_User] = []
    keys: list[np.ndarray] = []  # per live request: (C,) candidate keys
    texts: dict[str, int] = {}  # the batch's distinct cold item texts -> their index
    for i, req in enumerate(requests):
        try:
            user = _resolve_user(b, req.user_id, req.history)
            keys.append(_candidate_keys(b, req.candidates, texts, max_cold_items))
        except _Rejected as e:
            out[i] = e.rejection
            continue
        live.append(i)
        users.append(user)
    if not live:
        return out, stats  # type: ignore[return-value]
    upe, user_at = _user_matrix(b, users, stats)  # (Ud, M, D), one row per distinct user; (U,)
    cold = b.predictor.encode_item_texts(list(texts)) if texts else None  # one T5 call for the batch's cold items
    stats.cold_items += len(texts)
    union, column = np.unique(np.concatenate(keys), return_inverse=True)  # (I,) sorted: cold texts first
    n_cold = int(np.searchsorted(union, 0))
    ends = np.cumsum([len(k) for k in keys])
    if len(upe) * len(union) <= UNION_WASTE * int(ends[-1]):
        rows = union[n_cold:]
        cpe_u, key_u = store.cpe[rows], store.cpe_key[rows]  # (Ik, N, D) x2
        if cold is not None:
            at = -1 - union[:n_cold]  # rows of cold
            cpe_u, key_u = np.concatenate([cold.cpe[at], cpe_u]), np.concatenate([cold.key[at], key_u])  # (I, N, D)
        pair = _score(upe, cpe_u, key_u)  # (Ud, I) all pairs over the union
        per_req = [pair[user_at[j], c] for j, c in enumerate(np.split(column, ends[:-1]))]
    else:
        if len(upe) < len(users):  # (all distinct: user_at is the identity)
            upe = upe[user_at]  # (U, M, D): each request's own user
        cmax = max(len(k) for k in keys)
        pad = np.zeros((len(keys), cmax), dtype=np.int64)  # (U, Cmax) keys, padded with row 0
        for j, k in enumerate(keys):
            pad[j, : len(k)] = k
        if cold is None:  # gather straight from the store: one copy
            padded = _score(upe, store.cpe[pad], store.cpe_key[pad])  # (U, Cmax)
        else:
            at = np.where(pad >= 0, pad + len(cold.cpe), -1 - pad)  # rows of [cold ; catalog]
            padded = _score(upe, np.concatenate([cold.cpe, store.cpe])[at],
                            np.concatenate([cold.key, store.cpe_key])[at])
        per_req = [padded[j, : len(k)] for j, k in enumerate(keys)]
    for j, i in enumerate(live):
        req = requests[i]
        out[i] = ScoreResult(model_version=b.version, user_id=req.user_id, user_encoded=users[j].row is None,
                             item_ids=[c[0] for c in req.candidates], scores=per_req[j].tolist(),
                             encoded=(keys[j] < 0).tolist())
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
    """Rank the whole catalog for every request with one chunked ``score`` over the catalog, once
    per distinct user of the batch."""
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
        upe, user_at = _user_matrix(b, users, stats)  # (Ud, M, D), (U,)
        scores = catalog_scores(upe, store.cpe, store.cpe_key)  # (Ud, I)
        for j, i in enumerate(live):
            req, row = requests[i], scores[user_at[j]]  # (I,) this request's user
            excl = [r for r in (store.item_index.get(x) for x in req.exclude) if r is not None]
            if req.exclude_history:
                excl.extend(users[j].history_rows)
            best = top_k(row, req.k, np.unique(np.asarray(excl, dtype=np.int64)))
            out[i] = RecommendResult(model_version=b.version, user_id=req.user_id, user_encoded=users[j].row is None,
                                     item_ids=[store.item_ids[r] for r in best], scores=row[best].tolist(),
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
