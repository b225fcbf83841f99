"""The real MIND sample and Book-Crossing through the pure readers, configured by their run
configs alone; counts match the data READMEs. The data is read in place from ../shared/data
(never copied); each test skips with a clear message where it is absent. (No Ray.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from embsum.config import load_config
from embsum.data.catalog import build_catalog
from embsum.data.examples import PlanSpec, plan_batch
from embsum.data.records import (
    IGNORED,
    MIND_BEHAVIOR_COLUMNS,
    MIND_NEWS_COLUMNS,
    CatalogSpec,
    LogSpec,
    parse_behaviors,
    parse_catalog,
    parse_logs,
    preflight,
)
from embsum.data.sources import EXPLODED_SCHEMA, explode_file, resolve
from tests.conftest import REPO, TINY, shared_data


def _lines(path: Path, fmt: str, headed: bool) -> pa.Table:
    s, n, r = explode_file(str(path), path.read_bytes(), fmt, headed)
    return pa.table({"source": s, "line": pa.array(n, pa.int64()), "raw": pa.array(r, pa.binary())},
                    schema=EXPLODED_SCHEMA)


def _config(name: str, *overrides: str):
    shared_data()  # skip cleanly when ../shared/data is absent
    return load_config(REPO / "configs" / name, [f"model.{k}={v}" for k, v in TINY.items()] + list(overrides))


def _points_at_shared(cfg, field: str, *parts: str) -> None:
    """The run config names the file in ../shared/data, relative to the repository root."""
    assert getattr(cfg.data, field) == "../shared/data/" + "/".join(parts)


@pytest.fixture(scope="module")
def mind_catalog(tokenizer):
    cfg = _config("mind.yaml")
    news = shared_data("mind", "MINDsmall_train_sample", "news.tsv")
    preflight(resolve(str(news), "data.items"), "mind", (), "data.items", MIND_NEWS_COLUMNS)
    _points_at_shared(cfg, "items", "mind", "MINDsmall_train_sample", "news.tsv")
    return build_catalog(parse_catalog(_lines(news, "tsv", False), CatalogSpec.from_config(cfg.data, "mind"), {},
                                       tokenizer), tokenizer)


def test_mind_news_catalog(mind_catalog):
    assert len(mind_catalog.index) == 2000 and mind_catalog.quarantine.num_rows == 0
    cats = Counter(mind_catalog.items.column("category").to_pylist())
    assert len(cats) == 15 and cats["news"] == 603 and cats["sports"] == 597
    assert sum(1 for a in mind_catalog.items.column("abstract").to_pylist() if not a) == 99


def test_mind_raw_sample_counts(mind_catalog):
    path = shared_data("mind", "MINDsmall_train_sample", "behaviors.tsv")
    preflight(resolve(str(path), "x"), "mind", (), "data.interactions", MIND_BEHAVIOR_COLUMNS)
    recs = parse_behaviors(_lines(path, "tsv", False), mind_catalog.index.position)
    assert recs.num_rows == 5000
    assert int(pc.sum(recs.column("n_candidates")).as_py()) == 189_359
    assert int(pc.sum(recs.column("n_clicks")).as_py()) == 7_542
    reasons = Counter(recs.column("reason").to_pylist())
    assert set(reasons) <= {"", "item not in catalog"}  # well-formed; only catalog coverage drops rows
    good = recs.filter(pc.equal(recs.column("reason"), ""))
    kept = sum(len(x) for x in good.column("items").to_pylist())
    assert kept + int(pc.sum(recs.column("n_missing_candidates")).as_py()) == 189_359
    assert {i for x in good.column("items").to_pylist() for i in x} <= set(mind_catalog.index.ids)
    assert len({i for x in good.column("items").to_pylist() for i in x}) == 284  # README: 284 candidate ids


def test_mind_covered_counts_and_plan(mind_catalog):
    cfg = _config("mind.yaml")
    path = shared_data("mind", "derived", "behaviors_news_covered.tsv")
    recs = parse_behaviors(_lines(path, "tsv", False), mind_catalog.index.position)
    assert recs.num_rows == 119 and set(recs.column("reason").to_pylist()) == {""}
    assert sum(len(x) for x in recs.column("items").to_pylist()) == 402
    assert sum(sum(x) for x in recs.column("labels").to_pylist()) == 126
    assert sum(1 for h in recs.column("history").to_pylist() if h) == 73
    spec = PlanSpec.from_config(cfg, mind=True)
    plan = plan_batch(recs, spec, mind_catalog.index)
    kinds = Counter(plan.column("kind").to_pylist())
    assert kinds["users"] == len(set(recs.column("user_id").to_pylist()))
    assert kinds["train"] + kinds["valid_examples"] > 0


def test_book_crossing_by_config(tokenizer):
    cfg = _config("book-crossing.yaml")
    ratings, books = shared_data("book-crossing", "ratings.tsv"), shared_data("book-crossing", "books.tsv")
    _points_at_shared(cfg, "interactions", "book-crossing", "ratings.tsv")
    _points_at_shared(cfg, "items", "book-crossing", "books.tsv")
    cspec = CatalogSpec.from_config(cfg.data, cfg.data.items_format)
    cat_headers = preflight(resolve(str(books), "x"), "tsv", cspec.required, "data.items")
    cat = build_catalog(parse_catalog(_lines(books, "tsv", True), cspec, cat_headers, tokenizer), tokenizer)
    assert len(cat.index) == 2030 and cat.quarantine.num_rows == 0
    assert set(cat.items.column_names) >= {"item_id", "text", "token_ids", "isbn", "book_title", "book_author"}
    lspec = LogSpec.from_config(cfg.data, cfg.data.interactions_format)
    headers = preflight(resolve(str(ratings), "x"), "tsv", lspec.required, "data.interactions")
    recs = parse_logs(_lines(ratings, "tsv", True), lspec, headers, cat.index.position)
    assert recs.num_rows == 106_729 and set(recs.column("reason").to_pylist()) == {""}
    labels = Counter(lab for x in recs.column("labels").to_pylist() for lab in x)
    assert labels[IGNORED] == 65_273 and labels[0] + labels[1] == 41_456
    assert len(set(recs.column("user_id").to_pylist())) == 1820


def test_book_crossing_evaluation_ignores_the_files_isbn_order(tokenizer):
    """Book-Crossing's rows are sorted by ISBN within each user, which is not time. With the
    shipped config (no timestamps -> a seeded random order), shuffling every user's rows gives the
    same held-out positives, histories and negatives: the evaluation cannot reward file order."""
    import random

    cfg = _config("book-crossing.yaml")
    ratings, books = shared_data("book-crossing", "ratings.tsv"), shared_data("book-crossing", "books.tsv")
    cspec = CatalogSpec.from_config(cfg.data, cfg.data.items_format)
    cat = build_catalog(parse_catalog(_lines(books, "tsv", True), cspec,
                                      preflight(resolve(str(books), "x"), "tsv", cspec.required, "x"), tokenizer),
                        tokenizer)
    lspec = LogSpec.from_config(cfg.data, "tsv")
    headers = preflight(resolve(str(ratings), "x"), "tsv", lspec.required, "x")
    lines = ratings.read_text().splitlines()
    users = sorted({ln.split("\t")[0] for ln in lines[1:]})[:300]  # a sample of users keeps the test fast
    keep = set(users)
    rows = [ln for ln in lines[1:] if ln.split("\t")[0] in keep]
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)  # rows of each user now in a random order (and users interleaved)
    spec = PlanSpec.from_config(cfg, mind=False)
    assert spec.random_order and spec.eval_positives == 5

    def evals(body: list[str]) -> list[tuple]:
        path = ratings.parent / "x"  # only the name is used in quarantine keys; contents come from the table
        table = pa.table({"source": [str(path)] * len(body), "line": pa.array(range(2, len(body) + 2), pa.int64()),
                          "raw": pa.array([b.encode() for b in body], pa.binary())}, schema=EXPLODED_SCHEMA)
        recs = parse_logs(table, lspec, {str(path): headers[str(ratings)]}, cat.index.position)
        plan = plan_batch(recs.filter(pc.equal(recs.column("reason"), "")), spec, cat.index)
        test = plan.filter(pc.is_in(plan.column("kind"), pa.array(["test", "valid"])))
        return sorted(zip(*(test.column(c).to_pylist() for c in ("impression_id", "history", "candidates", "labels")),
                          strict=True))

    a, b = evals(rows), evals(shuffled)
    assert len(a) > 100 and a == b
