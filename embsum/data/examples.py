"""Per user: training examples (1 positive + K negatives), evaluation impressions, the user row.

Everything here works on one user's records at a time and is a pure function of them, the
config and the catalog, so it gives the same rows on one worker or forty, in Ray or in pandas.

Splits are by user (``timeline.split_of``): train users give ``train`` examples; valid users give
``valid_examples`` (the same format, for the trainer's in-loop AUC) and ``valid`` impressions;
test users give ``test`` impressions only. Every user gets a ``users`` row (full history).

Negatives. With impressions (MIND, or logs with ``impression_col``) a positive's negatives are
its impression's non-clicks, less anything the user clicked anywhere (sampled with replacement
when there are fewer than K; an impression without any falls back to the catalog). Otherwise they
come from the catalog, excluding every item the user engaged with: positives, ignored labels
(Book-Crossing's implicit 0: the user had the book) and, without impressions, explicit negatives.
The positive comes first. Sampling uses a generator seeded by (seed, user_id): reruns are
identical and independent of how users land in blocks.

Evaluation. MIND impressions are kept whole (the candidates that have text, in their order),
if at least one is clicked and one is not (else AUC is undefined). Logs are evaluated by held-out
positives: the user's last ``eval_positives`` positives in event order, each one impression
against ``eval_negatives`` catalog items the user never engaged with, shuffled. In time (or
declared file) order each held-out positive's history is what came before it; in random order
(no timestamps, ``timeline.random_order``) "last" is a seeded random choice and every held-out
positive shares one history: the user's other positives. A valid user's ``valid_examples`` (the
trainer's in-loop AUC) are then those held-out positives with K negatives, so in-loop and offline
validation measure the same thing. At least ``min_history`` positives stay in the history.
Examples and impressions whose history is shorter than ``min_history`` are skipped; each skip is
counted in the stats row every batch emits (kind 'stats').

Histories. Examples and impressions carry the leakage-free history as of their event, cut to
the most recent H = G * P items (what ``session_ids`` encodes; valid/test keep it as ``history``).
The ``users`` row carries the user's full history, every split's events included: it is what
precompute and serving know about the user, not an evaluation input.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa

from embsum.config import Config
from embsum.data.catalog import CatalogIndex
from embsum.data.records import gc_paused
from embsum.data.timeline import (
    IGNORED,
    NEGATIVE,
    Event,
    Row,
    build_events,
    full_history,
    histories,
    random_order,
    split_of,
    stable_hash64,
)

KINDS = ("train", "valid_examples", "valid", "test", "users")
PLAN_SCHEMA = pa.schema([
    ("kind", pa.string()), ("example_id", pa.string()), ("user_id", pa.string()), ("impression_id", pa.string()),
    ("split", pa.string()), ("history", pa.list_(pa.string())), ("candidates", pa.list_(pa.string())),
    ("labels", pa.list_(pa.int8())), ("stats", pa.string()),
])
# (kind, example_id, user_id, impression_id, split, history, candidates, labels, stats)
PlanRow = tuple[str, str, str, str, str, list[str], list[str], list[int], str]
Impression = tuple[str, list[str], list[str], list[int]]  # (impression_id, history, candidates, labels)
PLAN_INPUT_COLUMNS = ["user_id", "impression_id", "ts", "source", "line", "history", "items", "labels"]


@dataclass(frozen=True)
class PlanSpec:
    """The config fields that shape examples, resolved for one input format."""

    seed: int
    negatives: int
    eval_negatives: int
    valid_fraction: float
    test_fraction: float
    min_history: int
    max_examples_per_user: int
    history_len: int  # H = G * P
    from_log: bool  # histories include earlier positives from the log
    impressions: bool  # negatives from impressions; MIND-style whole-impression evaluation
    whole_impressions: bool  # evaluate impressions whole (MIND) rather than leave-last-out
    timestamps: bool
    random_order: bool = False  # no timestamps and no declared file order: events in a seeded random order
    eval_positives: int = 1  # held-out positives per evaluation user (logs)
    targets: int = 1  # positives per training example sharing one history
    views: int = 1  # random order: times each train user's positives are regrouped with fresh histories

    @classmethod
    def from_config(cls, cfg: Config, mind: bool) -> PlanSpec:
        d, m = cfg.data, cfg.model
        order = d.event_order
        timestamps = mind or (bool(d.timestamp_col) and order in ("auto", "timestamp"))
        return cls(seed=d.seed, negatives=d.negatives, eval_negatives=d.eval_negatives,
                   valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, min_history=d.min_history,
                   max_examples_per_user=d.max_examples_per_user,
                   history_len=m.num_sessions * m.items_per_session,
                   from_log=(not mind) or d.history_source == "log", impressions=mind or bool(d.impression_col),
                   whole_impressions=mind, timestamps=timestamps,
                   random_order=not timestamps and order in ("auto", "random"), eval_positives=d.eval_positives,
                   targets=d.targets_per_example, views=d.views_per_user)


def sample_excluding(rng: random.Random, n: int, excluded: set[int], k: int, *,
                     allow_fewer: bool = False) -> list[int] | None:
    """k positions in range(n) outside ``excluded``: distinct when there are enough, else with
    replacement (or, with ``allow_fewer``, all there are). None when nothing is left."""
    avail = n - len(excluded)
    if avail <= 0 or k <= 0:
        return None
    distinct = allow_fewer or avail >= k
    k = min(k, avail) if allow_fewer else k
    out: list[int] = []
    chosen: set[int] = set()
    for _ in range(8 * k + 16):  # rejection sampling: cheap while the user's items are a small share
        x = rng.randrange(n)
        if x in excluded or (distinct and x in chosen):
            continue
        out.append(x)
        chosen.add(x)
        if len(out) == k:
            return out
    allowed = [x for x in range(n) if x not in excluded and not (distinct and x in chosen)]
    rest = rng.sample(allowed, k - len(out)) if distinct else rng.choices(allowed, k=k - len(out))
    return out + rest


def plan_user(user_id: str, rows: Sequence[Row], spec: PlanSpec, index: CatalogIndex,
              stats: Counter) -> list[PlanRow]:
    """One user's records (sorted; see ``timeline.Row``) -> plan rows."""
    split = split_of(user_id, spec.seed, spec.valid_fraction, spec.test_fraction)
    group = spec.impressions and not spec.whole_impressions  # logs with an impression column
    events = build_events(rows, spec.timestamps, group,
                          random_order(spec.seed, user_id) if spec.random_order else None)
    # Python's generator, not numpy's: draws of 1-50 items cost ~1 us here and ~10 us in numpy.
    rng = random.Random(stable_hash64("negatives", spec.seed, user_id))
    positives = {p for ev in events for p in ev.positives} | {h for ev in events for h in ev.column_history}
    own = set(positives)
    for ev in events:
        own.update(i for i, lab in zip(ev.items, ev.labels, strict=True)
                   if lab == IGNORED or (lab == NEGATIVE and not spec.impressions))
    own_pos = {index.position[i] for i in own if i in index.position}
    out: list[PlanRow] = []
    out.append(("users", "", user_id, "", split, full_history(events), [], [], ""))
    stats[f"users.{split}"] += 1
    if not events:
        return out
    hists = histories(events, spec.from_log, spec.history_len, all_events=spec.whole_impressions)
    held_out_valid = split == "valid" and spec.random_order and not spec.whole_impressions
    if split == "train" or (split == "valid" and not held_out_valid):
        out += _examples(user_id, split, events, hists, spec, index, rng, positives, own_pos, stats)
    if split in ("valid", "test"):
        evals = _whole(user_id, events, hists, spec, stats) if spec.whole_impressions else \
            _held_out(user_id, events, hists, spec, index, rng, own_pos, stats)
        out += [(split, "", user_id, imp, split, hist, cands, labels, "") for imp, hist, cands, labels in evals]
        stats[f"eval.{split}"] += len(evals)
        if held_out_valid:
            out += _held_out_examples(user_id, evals, spec, index, rng, own_pos, stats)
    return out


