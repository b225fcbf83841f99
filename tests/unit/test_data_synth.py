"""The synthetic MIND-format set: deterministic, parseable, and clicks follow interests (no Ray)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from embsum.data import synth
from embsum.data.records import parse_behaviors
from embsum.data.sources import EXPLODED_SCHEMA, explode_file


def test_deterministic_by_seed(tmp_path):
    a = synth.generate(tmp_path / "a", users=30, items=60, impressions=80, seed=3)
    b = synth.generate(tmp_path / "b", users=30, items=60, impressions=80, seed=3)
    c = synth.generate(tmp_path / "c", users=30, items=60, impressions=80, seed=4)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert len(a[0].read_text().splitlines()) == 80 and len(a[1].read_text().splitlines()) == 60


def test_ensure_reuses_matching_sets_only(tmp_path):
    beh, _ = synth.ensure(tmp_path, users=10, items=20, impressions=15, seed=0)
    stamp = beh.stat().st_mtime_ns
    assert synth.ensure(tmp_path, users=10, items=20, impressions=15, seed=0)[0].stat().st_mtime_ns == stamp
    beh2, _ = synth.ensure(tmp_path, users=10, items=20, impressions=16, seed=0)
    assert len(beh2.read_text().splitlines()) == 16


def test_parses_cleanly_and_clicks_follow_interests(tmp_path):
    beh, news = synth.generate(tmp_path, users=200, items=300, impressions=1500, seed=0)
    category = {ln.split("\t")[0]: ln.split("\t")[1] for ln in news.read_text().splitlines()}
    s, n, r = explode_file(str(beh), beh.read_bytes(), "tsv", headed=False)
    recs = parse_behaviors(pa.table({"source": s, "line": pa.array(n, pa.int64()), "raw": pa.array(r, pa.binary())},
                                    schema=EXPLODED_SCHEMA), set(category))
    assert set(recs.column("reason").to_pylist()) == {""}
    hit = Counter()
    for hist, items, labels in zip(*(recs.column(c).to_pylist() for c in ("history", "items", "labels")), strict=True):
        assert 1 in labels and 0 in labels  # like MIND's training impressions
        liked = {category[h] for h in hist}
        for item, lab in zip(items, labels, strict=True):
            hit[(lab, category[item] in liked)] += 1
    click_rate_in = hit[(1, True)] / (hit[(1, True)] + hit[(0, True)])
    click_rate_out = hit[(1, False)] / (hit[(1, False)] + hit[(0, False)])
    assert click_rate_in > 3 * click_rate_out  # a learnable signal: history categories predict clicks
