"""The simple recommenders EmbSum must beat, scored on exactly the evaluation impressions it is scored on.

Generic: everything comes from the run config (columns, label rule, catalog fields) and the prepared
data (``valid/``, ``test/`` impressions and ``items.parquet``), never from dataset-specific code.

- random: seeded uniform scores;
- popularity: number of interactions of each item in the whole log, every label counted (a rating 0,
  a click, a low rating: each says the item was seen), held-out positives excluded;
- attribute + popularity: log(1 + popularity) + w x (history items sharing the candidate's value of a
  catalog field, e.g. ``book_author``), w chosen on the valid split;
- item-kNN: cosine similarity of item columns of the user x item interaction matrix (every label,
  held-out positives excluded), summed over the user's history items;
- text: TF-IDF of each candidate's text against the mean TF-IDF vector of the history's texts.

The interaction log is read with pandas straight from ``data.interactions`` (logs format) using the
configured columns; MIND behaviors count clicks and history-column items.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embsum.config import Config

WEIGHTS = (0.5, 1.0, 2.0, 3.0, 5.0)  # attribute-match weights tried on valid


@dataclass(frozen=True)
class Impression:
    impression_id: str
    user_id: str
    history: list[str]
    candidates: list[str]
    labels: list[int]


def read_impressions(data_dir: Path, split: str) -> list[Impression]:
    import pyarrow.dataset as pads

    t = pads.dataset(str(data_dir / split), format="parquet").to_table(
        columns=["impression_id", "user_id", "history", "candidate_item_ids", "labels"])
    cols = [t.column(c).to_pylist() for c in ("impression_id", "user_id", "history", "candidate_item_ids", "labels")]
    return [Impression(*row) for row in zip(*cols, strict=True)]


def read_interactions(cfg: Config) -> list[tuple[str, str]]:
    """(user, item) for every logged interaction, any label (MIND: clicks and history items)."""
    import pandas as pd

    d = cfg.data
    paths = sorted(Path().glob(d.interactions)) if any(ch in d.interactions for ch in "*?[") else [Path(d.interactions)]
    if d.format != "logs":
        pairs: list[tuple[str, str]] = []
        for p in paths:
            df = pd.read_csv(p, sep="\t", header=None, dtype=str, keep_default_na=False,
                             names=["impression_id", "user_id", "time", "history", "impressions"])
            for u, hist, imps in zip(df.user_id, df.history, df.impressions, strict=True):
                pairs += [(u, i) for i in hist.split()]
                pairs += [(u, x.rsplit("-", 1)[0]) for x in imps.split() if x.endswith("-1")]
        return pairs
    frames = []
    for p in paths:
        fmt = d.interactions_format if d.interactions_format != "auto" else p.suffix.lstrip(".")
        cols = [d.user_col, d.item_col]
        if fmt in ("tsv", "csv"):
            df = pd.read_csv(p, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False, usecols=cols)
        elif fmt == "jsonl":
            df = pd.read_json(p, lines=True, dtype=False)[cols].astype(str)
        else:
            df = pd.read_parquet(p, columns=cols).astype(str)
        frames.append(df)
    df = pd.concat(frames)
    return list(zip(df[d.user_col], df[d.item_col], strict=True))


def _held_out(imps: Sequence[Impression]) -> set[tuple[str, str]]:
    return {(im.user_id, c) for im in imps for c, y in zip(im.candidates, im.labels, strict=True) if y}


class Baselines:
    """Fits every baseline once on the log (held-out positives of ``exclude`` removed), then scores
    impressions."""

    def __init__(self, cfg: Config, items_path: Path, exclude: Sequence[Impression], attribute: str | None = None,
                 seed: int = 0) -> None:
        import pyarrow.parquet as pq
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfVectorizer

        cat = pq.read_table(items_path)
        self.items = [str(x) for x in cat.column("item_id").to_pylist()]
        self.index = {item: k for k, item in enumerate(self.items)}
        held = _held_out(exclude)
        pairs = {(u, i) for u, i in read_interactions(cfg) if i in self.index and (u, i) not in held}
        self.pop = Counter(i for _, i in pairs)
        users = {u: k for k, u in enumerate(sorted({u for u, _ in pairs}))}
        rows = np.fromiter((users[u] for u, _ in pairs), np.int64, len(pairs))
        cols = np.fromiter((self.index[i] for _, i in pairs), np.int64, len(pairs))
        x = sp.csr_matrix((np.ones(len(pairs), np.float32), (rows, cols)), shape=(len(users), len(self.items)))
        co = (x.T @ x).tocsr()  # (I, I) co-occurrence counts
        norm = np.sqrt(co.diagonal()).astype(np.float64) + 1e-9
        self.sim = sp.diags(1 / norm) @ co @ sp.diags(1 / norm)  # cosine
        self.sim.setdiag(0)
        self.sim = self.sim.tocsr()
        self.attribute = attribute if attribute and attribute in cat.column_names else None
        self.attr = [str(v) for v in cat.column(self.attribute).to_pylist()] if self.attribute else None
        texts = [str(t) for t in cat.column("text").to_pylist()]
        self.tfidf = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)  # (I, V) l2-normalized rows
        self.seed = seed
        self.weight = 3.0

    def _pos(self, ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.index[i] for i in ids if i in self.index), np.int64)

    def popularity(self, im: Impression) -> np.ndarray:
        return np.array([self.pop.get(c, 0) for c in im.candidates], np.float64)

    def attribute_match(self, im: Impression, weight: float | None = None) -> np.ndarray:
        w = self.weight if weight is None else weight
        base = np.log1p(self.popularity(im))
        if self.attr is None:
            return base
        hist = Counter(self.attr[k] for k in self._pos(im.history))
        return base + w * np.array([hist.get(self.attr[self.index[c]], 0) for c in im.candidates], np.float64)

    def item_knn(self, im: Impression) -> np.ndarray:
        h = self._pos(im.history)
        c = self._pos(im.candidates)
        return np.asarray(self.sim[c][:, h].sum(1)).ravel() if len(h) else np.zeros(len(c))

    def text(self, im: Impression) -> np.ndarray:
        h = self._pos(im.history)
        c = self._pos(im.candidates)
        if not len(h):
            return np.zeros(len(c))
        profile = np.asarray(self.tfidf[h].mean(0))  # (1, V)
        return np.asarray(self.tfidf[c] @ profile.T).ravel()

    def tune(self, valid: Sequence[Impression]) -> float:
        """The attribute weight with the best mean valid AUC (ties: the smaller weight)."""
        from embsum.metrics import impression_metrics

        def mean_auc(w: float) -> float:
            ms = [impression_metrics(im.labels, self.attribute_match(im, w)) for im in valid]
            return float(np.mean([m["auc"] for m in ms if m]))

        if self.attr is not None and valid:
            self.weight = max(WEIGHTS, key=lambda w: (mean_auc(w), -w))
        return self.weight

    def scores(self, imps: Sequence[Impression]) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {  # random: seeded per impression id, so the order read does not matter
            "random": [np.random.default_rng([self.seed, zlib.crc32(im.impression_id.encode())])
                       .random(len(im.candidates)) for im in imps],
            "popularity": [self.popularity(im) for im in imps],
        }
        if self.attr is not None:
            out[f"{self.attribute} + popularity"] = [self.attribute_match(im) for im in imps]
        out["item-kNN"] = [self.item_knn(im) for im in imps]
        out["text (TF-IDF)"] = [self.text(im) for im in imps]
        return out
