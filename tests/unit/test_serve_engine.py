"""The scorer's request logic over one bundle (no Ray, no HTTP): served scores equal the offline
``score`` on the stored embeddings, batches are vectorized without mixing requests up, the cold
paths encode with the same Predictor code, and recommend returns the exact top k."""

from __future__ import annotations

import numpy as np
import pytest

from embsum.predictor import Predictor
from serve import engine
from serve.engine import RecommendQuery, Rejection, ScoreQuery, top_k
from tests.conftest import assert_f32_close
from tests.unit.test_serve_store import N_ITEMS, history_of, item_text, make_bundle, tiny_predictor


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_cfg, tokenizer):
    return make_bundle(tmp_path_factory.mktemp("emb"), tiny_predictor(tiny_cfg, tokenizer, seed=2), "1")


def offline(bundle, user: str, items: list[str]) -> np.ndarray:
    s = bundle.store
    rows = [s.item_index[i] for i in items]
    u = s.user_index[user]
    return Predictor.score(s.upe[u:u + 1], s.cpe[rows], s.cpe_key[rows])[0]


def refs(ids: list[str]) -> list[tuple[str, None]]:
    return [(i, None) for i in ids]


def sq(user_id=None, candidates=(), history=None) -> ScoreQuery:
    return ScoreQuery(user_id=user_id, history=history, candidates=list(candidates))


def rq(user_id=None, history=None, k=10, **kw) -> RecommendQuery:
    return RecommendQuery(user_id=user_id, history=history, k=k, **kw)


@pytest.mark.parametrize("waste", [engine.UNION_WASTE, 0.0])  # all pairs over the union / padded per user
def test_batch_scores_equal_offline_score(bundle, monkeypatch, waste):
    monkeypatch.setattr(engine, "UNION_WASTE", waste)
    rng = np.random.default_rng(0)
    reqs, want = [], []
    for u in range(6):
        items = [f"n{i}" for i in rng.choice(N_ITEMS, size=3 + u, replace=False)]
        reqs.append(sq(f"U{u}", refs(items)))
        want.append(offline(bundle, f"U{u}", items))
    out, stats = engine.score_batch(bundle, reqs)
    assert stats.size == 6 and stats.cold_users == stats.cold_items == 0
    for r, w, req in zip(out, want, reqs, strict=True):
        assert r.model_version == "1" and not r.user_encoded
        assert r.item_ids == [c[0] for c in req.candidates] and not any(r.encoded)
        assert_f32_close(r.scores, w)


@pytest.mark.parametrize("waste", [engine.UNION_WASTE, 0.0])  # all pairs over the union / padded per user
def test_a_repeated_user_is_scored_once_per_batch(bundle, monkeypatch, waste):
    """Requests naming the same known user share its UPE row: the all-pairs score runs over the
    distinct users (the padded path still gives each request its own row), and every request gets
    its own candidates' scores. A cold user (history given) is never merged with a known one."""
    monkeypatch.setattr(engine, "UNION_WASTE", waste)
    rows_scored: list[int] = []
    real = engine._score
    monkeypatch.setattr(engine, "_score", lambda upe, cpe, key: rows_scored.append(len(upe)) or real(upe, cpe, key))
    sets = [["n1", "n2", "n3"], ["n3", "n1"], ["n4", "n1", "n2"], ["n2"], ["n5", "n1"]]
    users = ["U3", "U1", "U3", "U3", "U1"]
    reqs = [sq(u, refs(c)) for u, c in zip(users, sets, strict=True)]
    reqs.append(sq(None, refs(["n1", "n2"]), history=refs(history_of(3))))  # U3's history, encoded cold
    out, stats = engine.score_batch(bundle, reqs)
    assert rows_scored == ([3] if waste else [6])  # U3, U1 and the cold user / one row per request
    for r, u, c in zip(out[:5], users, sets, strict=True):
        assert r.item_ids == c and not r.user_encoded
        assert_f32_close(r.scores, offline(bundle, u, c))
    assert out[5].user_encoded and stats.cold_users == 1 and len(out[5].scores) == 2
    rows_scored.clear()
    recs, _ = engine.recommend_batch(bundle, [rq("U3", k=4), rq("U1", k=4), rq("U3", k=4, exclude=["n1"])])
    assert rows_scored == [2]  # the catalog is scored once per distinct user
    solo = [engine.recommend_batch(bundle, [q])[0][0] for q in (rq("U3", k=4), rq("U1", k=4),
                                                             rq("U3", k=4, exclude=["n1"]))]
    for got, want in zip(recs, solo, strict=True):
        assert got.item_ids == want.item_ids
        assert_f32_close(got.scores, want.scores)
    assert "n1" not in recs[2].item_ids


