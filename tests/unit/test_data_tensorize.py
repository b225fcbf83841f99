"""Plan rows -> fixed-shape int32 tensor columns assembled from the once-tokenized catalog (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embsum.data.catalog import CatalogIndex, SpecialIds
from embsum.data.examples import PLAN_SCHEMA
from embsum.data.tensorize import output_schema, tensorize
from embsum.tokenization import EmbSumTokenizer

TEXTS = ["Brady wins the title | sports", "Stocks fall on rates | finance", "Storm hits the coast | weather",
         "New phone launched | technology", "Pasta recipe for winter | food"]


@pytest.fixture(scope="module")
def index(tokenizer) -> CatalogIndex:
    ids = [f"n{k}" for k in range(len(TEXTS))]
    tokens = tokenizer.encode_texts(TEXTS)
    return CatalogIndex(ids, {i: k for k, i in enumerate(ids)}, tokens, tokenizer.content_batch(tokens),
                        EmbSumTokenizer(SpecialIds.of(tokenizer), tokenizer.cfg))


def test_assembler_needs_no_text_tokenizer(index, tokenizer):
    import pickle

    asm = pickle.loads(pickle.dumps(index.assembler))  # what workers get: small, no transformers inside
    assert (asm.sessions(index.tokens[:3]) == tokenizer.sessions(index.tokens[:3])).all()
    assert (asm.content(index.tokens[0]) == tokenizer.content(index.tokens[0])).all()
    assert len(pickle.dumps(index.assembler)) < 2000


def _plan(rows: list[dict]) -> pa.Table:
    full = [{"kind": "", "example_id": "", "user_id": "", "impression_id": "", "split": "", "history": [],
             "candidates": [], "labels": [], "stats": "", **r} for r in rows]
    return pa.Table.from_pylist(full, schema=PLAN_SCHEMA)


def test_examples_shapes_and_content(index, tokenizer, tmp_path):
    cfg = tokenizer.cfg
    plan = _plan([{"kind": "train", "example_id": "u1:1", "user_id": "u1", "history": ["n0", "n1", "n2"],
                   "candidates": ["n3", "n4", "n0"], "labels": [1, 0, 0]},
                  {"kind": "train", "example_id": "u2:1", "user_id": "u2", "history": [],
                   "candidates": ["n1", "n2", "n3"], "labels": [1, 0, 0]}])
    out = tensorize(plan, "train", index, negatives=2)
    assert out.schema == output_schema("train", cfg, 2)
    s = out.column("session_ids").combine_chunks().to_numpy_ndarray()
    c = out.column("candidate_ids").combine_chunks().to_numpy_ndarray()
    assert s.shape == (2, cfg.num_sessions, cfg.session_tokens) and s.dtype == np.int32
    assert c.shape == (2, 3, cfg.content_tokens) and c.dtype == np.int32
    assert (s[0] == tokenizer.sessions([index.tokens[k] for k in (0, 1, 2)])).all()
    assert (s[1] == tokenizer.pad_id).all()  # no history: all padding
    assert (c[0, 0] == tokenizer.content(index.tokens[3])).all() and c[0, 0, 0] == tokenizer.sos_id
    assert out.column("candidate_item_ids").to_pylist() == [["n3", "n4", "n0"], ["n1", "n2", "n3"]]
    pq.write_table(out, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.schema == out.schema  # the tensor type survives parquet
    assert (back.column("session_ids").combine_chunks().to_numpy_ndarray() == s).all()


def test_eval_users_and_empty(index, tokenizer):
    cfg = tokenizer.cfg
    ev = tensorize(_plan([{"kind": "test", "impression_id": "m1", "user_id": "u1", "history": ["n0"],
                           "candidates": ["n1", "n2", "n3", "n4"], "labels": [0, 1, 0, 0]}]), "test", index,
                   negatives=4)
    assert ev.schema == output_schema("test", cfg, 4)
    row = ev.to_pylist()[0]
    assert row["candidate_item_ids"] == ["n1", "n2", "n3", "n4"] and row["labels"] == [0, 1, 0, 0]
    assert row["history"] == ["n0"]
    users = tensorize(_plan([{"kind": "users", "user_id": "u1", "split": "train", "history": ["n0", "n4"]}]),
                      "users", index, negatives=4)
    assert users.column_names == ["user_id", "split", "history", "session_ids"]
    empty = tensorize(_plan([]), "valid_examples", index, negatives=4)
    assert empty.num_rows == 0 and empty.schema == output_schema("valid_examples", cfg, 4)
    with pytest.raises(ValueError, match="unknown output kind"):
        output_schema("nope", cfg, 4)


def test_wrong_candidate_count_is_an_internal_error(index, tokenizer):
    plan = _plan([{"kind": "train", "history": ["n0"], "candidates": ["n1", "n2"], "labels": [1, 0]}])
    with pytest.raises(AssertionError, match="5 candidates"):
        tensorize(plan, "train", index, negatives=4)


def test_grouped_examples_hold_t_blocks_and_their_labels(index, tokenizer):
    plan = _plan([{"kind": "train", "example_id": "u1:1", "user_id": "u1", "history": ["n0"],
                   "candidates": ["n3", "n4", "n0", "n1", "n2", "n4"], "labels": [1, 0, 0, 1, 0, 0]},
                  {"kind": "train", "example_id": "u2:1", "user_id": "u2", "history": ["n1"],
                   "candidates": ["n2", "n3", "n4", "n2", "n3", "n4"], "labels": [1, 0, 0, -1, -1, -1]}])
    out = tensorize(plan, "train", index, negatives=2, targets=2)
    assert out.schema == output_schema("train", tokenizer.cfg, 2, targets=2)
    c = out.column("candidate_ids").combine_chunks().to_numpy_ndarray()
    assert c.shape == (2, 6, tokenizer.cfg.content_tokens)
    assert out.column("labels").to_pylist()[1] == [1, 0, 0, -1, -1, -1]
    assert output_schema("valid_examples", tokenizer.cfg, 2, targets=2).field("candidate_ids").type.shape == \
        [3, tokenizer.cfg.content_tokens]  # in-loop validation examples always hold one target
