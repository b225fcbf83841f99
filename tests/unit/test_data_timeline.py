"""Histories: only what happened strictly before, never the target; stable user splits (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from embsum.data.timeline import Event, build_events, dedupe_keep_last, full_history, histories, split_of

ITEMS = [f"i{k}" for k in range(12)]
event_st = st.tuples(st.integers(0, 6), st.lists(st.sampled_from(ITEMS), min_size=1, max_size=4),
                     st.lists(st.sampled_from([0, 1, -1]), min_size=4, max_size=4),
                     st.lists(st.sampled_from(ITEMS), max_size=3))


def _events(spec: list[tuple[int, list[str], list[int], list[str]]], column: bool) -> list[Event]:
    rows = [(float(t), f"m{k}", hist if column else [], items, labels[: len(items)])
            for k, (t, items, labels, hist) in enumerate(sorted(spec, key=lambda s: s[0]))]
    return build_events(rows, timestamps=True, group_impressions=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=12), st.integers(1, 6), st.booleans())
def test_history_holds_only_strictly_earlier_positives_never_the_target(spec, keep, column):
    events = _events(spec, column)
    hists = histories(events, from_log=True, keep=keep)
    for ev, hist in zip(events, hists, strict=True):
        earlier = {p for e in events if e.key < ev.key for p in e.positives}
        allowed = earlier | set(ev.column_history)
        assert set(hist) <= allowed, "history holds an item not engaged before the event"
        assert not set(hist) & set(ev.positives), "history holds the event's own positive (the target)"
        assert len(hist) == len(set(hist)) <= keep
        # the most recent ones: no earlier positive newer than the history's oldest log item is missing
        if not column and len(hist) < keep:
            assert set(hist) == earlier - set(ev.positives)


@settings(max_examples=100, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=12))
def test_same_instant_events_never_see_each_other(spec):
    events = _events(spec, column=False)
    for ev, hist in zip(events, histories(events, from_log=True, keep=50), strict=True):
        later_or_same = {p for e in events if e.key >= ev.key for p in e.positives}
        only_later = later_or_same - {p for e in events if e.key < ev.key for p in e.positives}
        assert not set(hist) & only_later


def test_file_order_without_timestamps_and_impression_grouping():
    rows = [(None, "m1", [], ["a"], [1]), (None, "m2", [], ["b"], [1]), (None, "m1", [], ["c"], [0]),
            (None, "m3", [], ["c"], [1])]
    ev = build_events(rows, timestamps=False, group_impressions=True)
    assert [(e.impression_id, e.items, e.positives) for e in ev] == [("m1", ["a", "c"], ["a"]), ("m2", ["b"], ["b"]),
                                                                     ("m3", ["c"], ["c"])]
    assert histories(ev, from_log=True, keep=5) == [[], ["a"], ["a", "b"]]
    flat = build_events(rows, timestamps=False, group_impressions=False)
    assert len(flat) == 4 and [e.key for e in flat] == [0.0, 1.0, 2.0, 3.0]


def test_column_history_first_target_removed_dedupe_keep_last():
    rows = [(1.0, "m1", ["x", "a", "y", "x"], ["a", "b"], [1, 0]), (2.0, "m2", ["x", "a", "y", "x"], ["z"], [1])]
    ev = build_events(rows, timestamps=True, group_impressions=False)
    assert histories(ev, from_log=False, keep=10) == [["y", "x"], ["a", "y", "x"]]  # a was m1's target
    assert histories(ev, from_log=True, keep=10) == [["y", "x"], ["y", "x", "a"]]  # a re-engaged in m1: moves last
    assert histories(ev, from_log=True, keep=2) == [["y", "x"], ["x", "a"]]
    assert full_history(ev) == ["y", "x", "a", "z"]
    assert dedupe_keep_last(["a", "b", "a", "c", "b"]) == ["a", "c", "b"]


def test_split_is_stable_across_processes_and_follows_fractions():
    users = [f"U{k}" for k in range(4000)]
    here = [split_of(u, 7, 0.1, 0.2) for u in users[:50]]
    code = ("import sys; from embsum.data.timeline import split_of; "
            "print(','.join(split_of(f'U{k}', 7, 0.1, 0.2) for k in range(50)))")
    for seed in ("1", "2"):  # Python's hash() would differ between these processes
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip()
        assert out.split(",") == here
    counts = Counter(split_of(u, 7, 0.1, 0.2) for u in users)
    assert abs(counts["valid"] / 4000 - 0.1) < 0.02 and abs(counts["test"] / 4000 - 0.2) < 0.025
    assert [split_of(u, 8, 0.1, 0.2) for u in users[:50]] != here  # the seed matters