def test_a_rejected_request_does_not_fail_its_batch(bundle):
    reqs = [sq("U1", refs(["n1", "n2"])), sq("nobody", refs(["n1"])),
            sq("U2", refs(["n3", "zz9", "zz8", "zz9"])), sq("U2", refs(["n4"]))]
    out, _ = engine.score_batch(bundle, reqs)
    assert isinstance(out[1], Rejection) and out[1].status == 404 and "'nobody'" in out[1].detail
    assert isinstance(out[2], Rejection) and out[2].status == 404
    assert "unknown candidate item ids: 'zz9', 'zz8'" in out[2].detail and "text" in out[2].detail
    assert_f32_close(out[0].scores, offline(bundle, "U1", ["n1", "n2"]))
    assert_f32_close(out[3].scores[0], offline(bundle, "U2", ["n4"])[0])


def test_cold_paths_match_the_precomputed_embeddings(bundle):
    items = ["n0", "n5", "n11"]
    want = offline(bundle, "U3", items)
    # The user by history (ids -> catalog texts), the items by text only: both encoded on the fly.
    req = sq(history=refs(history_of(3)), candidates=[(None, item_text(int(i[1:]))) for i in items])
    (r,), stats = engine.score_batch(bundle, [req])
    assert r.user_encoded and all(r.encoded) and r.item_ids == [None] * 3
    assert stats.cold_users == 1 and stats.cold_items == 3
    assert_f32_close(r.scores, want, rtol=1e-4)  # through the encoder, other batch shapes
    # Unknown ids with text are encoded; history may mix ids and texts.
    mixed = [(h, None) if j % 2 else (f"new-{j}", item_text(int(h[1:]))) for j, h in enumerate(history_of(3))]
    (r2,), _ = engine.score_batch(bundle, [sq(history=mixed, candidates=[("n0", None), ("brand-new", item_text(5))])])
    assert r2.encoded == [False, True] and r2.item_ids[1] == "brand-new"
    assert_f32_close(r2.scores, want[:2], rtol=1e-4)
    body = r2.to_json()
    assert body["scores"][1] == {"item_id": "brand-new", "score": r2.scores[1], "encoded": True}


def test_unknown_history_ids_without_text_are_named(bundle):
    (r,), _ = engine.score_batch(bundle, [sq(history=refs(["n1", "ghost"]), candidates=refs(["n1"]))])
    assert r.status == 404 and "unknown history item ids: 'ghost'" in r.detail


def test_recommend_is_the_exact_top_k_without_history(bundle):
    s = bundle.store
    u = s.user_index["U4"]
    full = Predictor.score(s.upe[u:u + 1], s.cpe, s.cpe_key)[0]
    seen = {s.item_index[i] for i in history_of(4)}
    ranked = [i for i in np.argsort(-full, kind="stable") if i not in seen]
    (r,), _ = engine.recommend_batch(bundle, [rq("U4", k=5)])
    assert r.item_ids == [s.item_ids[i] for i in ranked[:5]]
    assert_f32_close(r.scores, full[ranked[:5]])
    assert r.texts[0] == s.item_texts[ranked[0]]
    assert r.to_json()["items"][0] == {"item_id": r.item_ids[0], "score": r.scores[0], "text": r.texts[0]}
    # History kept, an explicit exclude list honoured, k larger than what is eligible.
    (a, b), stats = engine.recommend_batch(bundle, [
        rq("U4", k=3, exclude_history=False), rq("U4", k=10_000, exclude=[s.item_ids[ranked[0]], "not-an-item"])])
    assert stats.size == 2
    assert a.item_ids == [s.item_ids[i] for i in np.argsort(-full, kind="stable")[:3]]
    assert len(b.item_ids) == N_ITEMS - len(seen) - 1 and s.item_ids[ranked[0]] not in b.item_ids


