"""The quality study's baselines on a tiny hand-made log: each one ranks what it should, held-out
positives never leak into the counts, the attribute weight is chosen on valid (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.baselines import Baselines, Impression
from bench.quality import metrics_at, paired, table_row, user_bootstrap
from embsum.config import load_config


@pytest.fixture()
def setup(tmp_path: Path):
    items = {"a": ("Dune", "Herbert"), "b": ("Dune Messiah", "Herbert"), "c": ("Emma", "Austen"),
             "d": ("Persuasion", "Austen"), "e": ("Ulysses", "Joyce")}
    pq.write_table(pa.table({"item_id": list(items), "text": [f"{t} | {a}" for t, a in items.values()],
                             "token_ids": [[1]] * len(items), "author": [a for _, a in items.values()]}),
                   tmp_path / "items.parquet")
    # u1..u6 read Herbert; everyone had 'c' (popular); 'e' once. u9 is the held-out user.
    log = [("u1", "a", 9), ("u1", "b", 8), ("u2", "a", 0), ("u2", "b", 9), ("u3", "a", 10), ("u3", "b", 0),
           ("u1", "c", 3), ("u2", "c", 0), ("u3", "c", 9), ("u4", "c", 8), ("u5", "c", 0), ("u6", "d", 9),
           ("u6", "e", 2), ("u9", "a", 9), ("u9", "b", 9), ("u9", "d", 0)]
    (tmp_path / "log.tsv").write_text("user\titem\trating\n" + "".join(f"{u}\t{i}\t{r}\n" for u, i, r in log))
    cfg = load_config(None, ["data.format=logs", f"data.interactions={tmp_path / 'log.tsv'}", "data.user_col=user",
                             "data.item_col=item", "data.label_col=rating", "data.interactions_format=tsv"])
    test = [Impression("u9:0", "u9", ["a"], ["b", "c", "e"], [1, 0, 0])]
    return cfg, tmp_path / "items.parquet", test


def test_each_baseline_ranks_by_its_signal_without_the_held_out_positive(setup) -> None:
    cfg, items, test = setup
    b = Baselines(cfg, items, test, attribute="author")
    im = test[0]
    pop = b.popularity(im)
    assert list(pop) == [3, 5, 1]  # 'b' counted for u1..u3 (every label) but not for u9: held out
    knn = b.item_knn(im)
    assert knn[0] > knn[1] > 0 == knn[2]  # 'b' co-occurs with history 'a' more than 'c'; 'e' never
    attr = b.attribute_match(im, weight=3.0)
    assert attr[0] == pytest.approx(np.log1p(3) + 3) and attr[1] == pytest.approx(np.log1p(5))
    txt = b.text(im)
    assert txt[0] > 0 and txt[1] == 0  # 'Dune Messiah | Herbert' shares words with 'Dune | Herbert'
    scores = b.scores(test)
    assert set(scores) == {"random", "popularity", "author + popularity", "item-kNN", "text (TF-IDF)"}
    backwards = b.scores(list(reversed(test)))["random"]  # the order impressions are read in changes nothing
    assert all(np.array_equal(x, y) for x, y in zip(scores["random"], reversed(backwards), strict=True))
    assert b.tune(test) == 0.5  # any weight ranks 'b' first here: the smallest wins the tie


def test_metrics_at_subsamples_negatives_and_bootstrap_is_by_user() -> None:
    im = Impression("i", "u", [], ["p", "n1", "n2", "n3"], [0, 0, 1, 0])
    full = metrics_at(im, [3.0, 1.0, 2.0, 0.0], None)
    two = metrics_at(im, [3.0, 1.0, 2.0, 0.0], 2)  # keeps the positive and the first 2 negatives
    assert full["auc"] == pytest.approx(2 / 3) and two["auc"] == pytest.approx(0.5)
    lo, hi = user_bootstrap(["a", "a", "b", "b"], np.array([1.0, 1.0, 0.0, 0.0]), n=500)
    assert lo == 0.0 and hi == 1.0  # two users: resampling users gives 0, 0.5 or 1
    imps = [Impression(str(k), f"u{k % 3}", [], ["x", "y"], [1, 0]) for k in range(6)]
    good, bad = [[2.0, 1.0]] * 6, [[1.0, 2.0]] * 6
    row = table_row(imps, [good, bad], None)
    assert row["auc"]["mean"] == 0.5 and row["auc"]["values"] == [1.0, 0.0] and row["seeds"] == 2
    p = paired(imps, [good], [bad])
    assert p["mean_diff"] == 1.0 and p["wins"] == 6 and p["ci95"] == [1.0, 1.0]