def _train_groups(events: list[Event], hists: list[list[str]], spec: PlanSpec, rng: random.Random, targets: int,
                  stats: Counter) -> list[tuple[list[tuple[int, Event, str]], list[str]]]:
    """The user's positives as groups of up to ``targets`` (ordinal, event, item), each with the one
    history its targets share. Time/file order: consecutive positives, and the history of the
    first (what came strictly before all of them). Random order: consecutive in that order, and a
    random subset of the user's other positives (uniform size), so histories of every length occur
    as they do for new users."""
    flat = [(k, ev, p) for k, (ev, p) in enumerate(((ev, p) for ev in events for p in ev.positives), start=1)]

    def chunked(seq: list[tuple[int, Event, str]]) -> list[list[tuple[int, Event, str]]]:
        return [seq[i:i + targets] for i in range(0, len(seq), targets)]

    chunks = chunked(flat)
    out = []
    if spec.random_order:
        positives = list(dict.fromkeys(p for _, _, p in flat))
        cap = max(1, spec.max_examples_per_user // spec.views)  # the cap is shared by the views
        for view in range(spec.views):  # each view: the positives regrouped, fresh histories
            if view:
                order = [(k + view * len(flat), ev, p) for k, ev, p in flat]  # ordinals unique across views
                rng.shuffle(order)
                chunks = chunked(order)
            if len(chunks) > cap:
                stats["skipped.over max_examples_per_user"] += sum(len(c) for c in chunks[:-cap])
            for chunk in chunks[-cap:]:
                mine = {p for _, _, p in chunk}
                others = [p for p in positives if p not in mine]
                size = rng.randint(min(len(others), max(1, spec.min_history)), len(others)) if others else 0
                out.append((chunk, rng.sample(others, size)[: spec.history_len]))
    else:
        first = {id(ev): h for ev, h in zip(events, hists, strict=True)}
        out = [(chunk, first[id(chunk[0][1])]) for chunk in chunks]
    kept = [(c, h) for c, h in out if len(h) >= spec.min_history]
    stats["skipped.short history"] += sum(len(c) for c, h in out if len(h) < spec.min_history)
    return kept


def _examples(user_id: str, split: str, events: list[Event], hists: list[list[str]], spec: PlanSpec,
              index: CatalogIndex, rng: random.Random, positives: set[str], own_pos: set[int],
              stats: Counter) -> list[PlanRow]:
    """Training (or, time order, in-loop validation) examples: per group of targets sharing a
    history, each target followed by its K negatives; a group short of ``targets`` repeats its
    first block with labels -1 (ignored by the loss), so every row has T * (1 + K) candidates.
    ``max_examples_per_user`` counts every view's examples."""
    kind = "train" if split == "train" else "valid_examples"
    targets = spec.targets if kind == "train" else 1
    groups = _train_groups(events, hists, spec, rng, targets, stats)
    if len(groups) > spec.max_examples_per_user:  # the most recent ones are kept
        stats["skipped.over max_examples_per_user"] += sum(len(c) for c, _ in groups[:-spec.max_examples_per_user])
        groups = groups[-spec.max_examples_per_user:]
    out = []
    pools: dict[int, list[str]] = {}  # per event: its non-clicks the user never clicked anywhere
    for chunk, hist in groups:
        cands: list[str] = []
        labels: list[int] = []
        for _, ev, p in chunk:
            negs = _negatives(ev, spec, index, rng, positives, own_pos, pools)
            if negs is None:
                stats["skipped.no negatives"] += 1
                continue
            cands += [p, *negs]
            labels += [1] + [0] * len(negs)
        if not cands:
            continue
        block = cands[: 1 + spec.negatives]
        while len(cands) < targets * (1 + spec.negatives):
            cands += block
            labels += [-1] * len(block)
        stats[f"targets.{kind}"] += labels.count(1)
        ordinal, ev, _ = chunk[0]
        out.append((kind, f"{user_id}:{ordinal}", user_id, ev.impression_id, split, list(hist), cands, labels, ""))
    stats[f"examples.{kind}"] += len(out)
    return out


def _negatives(ev: Event, spec: PlanSpec, index: CatalogIndex, rng: random.Random, positives: set[str],
               own_pos: set[int], pools: dict[int, list[str]]) -> list[str] | None:
    """K negatives for a positive of ``ev``: its impression's non-clicks when there are any, else
    catalog items the user never engaged with. None when the catalog has nothing left."""
    if spec.impressions:
        pool = pools.get(id(ev))
        if pool is None:
            pool = pools[id(ev)] = list(dict.fromkeys(i for i, lab in zip(ev.items, ev.labels, strict=True)
                                                      if lab == NEGATIVE and i not in positives))
        if pool:
            k = spec.negatives
            return rng.sample(pool, k) if len(pool) >= k else rng.choices(pool, k=k)
    sampled = sample_excluding(rng, len(index), own_pos, spec.negatives)  # positives are in own_pos
    return None if sampled is None else [index.ids[k] for k in sampled]


def _whole(user_id: str, events: list[Event], hists: list[list[str]], spec: PlanSpec,
           stats: Counter) -> list[Impression]:
    out = []
    for ev, hist in zip(events, hists, strict=True):
        if not ev.items:
            continue  # a row whose candidates all lack text still fed the history
        n_pos = sum(1 for lab in ev.labels if lab == 1)
        if n_pos == 0 or n_pos == len(ev.labels):
            stats["eval_skipped.without both labels"] += 1
        elif len(hist) < spec.min_history:
            stats["eval_skipped.short history"] += 1
        else:
            out.append((ev.impression_id, hist, list(ev.items), list(ev.labels)))
    return out


def _held_out(user_id: str, events: list[Event], hists: list[list[str]], spec: PlanSpec,
              index: CatalogIndex, rng: random.Random, own_pos: set[int], stats: Counter) -> list[Impression]:
    """The user's last ``eval_positives`` positives (in event order), each vs ``eval_negatives``
    unseen catalog items, shuffled. Random order: all share the history before the first of them
    (the user's other positives); time/file order: each has its own. At least ``min_history``
    positives stay out of the held-out set."""
    order = [(k, p) for k, ev in enumerate(events) for p in ev.positives]
    if not order:
        stats["eval_skipped.no positive"] += 1
        return []
    k = min(spec.eval_positives, len(order) - spec.min_history)
    if k < 1:
        stats["eval_skipped.short history"] += 1
        return []
    held = order[-k:]
    shared = hists[held[0][0]] if spec.random_order else None
    out: list[Impression] = []
    for ordinal, (ev_k, target) in enumerate(held):
        hist = shared if shared is not None else hists[ev_k]
        if len(hist) < spec.min_history:
            stats["eval_skipped.short history"] += 1
            continue
        sampled = sample_excluding(rng, len(index), own_pos, spec.eval_negatives, allow_fewer=True)
        if sampled is None:
            stats["eval_skipped.no negatives"] += 1
            continue
        cands = [target, *(index.ids[j] for j in sampled)]
        labels = [1] + [0] * len(sampled)
        perm = list(range(len(cands)))
        rng.shuffle(perm)  # a constant scorer must not get credit for position
        imp_id = f"{user_id}:last" if k == 1 else f"{user_id}:held{ordinal}"
        out.append((imp_id, list(hist), [cands[j] for j in perm], [labels[j] for j in perm]))
    return out


def _held_out_examples(user_id: str, evals: list[Impression], spec: PlanSpec, index: CatalogIndex,
                       rng: random.Random, own_pos: set[int], stats: Counter) -> list[PlanRow]:
    """A valid user's in-loop examples: each held-out positive with its history and K negatives."""
    out: list[PlanRow] = []
    for imp, hist, cands, labels in evals:
        target = cands[labels.index(1)]
        sampled = sample_excluding(rng, len(index), own_pos, spec.negatives)
        if sampled is None:
            stats["skipped.no negatives"] += 1
            continue
        out.append(("valid_examples", imp, user_id, "", "valid", hist, [target, *(index.ids[j] for j in sampled)],
                    [1] + [0] * spec.negatives, ""))
    stats["examples.valid_examples"] += len(out)
    return out


def lists(column: pa.ChunkedArray | pa.Array) -> list[list]:
    """A list column -> Python lists; flattening first is several times faster than to_pylist()."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.offset or arr.null_count:  # a sliced or nullable array: take the slow, always-right road
        return [x or [] for x in arr.to_pylist()]
    flat = arr.flatten().to_pylist()
    off = arr.offsets.to_numpy()
    off = (off - off[0]).tolist()
    return [flat[a:b] for a, b in zip(off, off[1:], strict=False)]


def _column(values: list, typ: pa.DataType) -> pa.Array:
    """Python values -> an Arrow column; list columns via one flat array and offsets (converting
    nested lists directly is several times slower)."""
    if not pa.types.is_list(typ):
        return pa.array(values, typ)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = pa.array(list(chain.from_iterable(values)), typ.value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat, type=typ)


@gc_paused()
def plan_batch(records: pa.Table, spec: PlanSpec, index: CatalogIndex) -> pa.Table:
    """Good records of whole users (all of a user's rows in this batch) -> plan rows + 1 stats row."""
    keys = [("user_id", "ascending")] + ([("ts", "ascending")] if spec.timestamps else []) + \
        [("source", "ascending"), ("line", "ascending")]
    table = records.select(PLAN_INPUT_COLUMNS).sort_by(keys)
    users = table.column("user_id").to_pylist()
    rows: list[Row] = list(zip(table.column("ts").to_pylist(), table.column("impression_id").to_pylist(),
                               *(lists(table.column(c)) for c in ("history", "items", "labels")), strict=True))
    stats: Counter = Counter()
    out: list[PlanRow] = []
    start = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or users[k] != users[start]:
            out += plan_user(users[start], rows[start:k], spec, index, stats)
            start = k
    out.append(("stats", "", "", "", "", [], [], [], json.dumps(dict(stats), sort_keys=True)))
    columns = zip(*out, strict=True)  # rows -> columns
    return pa.table([_column(list(c), f.type) for c, f in zip(columns, PLAN_SCHEMA, strict=True)], schema=PLAN_SCHEMA)