def test_recommend_for_a_cold_user_excludes_its_known_history(bundle):
    hist = history_of(2)
    (r,), stats = engine.recommend_batch(bundle, [rq(history=refs(hist), k=N_ITEMS)])
    assert r.user_encoded and stats.cold_users == 1
    assert not set(hist) & set(r.item_ids) and len(r.item_ids) == N_ITEMS - len(set(hist))


def test_catalog_scores_in_chunks_equal_one_call(bundle, monkeypatch):
    s = bundle.store
    whole = engine.catalog_scores(s.upe[:3], s.cpe, s.cpe_key)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1)  # one item per chunk
    assert_f32_close(engine.catalog_scores(s.upe[:3], s.cpe, s.cpe_key), whole)


def test_top_k_edge_cases():
    s = np.array([0.5, 2.0, 2.0, -1.0, 3.0], dtype=np.float32)
    assert top_k(s, 3).tolist() == [4, 1, 2]  # ties by index
    assert top_k(s, 10).tolist() == [4, 1, 2, 0, 3]
    assert top_k(s, 2, np.array([4, 1])).tolist() == [2, 0]
    assert top_k(s, 3, np.arange(5)).tolist() == []


def test_summary_and_describe(bundle):
    s = bundle.store
    got = engine.user_summary(bundle, "U1")
    assert got.summary == s.summaries[s.user_index["U1"]] and got.model_version == "1"
    miss = engine.user_summary(bundle, "U999")
    assert miss.status == 404 and "'U999'" in miss.detail
    info = engine.describe(bundle, alias="champion", requested="1", error=None)
    assert info.model_version == "1" and info.embeddings["items"] == N_ITEMS and info.last_rollout_error is None


def test_score_json_bytes_equal_json_dumps():
    import json

    from serve.engine import ScoreResult

    def dumps(r: ScoreResult) -> bytes:
        return json.dumps(r.to_json(), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()

    odd = ScoreResult(model_version="3", user_id='u"\\\u00e9\U0001f600\n', user_encoded=True,
                      item_ids=["n1", None, "t\u2028x"], scores=[0.1, -2.5e-09, 1e300], encoded=[False, True, True])
    plain = ScoreResult(model_version="3", user_id=None, user_encoded=False, item_ids=[], scores=[], encoded=[])
    for r in (odd, plain):
        assert r.json_bytes() == dumps(r) and json.loads(r.json_bytes()) == r.to_json()
    with pytest.raises(ValueError):  # non-finite scores are refused, as json.dumps(allow_nan=False) does
        ScoreResult(model_version="3", user_id="u", user_encoded=False, item_ids=["a"], scores=[float("nan")],
                    encoded=[False]).json_bytes()


def test_light_batches_are_warm_and_small():
    reqs = [sq("U1", refs(["n1", "n2"])), sq("U2", refs(["n3"]))]
    assert engine.is_light(reqs, 3) and not engine.is_light(reqs, 2)
    same = [sq(f"U{u}", refs(["n1", "n2"])) for u in range(8)]  # 16 candidates, 2 distinct: one union
    assert engine.is_light(same, 2) and not engine.is_light(same, 1)
    assert not engine.is_light([sq("U1", [("n1", "some text")])], 100)  # may need the encoder
    assert not engine.is_light([sq(history=refs(["n1"]), candidates=refs(["n2"]))], 100)
