"""The trainer's in-loop validation (train/loop.py) on a tiny model, no Ray: the model's own scores in
generating mode (what evaluation and serving score), AUC by embsum.metrics, equal to the offline path
(encode_user -> encode_content -> score) and to the positive-first AUC the loop computed before."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from embsum.metrics import mean_metrics
from embsum.model import EmbSum
from embsum.scoring import score
from embsum.tokenization import EmbSumTokenizer
from train.loop import auc_total, validation_scores

B, C = 4, 4  # examples per batch, candidates per example (1 positive + 3 negatives)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _batches(tok: EmbSumTokenizer) -> list[dict[str, torch.Tensor]]:
    g = np.random.default_rng(0)

    def items(n: int) -> list[list[int]]:
        return [g.integers(100, 30000, size=int(g.integers(1, 10))).tolist() for _ in range(n)]

    out = []
    for _ in range(2):
        sessions = tok.sessions_batch([items(int(g.integers(1, 6))) for _ in range(B)])  # (B, G, L)
        cands = tok.content_batch(items(B * C)).reshape(B, C, -1)  # (B, C, Lc)
        cands[0, 2] = cands[0, 0]  # a negative equal to the positive: a tie, which counts one half
        labels = np.zeros((B, C), np.int64)
        labels[:, 0] = 1  # valid_examples: the positive first
        out.append({"session_ids": torch.as_tensor(sessions).long(), "candidate_ids": torch.as_tensor(cands).long(),
                    "labels": torch.as_tensor(labels)})
    return out


def test_validation_auc_is_embsum_metrics_on_the_models_own_scores(tiny_cfg, tokenizer: EmbSumTokenizer) -> None:
    model = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0).eval()
    batches = _batches(tokenizer)
    scored = list(validation_scores(model, batches))
    total, n = auc_total(scored)
    assert n == 2 * B

    # The offline path, one example at a time: the generated summary's UPE, the candidates' CPE, score().
    reference = []
    with torch.no_grad():
        for b in batches:
            for i in range(B):
                upe = model.encode_user(b["session_ids"][i:i + 1])  # (1, M, D)
                cpe, key = model.encode_content(b["candidate_ids"][i])  # (C, N, D) x2
                reference.append((b["labels"][i].numpy(), score(upe, cpe, key)[0].numpy()))  # (C,)
    for (labels, scores), ref in zip(scored, [reference[:B], reference[B:]], strict=True):
        np.testing.assert_array_equal(labels, np.stack([y for y, _ in ref]))
        np.testing.assert_allclose(scores, np.stack([x for _, x in ref]), rtol=1e-4, atol=1e-5)
    expected = mean_metrics(reference)
    assert total / n == pytest.approx(expected.auc, abs=1e-12) and n == expected.impressions

    # The same value as the loop's former positive-first AUC (share of negatives below the positive,
    # ties one half), so checkpoints are picked as before.
    s = np.concatenate([x for _, x in scored])  # (2B, C)
    assert s[0, 2] == s[0, 0]  # the tie is there
    former = ((s[:, :1] > s[:, 1:]).sum(1) + 0.5 * (s[:, :1] == s[:, 1:]).sum(1)) / (C - 1)
    assert total / n == pytest.approx(float(former.mean()), abs=1e-12)


def test_examples_without_a_negative_are_left_out() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 1]])
    scores = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]], np.float32)
    assert auc_total([(labels, scores)]) == (1.0, 1)
    assert auc_total([]) == (0.0, 0)


# ---- the fixed validation set (train/validation_set.py) ---------------------------------------------------------
def _numbered(n: int, batch: int) -> list[dict[str, np.ndarray]]:
    """Rows 0..n-1 in numpy column batches of ``batch``: an id column and a (rows, 2) column."""
    ids = np.arange(n)
    return [{"row": ids[i:i + batch], "pair": np.stack([ids[i:i + batch], -ids[i:i + batch]], axis=1)}
            for i in range(0, n, batch)]


@pytest.mark.parametrize("n, batch, world, limit", [(100, 7, 2, 20), (100, 4, 3, 21), (7, 3, 2, 40), (3, 1, 4, 8),
                                                    (0, 4, 2, 8), (50, 64, 3, 50)])
def test_rank_rows_are_disjoint_equal_strides_of_the_first_rows(n: int, batch: int, world: int, limit: int) -> None:
    from train.validation_set import rank_rows

    parts = [rank_rows(iter(_numbered(n, batch)), r, world, limit) for r in range(world)]
    want = min(n, limit) // world
    seen: list[int] = []
    for r, part in enumerate(parts):
        rows = part.get("row", np.zeros(0, int))
        assert len(rows) == want  # every rank the same count: ZeRO-3 ranks forward in lockstep
        assert rows.tolist() == list(range(r, world * want, world))
        assert part.get("pair", np.zeros((0, 2), int)).tolist() == [[x, -x] for x in rows]  # columns stay aligned
        seen += rows.tolist()
    assert sorted(seen) == list(range(want * world))  # disjoint, none of the first rows skipped
    with pytest.raises(ValueError, match="rank 2"):
        rank_rows(iter(_numbered(10, 5)), 2, 2, 4)


def test_rank_rows_reads_no_further_than_it_needs() -> None:
    from train.validation_set import rank_rows

    pulled = []

    def batches():
        for b in _numbered(1000, 10):
            pulled.append(b)
            yield b

    assert len(rank_rows(batches(), 1, 2, 30)["row"]) == 15
    assert len(pulled) == 3  # 30 rows wanted, batches of 10


def _valid_dir(tmp_path: Any, n: int, files: int = 3) -> Any:
    """``n`` validation examples in ``files`` parquet files, as prepare writes them (fixed-shape tensors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "valid_examples"
    d.mkdir()
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        sessions = np.repeat(part, 2 * 3).reshape(-1, 2, 3).astype(np.int32)  # (n, G=2, L=3): the row id
        cands = np.repeat(part, 2 * 4).reshape(-1, 2, 4).astype(np.int32)  # (n, C=2, Lc=4)
        table = pa.table({"session_ids": pa.FixedShapeTensorArray.from_numpy_ndarray(sessions),
                          "candidate_ids": pa.FixedShapeTensorArray.from_numpy_ndarray(cands),
                          "labels": pa.array([[1, 0]] * len(part), pa.list_(pa.int8()))})
        pq.write_table(table, d / f"part-{f:03d}.parquet", row_group_size=5)
    return d


def test_fixed_rows_are_the_first_rows_in_file_order_strided_by_rank(tmp_path: Any) -> None:
    from train.validation_set import collated, fixed_rows, read_batches

    d = _valid_dir(tmp_path, 40)
    assert np.concatenate([b["session_ids"][:, 0, 0] for b in read_batches(d, 8)]).tolist() == list(range(40))

    def collate(b: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"row": torch.as_tensor(b["session_ids"][:, 0, 0]), "cand": torch.as_tensor(b["candidate_ids"][:, 0, 0]),
                "labels": torch.as_tensor(np.stack([np.asarray(x) for x in b["labels"]]))}

    got = [list(collated(fixed_rows(d, r, 2, eval_batches=3, batch_size=4), 4, collate)) for r in (0, 1)]
    assert [[len(b["row"]) for b in g] for g in got] == [[4, 4, 4], [4, 4, 4]]  # 24 of the 40 rows read
    assert torch.cat([b["row"] for b in got[1]]).tolist() == list(range(1, 24, 2))  # across the files, in order
    assert all(torch.equal(b["row"], b["cand"]) for g in got for b in g)  # the columns of one example together
    assert got[0][0]["labels"].tolist() == [[1, 0]] * 4
    assert fixed_rows(d, 1, 2, 3, 4)["session_ids"].dtype == np.int32  # kept as read; collated per validation
    short = [fixed_rows(d, r, 3, eval_batches=10, batch_size=8) for r in range(3)]
    assert [len(s["session_ids"]) for s in short] == [13, 13, 13]  # 40 rows: 13 each, one left out
