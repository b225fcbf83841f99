"""Examples: 1 positive + K negatives that are never the user's own items; seeded and independent
of how users are batched; whole MIND impressions; leave-last-out for logs (no Ray)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from embsum.data.catalog import CatalogIndex
from embsum.data.examples import PLAN_INPUT_COLUMNS, PlanSpec, plan_batch, sample_excluding
from embsum.data.records import RECORD_SCHEMA

N_ITEMS = 40
INDEX = CatalogIndex(ids=[f"i{k}" for k in range(N_ITEMS)], position={f"i{k}": k for k in range(N_ITEMS)},
                     tokens=[[5 + k] for k in range(N_ITEMS)], content=np.zeros((N_ITEMS, 4), np.int32),
                     assembler=None)  # type: ignore[arg-type]  # planning never assembles ids


def _spec(**kw) -> PlanSpec:
    base = dict(seed=0, negatives=4, eval_negatives=10, valid_fraction=0.0, test_fraction=0.0, min_history=1,
                max_examples_per_user=1000, history_len=6, from_log=True, impressions=False,
                whole_impressions=False, timestamps=False)
    return PlanSpec(**{**base, **kw})


def _records(rows: list[tuple]) -> pa.Table:
    """rows: (user, impression, ts, history, items, labels); file order = list order."""
    cols = {"user_id": [r[0] for r in rows], "impression_id": [r[1] for r in rows], "ts": [r[2] for r in rows],
            "source": ["f"] * len(rows), "line": list(range(1, len(rows) + 1)), "history": [r[3] for r in rows],
            "items": [r[4] for r in rows], "labels": [r[5] for r in rows]}
    return pa.table({c: pa.array(cols[c], RECORD_SCHEMA.field(c).type) for c in PLAN_INPUT_COLUMNS})


def _kind(plan: pa.Table, kind: str) -> list[dict]:
    return plan.filter(pc.equal(plan.column("kind"), kind)).to_pylist()


log_rows = st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3"]), st.integers(0, N_ITEMS - 1),
                              st.sampled_from([1, 1, 0, -1])), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(log_rows, st.integers(0, 3))
def test_catalog_negatives_never_the_positive_or_own_items(rows, seed):
    recs = _records([(u, "", None, [], [f"i{i}"], [lab]) for u, i, lab in rows])
    plan = plan_batch(recs, _spec(seed=seed, valid_fraction=0.3, test_fraction=0.3), INDEX)
    own = {u: {f"i{i}" for uu, i, _ in rows if uu == u} for u, _, _ in rows}
    for ex in _kind(plan, "train") + _kind(plan, "valid_examples"):
        pos, negs = ex["candidates"][0], ex["candidates"][1:]
        assert ex["labels"] == [1, 0, 0, 0, 0] and len(negs) == 4
        assert pos in own[ex["user_id"]] and not set(negs) & own[ex["user_id"]]
        assert pos not in ex["history"]
    for ev in _kind(plan, "valid") + _kind(plan, "test"):
        assert sum(ev["labels"]) == 1 and len(set(ev["candidates"])) == len(ev["candidates"])
        negs = [c for c, lab in zip(ev["candidates"], ev["labels"], strict=True) if lab == 0]
        assert not set(negs) & own[ev["user_id"]]
    assert plan_batch(recs, _spec(seed=seed, valid_fraction=0.3, test_fraction=0.3), INDEX).equals(plan)  # seeded


def test_batching_does_not_change_the_rows():
    rows = [(f"u{k % 7}", "", None, [], [f"i{(k * 7) % N_ITEMS}"], [1 if k % 3 else 0]) for k in range(80)]
    spec = _spec(valid_fraction=0.3, test_fraction=0.2)
    whole = plan_batch(_records(rows), spec, INDEX)
    parts = [plan_batch(_records([r for r in rows if int(r[0][1]) % 2 == p]), spec, INDEX) for p in (0, 1)]

    def key(t: pa.Table) -> list:
        return sorted((r["kind"], r["example_id"], r["user_id"], tuple(r["candidates"]), tuple(r["history"]))
                      for r in t.to_pylist() if r["kind"] != "stats")

    assert key(whole) == key(pa.concat_tables(parts))
    assert key(plan_batch(_records(rows), _spec(seed=1, valid_fraction=0.3, test_fraction=0.2), INDEX)) != key(whole)


def test_mind_impression_negatives_whole_eval_and_history():
    spec = _spec(impressions=True, whole_impressions=True, timestamps=True, from_log=False)
    rows = [("u1", "m1", 1.0, ["i9", "i8"], ["i1", "i2", "i3", "i9"], [1, 0, 0, 0]),
            ("u1", "m2", 2.0, ["i9", "i8"], ["i4", "i5"], [1, 0]),
            ("u1", "m3", 3.0, ["i9", "i8"], ["i6", "i1"], [1, 0])]  # i1 was clicked in m1: never a negative
    plan = plan_batch(_records(rows), spec, INDEX)
    train = _kind(plan, "train")
    assert [e["candidates"][0] for e in train] == ["i1", "i4", "i6"]
    assert set(train[0]["candidates"][1:]) <= {"i2", "i3"}  # i9 is in the history: not a negative
    assert train[1]["candidates"][1:] == ["i5"] * 4  # too few non-clicks: with replacement
    assert set(train[2]["candidates"][1:]) - {"i9", "i8", "i1", "i4", "i6"} == set(train[2]["candidates"][1:])
    assert all(e["history"] == ["i9", "i8"] for e in train)  # history_source=column: no log clicks
    users = _kind(plan, "users")[0]
    assert users["history"] == ["i9", "i8", "i1", "i4", "i6"]
    test_plan = plan_batch(_records(rows), _spec(impressions=True, whole_impressions=True, timestamps=True,
                                                 from_log=True, test_fraction=1.0), INDEX)
    evals = _kind(test_plan, "test")
    assert [e["impression_id"] for e in evals] == ["m1", "m2", "m3"] and not _kind(test_plan, "train")
    assert evals[0]["candidates"] == ["i1", "i2", "i3", "i9"] and evals[0]["labels"] == [1, 0, 0, 0]
    assert evals[2]["history"] == ["i9", "i8", "i1", "i4"][-6:]  # from_log: earlier clicks follow the column


def test_leave_last_out_min_history_and_cap():
    rows = [("u1", "", None, [], [f"i{k}"], [1]) for k in range(8)] + [("u1", "", None, [], ["i30"], [-1])]
    plan = plan_batch(_records(rows), _spec(test_fraction=1.0, eval_negatives=100), INDEX)
    (ev,) = _kind(plan, "test")
    target = ev["candidates"][ev["labels"].index(1)]
    assert target == "i7" and ev["history"] == [f"i{k}" for k in range(1, 7)]  # last H=6 before the target
    assert len(ev["candidates"]) == N_ITEMS - 9 + 1  # fewer than asked: every unseen item, no repeats
    assert "i30" not in ev["candidates"]  # an ignored label still means "the user had it"
    capped = plan_batch(_records(rows), _spec(max_examples_per_user=3, min_history=2), INDEX)
    train = _kind(capped, "train")
    assert [e["candidates"][0] for e in train] == ["i5", "i6", "i7"]  # the most recent are kept
    stats = Counter(json.loads(capped.column("stats").to_pylist()[-1]))
    assert stats["skipped.short history"] == 2 and stats["skipped.over max_examples_per_user"] == 3


def test_sample_excluding_edge_cases():
    rng = random.Random(0)
    assert sample_excluding(rng, 5, {0, 1, 2, 3, 4}, 3) is None
    assert sorted(sample_excluding(rng, 5, {0, 1, 2}, 2)) == [3, 4]
    few = sample_excluding(rng, 5, {0, 1, 2, 3}, 3)
    assert few == [4, 4, 4]  # with replacement when the catalog has too few
    assert sorted(sample_excluding(rng, 5, {0, 1}, 10, allow_fewer=True)) == [2, 3, 4]
    big = sample_excluding(rng, 100, set(range(0, 100, 2)), 50)
    assert len(set(big)) == 50 and all(x % 2 for x in big)


def _plan_key(t: pa.Table) -> list:
    return sorted((r["kind"], r["example_id"], r["user_id"], r["impression_id"], tuple(r["candidates"]),
                   tuple(r["labels"]), tuple(r["history"])) for r in t.to_pylist() if r["kind"] != "stats")


def _reline(rows: list[tuple]) -> pa.Table:
    return _records(rows)  # line numbers follow list order: a permutation is a different file


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(30))), st.integers(0, 2))
def test_random_order_ignores_the_file_order_of_a_users_rows(perm, seed):
    # No timestamps and no declared order: shuffling each user's rows in the file changes nothing,
    # neither the held-out positives, nor any history, nor the negatives.
    rows = [(f"u{k % 3}", "", None, [], [f"i{(k * 11) % N_ITEMS}"], [1 if k % 5 else -1]) for k in range(30)]
    spec = _spec(seed=seed, random_order=True, eval_positives=3, valid_fraction=0.34, test_fraction=0.33)
    assert _plan_key(plan_batch(_reline(rows), spec, INDEX)) == \
        _plan_key(plan_batch(_reline([rows[k] for k in perm]), spec, INDEX))


def test_file_order_is_kept_when_declared_and_random_order_differs_from_it():
    rows = [("u1", "", None, [], [f"i{k}"], [1]) for k in range(12)]
    in_file = _kind(plan_batch(_records(rows), _spec(test_fraction=1.0), INDEX), "test")
    assert [c for c, y in zip(in_file[0]["candidates"], in_file[0]["labels"], strict=True) if y] == ["i11"]
    targets = set()
    for seed in range(6):
        (ev,) = _kind(plan_batch(_records(rows), _spec(seed=seed, test_fraction=1.0, random_order=True), INDEX), "test")
        targets.add(ev["candidates"][ev["labels"].index(1)])
    assert len(targets) > 1, "the held-out positive must be a seeded random choice, not the last row"


def test_held_out_positives_share_the_users_other_positives_as_history():
    pos = [f"i{k}" for k in range(9)]
    rows = [("u1", "", None, [], [i], [1]) for i in pos] + [("u1", "", None, [], ["i30"], [-1]),
                                                          ("u1", "", None, [], ["i31"], [0])]
    spec = _spec(random_order=True, eval_positives=4, history_len=20, test_fraction=1.0, eval_negatives=7)
    evals = _kind(plan_batch(_records(rows), spec, INDEX), "test")
    targets = [ev["candidates"][ev["labels"].index(1)] for ev in evals]
    assert len(evals) == 4 and len(set(targets)) == 4 and len({ev["impression_id"] for ev in evals}) == 4
    (hist,) = {tuple(ev["history"]) for ev in evals}  # one shared history
    assert sorted(hist + tuple(targets)) == sorted(pos)  # = every other positive, no held-out one
    for ev in evals:
        assert sum(ev["labels"]) == 1 and len(ev["candidates"]) == 8
        assert not {"i30", "i31", *pos} & {c for c, y in zip(ev["candidates"], ev["labels"], strict=True) if not y}
    # A user with 3 positives keeps min_history=2 of them in the history: one held out.
    few = _kind(plan_batch(_records(rows[:3]), _spec(random_order=True, eval_positives=4, min_history=2,
                                                     test_fraction=1.0), INDEX), "test")
    assert len(few) == 1 and len(few[0]["history"]) == 2


def test_valid_users_in_random_order_validate_on_their_held_out_positives():
    rows = [("u1", "", None, [], [f"i{k}"], [1]) for k in range(6)]
    spec = _spec(random_order=True, eval_positives=2, valid_fraction=1.0)
    plan = plan_batch(_records(rows), spec, INDEX)
    evals, examples = _kind(plan, "valid"), _kind(plan, "valid_examples")
    assert not _kind(plan, "train") and len(evals) == len(examples) == 2
    for ev, ex in zip(evals, examples, strict=True):
        assert ex["candidates"][0] == ev["candidates"][ev["labels"].index(1)] and ex["history"] == ev["history"]
        assert ex["labels"] == [1, 0, 0, 0, 0]


def test_grouped_targets_share_a_history_that_holds_none_of_them():
    pos = [f"i{k}" for k in range(11)]
    rows = [("u1", "", None, [], [i], [1]) for i in pos]
    for random_order in (True, False):
        spec = _spec(random_order=random_order, targets=3, history_len=20, negatives=2)
        train = _kind(plan_batch(_records(rows), spec, INDEX), "train")
        covered = []
        for ex in train:
            blocks = [ex["candidates"][k:k + 3] for k in range(0, len(ex["candidates"]), 3)]
            labels = [ex["labels"][k:k + 3] for k in range(0, len(ex["labels"]), 3)]
            assert len(blocks) == 3 and all(len(b) == 3 for b in blocks)
            targets = [b[0] for b, lab in zip(blocks, labels, strict=True) if lab == [1, 0, 0]]
            assert all(lab in ([1, 0, 0], [-1, -1, -1]) for lab in labels)
            assert targets and not set(targets) & set(ex["history"])  # no target in its own history
            assert not {c for b in blocks for c in b[1:]} & set(pos)  # negatives: never the user's items
            if not random_order:  # time order: the history is what came before the group
                first = min(int(x[1:]) for x in targets)
                assert set(ex["history"]) == {f"i{k}" for k in range(first)}
            covered += targets
        assert len(covered) == len(set(covered))
        # random order: every positive is a target once; file order loses the first group (no history)
        assert len(covered) == (11 if random_order else 8)


def test_views_regroup_every_positive_with_fresh_histories():
    pos = [f"i{k}" for k in range(9)]
    rows = [("u1", "", None, [], [i], [1]) for i in pos]
    spec = _spec(random_order=True, targets=3, views=3, history_len=20, negatives=1)
    train = _kind(plan_batch(_records(rows), spec, INDEX), "train")
    assert len(train) == 9 and len({ex["example_id"] for ex in train}) == 9  # 3 views x 3 groups, unique ids
    per_view = [train[v * 3:(v + 1) * 3] for v in range(3)]
    for view in per_view:  # each view has every positive as a target exactly once
        targets = [ex["candidates"][k] for ex in view for k in (0, 2, 4)]
        assert sorted(targets) == pos
    assert len({tuple(ex["history"]) for ex in train}) > 3  # histories differ across views
    capped = _kind(plan_batch(_records(rows), _spec(random_order=True, targets=3, views=3, negatives=1,
                                                    max_examples_per_user=6), INDEX), "train")
    assert len(capped) == 6  # 2 groups per view: the cap is shared by the views
