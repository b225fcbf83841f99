"""A user's engagements in order, and for each one the history that was known before it.

The leakage rule lives here, in one place: an event's history holds only positives from events
*strictly before* it. "Before" means an earlier timestamp when the data has timestamps (events at
the same instant, e.g. two clicks in one impression, never see each other); without timestamps it
means an earlier position in a seeded random order of the user's events (``data.event_order:
random``, the default: a file's row order is not time unless the user says so), or in file order
(files sorted by path, then line) when ``data.event_order: file`` declares the file chronological.
The random order is a function of (seed, user, event content) only, so permuting a user's rows in
the file changes nothing. An event's own positives are removed
from its history even when the input put them there (MIND's history column may list a re-click).

Histories are deduplicated: an item engaged again moves to its latest position, so the most
recent H items are H distinct items. A MIND row's history column (clicks before the logged
period) comes first; with ``history_source='log'`` (and always for generic logs) the user's
earlier positives in the log follow it.

The user split is a pure function of (seed, user_id) through blake2b, never Python's ``hash()``
(salted per process), so every worker, every rerun and the pandas baseline agree.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def stable_hash64(*parts: object) -> int:
    """A 64-bit hash of the parts' text that is the same in every process and on every run."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def split_of(user_id: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """'train' | 'valid' | 'test' for a user, by a stable hash of (seed, user_id)."""
    u = stable_hash64("split", seed, user_id) / 2.0**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


@dataclass
class Event:
    """One impression (MIND, or log rows sharing an impression id) or one log row.

    ``key`` orders events and defines "strictly before": a timestamp, or a file position.
    """

    key: float
    impression_id: str
    column_history: list[str]
    items: list[str]
    labels: list[int]
    positives: list[str] = field(default_factory=list)  # items labelled 1, in order


# (ts, impression_id, history column, items, labels): one record, as the plan stage reads it
Row = tuple[float | None, str, list[str] | None, list[str], list[int]]


def random_order(seed: int, user_id: str) -> Callable[[Event], float]:
    """An event's place in a seeded random order of the user's events: a hash of (seed, user,
    impression id, items) in [0, 1), independent of where the rows sat in the file."""
    def key(ev: Event) -> float:
        return stable_hash64("order", seed, user_id, ev.impression_id, *ev.items) / 2.0**64
    return key


def build_events(rows: Sequence[Row], timestamps: bool, group_impressions: bool,
                 order: Callable[[Event], float] | None = None) -> list[Event]:
    """A user's records, already sorted by (ts, source, line) or (source, line) -> events in order.

    ``group_impressions`` (logs with an impression column): rows sharing an impression id form one
    event at the position (time) of its first row. ``order`` (no timestamps): each event's key,
    e.g. ``random_order``; default: its file position.
    """
    events: list[Event] = []
    by_impression: dict[str, Event] = {}
    for pos, (ts, imp, hist, items, labels) in enumerate(rows):
        pos_items = [i for i, lab in zip(items, labels, strict=True) if lab == POSITIVE]
        if group_impressions and imp:
            ev = by_impression.get(imp)
            if ev is not None:
                ev.items.extend(items)
                ev.labels.extend(labels)
                ev.positives.extend(pos_items)
                continue
        key = float(ts) if timestamps and ts is not None else float(pos)
        ev = Event(key, imp or "", list(hist or []), list(items), list(labels), pos_items)
        if group_impressions and imp:
            by_impression[imp] = ev
        events.append(ev)
    if order is not None and not timestamps:
        for ev in events:
            ev.key = order(ev)
    events.sort(key=lambda e: e.key)  # stable: equal keys keep file order
    return events


def dedupe_keep_last(items: Iterable[str]) -> list[str]:
    """Distinct items, each at the position of its last occurrence. (The first occurrences of the
    reversed sequence, reversed back: dict.fromkeys runs in C, ~10x a Python loop.)"""
    seq = items if isinstance(items, list) else list(items)
    return list(dict.fromkeys(reversed(seq)))[::-1]


def histories(events: Sequence[Event], from_log: bool, keep: int, all_events: bool = True) -> list[list[str]]:
    """For each event: the most recent ``keep`` distinct items known strictly before it, minus the
    event's own positives, oldest first. ``all_events=False`` skips events without a positive
    (their history is [], and nobody asks for it)."""
    out: list[list[str]] = []
    running: OrderedDict[str, None] = OrderedDict()  # positives of events strictly before
    i = 0
    while i < len(events):
        j = i
        while j < len(events) and events[j].key == events[i].key:
            j += 1
        for ev in events[i:j]:
            if not (all_events or ev.positives):
                out.append([])
                continue
            own = set(ev.positives)
            logged = list(islice(reversed(running), keep + len(own)))[::-1] if from_log else []
            hist = dedupe_keep_last([*ev.column_history, *logged]) if ev.column_history else logged
            if own:
                hist = [x for x in hist if x not in own]
            out.append(hist[-keep:] if keep else [])
        for ev in events[i:j]:  # only now: same-instant events never see each other
            for item in ev.positives:
                if item in running:
                    running.move_to_end(item)
                else:
                    running[item] = None
        i = j
    return out


def full_history(events: Sequence[Event]) -> list[str]:
    """Everything the user is known to have engaged with, oldest first: what serving uses.
    The history columns (MIND; in event order), then every positive in order."""
    column = [h for ev in events for h in ev.column_history]
    return dedupe_keep_last([*column, *(p for ev in events for p in ev.positives)])
