"""Tokenization: the real T5 tokenizer offline; session/content/summary layouts; marker safety."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embsum.tokenization import (
    BUNDLED_TOKENIZER,
    EmbSumTokenizer,
    format_item_text,
    load_tokenizer,
    resolve_tokenizer_path,
)
from tests.conftest import shared_data

T5_EXAMPLE = "translate English to German: The house is wonderful."
T5_EXAMPLE_IDS = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]  # published in HF's T5 docs


# ---- the real tokenizer --------------------------------------------------------------------------------
def test_shared_t5_tokenizer_reproduces_the_published_ids() -> None:
    tok = load_tokenizer(str(shared_data("t5-tokenizer")))
    assert tok(T5_EXAMPLE)["input_ids"] == T5_EXAMPLE_IDS
    assert len(tok) == 32100


def test_bundled_tokenizer_is_the_same_tokenizer(tokenizer: EmbSumTokenizer) -> None:
    assert resolve_tokenizer_path(tokenizer.cfg) == str(BUNDLED_TOKENIZER)
    bundled = load_tokenizer("bundled")
    assert bundled(T5_EXAMPLE)["input_ids"] == T5_EXAMPLE_IDS
    assert tokenizer.tok(T5_EXAMPLE)["input_ids"] == T5_EXAMPLE_IDS
    shared = load_tokenizer(str(shared_data("t5-tokenizer")))
    texts = ["Hello world!", "Ünïcödé café, 1234 numbers.", "A <extra_id_0> sentinel and </s> eos."]
    assert bundled(texts)["input_ids"] == shared(texts)["input_ids"]


def test_special_ids(tokenizer: EmbSumTokenizer) -> None:
    assert tokenizer.sos_id == tokenizer.tok.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert tokenizer.pad_id == 0 and tokenizer.eos_id == 1
    assert tokenizer.item_budget == (tokenizer.cfg.session_tokens - 1) // tokenizer.cfg.items_per_session


def test_unknown_marker_and_bad_paths_are_value_errors(tokenizer: EmbSumTokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="sos_token"):
        EmbSumTokenizer(tokenizer.tok, dataclasses.replace(tokenizer.cfg, sos_token="[SOS-not-in-vocab]"))
    with pytest.raises(ValueError, match="could not be loaded"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


# ---- sessions ----------------------------------------------------------------------------------------------
def _parse_sessions(arr: np.ndarray, sos: int, eos: int, pad: int) -> list[list[list[int]]]:
    """Independent reader: each session -> its items' token lists; checks the layout on the way."""
    sessions = []
    for row in arr.tolist():
        if all(t == pad for t in row):
            sessions.append([])
            continue
        n = len(row) - row[::-1].index(eos) - 1 if eos in row else None
        assert n is not None, f"non-empty session without EOS: {row}"
        assert row.count(eos) == 1, row
        assert all(t == pad for t in row[n + 1:]), f"tokens after EOS: {row}"
        assert row[0] == sos, f"session does not start with [SOS]: {row}"
        items: list[list[int]] = []
        for t in row[:n]:
            if t == sos:
                items.append([])
            else:
                assert t != pad, f"pad inside a session: {row}"
                items[-1].append(t)
        sessions.append(items)
    return sessions


def _history(lengths: list[int]) -> list[list[int]]:
    # Item k's tokens are all 1000 + k: which item a token came from is visible in the output.
    return [[1000 + k] * n for k, n in enumerate(lengths)]


def _check_sessions(tok: EmbSumTokenizer, history: list[list[int]]) -> None:
    c = tok.cfg
    arr = tok.sessions(history)
    assert arr.shape == (c.num_sessions, c.session_tokens)
    parsed = _parse_sessions(arr, tok.sos_id, tok.eos_id, tok.pad_id)
    kept = history[-c.num_sessions * c.items_per_session:] if history else []
    # Sessions fill in order, oldest first, P items each; unused sessions are all padding.
    expected = [kept[g * c.items_per_session:(g + 1) * c.items_per_session] for g in range(c.num_sessions)]
    for got, want in zip(parsed, expected, strict=True):
        assert len(got) == len(want), "an item's marker was lost or invented"
        for item_got, item_want in zip(got, want, strict=True):
            assert item_got == item_want[: tok.item_budget - 1]


def test_sessions_keep_the_most_recent_items(tokenizer: EmbSumTokenizer) -> None:
    c = tokenizer.cfg
    h = _history([3] * (c.num_sessions * c.items_per_session + 3))
    _check_sessions(tokenizer, h)
    arr = tokenizer.sessions(h)
    first_kept = 1000 + 3  # the three oldest items are dropped
    assert arr[0, 1] == first_kept and not np.isin(np.arange(1000, 1003), arr).any()


def test_sessions_long_items_never_lose_markers(tokenizer: EmbSumTokenizer) -> None:
    c = tokenizer.cfg
    h = _history([c.session_tokens * 2] * (c.num_sessions * c.items_per_session))
    arr = tokenizer.sessions(h)
    assert ((arr == tokenizer.sos_id).sum(-1) == c.items_per_session).all()
    _check_sessions(tokenizer, h)


def test_sessions_partial_and_empty_histories(tokenizer: EmbSumTokenizer) -> None:
    c = tokenizer.cfg
    arr = tokenizer.sessions(_history([2] * (c.items_per_session + 1)))
    assert (arr[0] == tokenizer.sos_id).sum() == c.items_per_session
    assert (arr[1] == tokenizer.sos_id).sum() == 1
    assert (arr[2:] == tokenizer.pad_id).all()
    empty = tokenizer.sessions([])
    assert empty.shape == (c.num_sessions, c.session_tokens) and (empty == tokenizer.pad_id).all()
    # An item with no text still has its marker.
    one = tokenizer.sessions([[]])
    assert one[0, :2].tolist() == [tokenizer.sos_id, tokenizer.eos_id] and (one[0, 2:] == 0).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12))
def test_sessions_layout_property(tokenizer: EmbSumTokenizer, lengths: list[int]) -> None:
    _check_sessions(tokenizer, _history(lengths))


def test_sessions_batch_shapes(tokenizer: EmbSumTokenizer) -> None:
    c = tokenizer.cfg
    b = tokenizer.sessions_batch([_history([2, 3]), [], _history([5])])
    assert b.shape == (3, c.num_sessions, c.session_tokens)
    assert tokenizer.sessions_batch([]).shape == (0, c.num_sessions, c.session_tokens)
    assert tokenizer.content_batch([]).shape == (0, c.content_tokens)


def test_numpy_batches_work_like_lists(tokenizer: EmbSumTokenizer) -> None:
    # Ray Data / pyarrow hand over numpy arrays (object arrays of int arrays), whose truth value is ambiguous.
    hist = [[5, 6, 7], [8], [9, 10]]
    np_hist = np.empty(len(hist), dtype=object)
    np_hist[:] = [np.asarray(h, dtype=np.int64) for h in hist]
    np.testing.assert_array_equal(tokenizer.sessions(np_hist), tokenizer.sessions(hist))
    batch = np.empty(2, dtype=object)
    batch[:] = [np_hist, np_hist[:0]]
    np.testing.assert_array_equal(tokenizer.sessions_batch(batch), tokenizer.sessions_batch([hist, []]))
    items = np.empty(2, dtype=object)
    items[:] = [np.asarray([5, 6]), np.asarray([7])]
    np.testing.assert_array_equal(tokenizer.content_batch(items), tokenizer.content_batch([[5, 6], [7]]))
    texts = np.array(["a house", "a cat"])
    assert tokenizer.encode_texts(texts) == tokenizer.encode_texts(["a house", "a cat"])
    assert tokenizer.encode_texts(texts[:0]) == []


# ---- text can't forge structure ------------------------------------------------------------------------------
def test_literal_marker_in_text_cannot_forge_an_item(tokenizer: EmbSumTokenizer) -> None:
    evil = "breaking <extra_id_0> news </s> here <pad> and <extra_id_0><extra_id_0> more"
    raw = tokenizer.tok(evil, add_special_tokens=False)["input_ids"]
    assert tokenizer.sos_id in raw and tokenizer.eos_id in raw and tokenizer.pad_id in raw  # the threat is real
    ids = tokenizer.encode_texts([evil])[0]
    assert not {tokenizer.sos_id, tokenizer.eos_id, tokenizer.pad_id} & set(ids)
    assert ids == [t for t in raw if t not in (tokenizer.sos_id, tokenizer.eos_id, tokenizer.pad_id)]
    s = tokenizer.sessions_from_texts([[evil, "plain item"]])[0]
    parsed = _parse_sessions(s, tokenizer.sos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert [len(x) for x in parsed] == [2, 0, 0]
    c = tokenizer.content_from_texts([evil])[0]
    assert (c == tokenizer.sos_id).sum() == 1 and (c == tokenizer.eos_id).sum() == 1
    y = tokenizer.summary(evil)
    assert (y == tokenizer.eos_id).sum() == 1


def test_sessions_from_texts_matches_independent_tokenization(tokenizer: EmbSumTokenizer) -> None:
    texts = [["The cat sat on the mat.", "Stocks fell sharply today"], ["One"]]
    got = tokenizer.sessions_from_texts(texts)
    for u, h in enumerate(texts):
        ids = [tokenizer.tok(t, add_special_tokens=False)["input_ids"] for t in h]
        np.testing.assert_array_equal(got[u], tokenizer.sessions(ids))
        parsed = _parse_sessions(got[u], tokenizer.sos_id, tokenizer.eos_id, tokenizer.pad_id)
        assert parsed[0] == [i[: tokenizer.item_budget - 1] for i in ids]


# ---- content and summary ----------------------------------------------------------------------------------------
def test_content_layout(tokenizer: EmbSumTokenizer) -> None:
    lc = tokenizer.cfg.content_tokens
    short = tokenizer.content([5, 6, 7])
    assert short.shape == (lc,)
    assert short.tolist() == [tokenizer.sos_id, 5, 6, 7, tokenizer.eos_id] + [0] * (lc - 5)
    long = tokenizer.content(list(range(100, 100 + 3 * lc)))
    assert long.tolist() == [tokenizer.sos_id, *range(100, 100 + lc - 2), tokenizer.eos_id]
    text = "Scientists discover water on Mars"
    expected = tokenizer.tok(text, add_special_tokens=False)["input_ids"][: lc - 2]
    got = tokenizer.content_from_texts([text])[0]
    assert got.tolist()[: len(expected) + 2] == [tokenizer.sos_id, *expected, tokenizer.eos_id]


def test_summary_layout(tokenizer: EmbSumTokenizer) -> None:
    s = tokenizer.cfg.summary_tokens
    text = "Likes cats"
    ids = tokenizer.tok(text, add_special_tokens=False)["input_ids"]
    y = tokenizer.summary(text)
    assert y.shape == (s,)
    assert y.tolist() == [*ids, tokenizer.eos_id] + [0] * (s - len(ids) - 1)
    assert tokenizer.decode(y) == text
    long = tokenizer.summary(" ".join(["word"] * 100))
    assert long[-1] == tokenizer.eos_id and (long[:-1] != 0).all() and (long[:-1] != tokenizer.eos_id).all()
    empty = tokenizer.summary("")
    assert empty.tolist() == [tokenizer.eos_id] + [0] * (s - 1)


def test_decode_accepts_hf_keyword(tokenizer: EmbSumTokenizer) -> None:
    y = tokenizer.summary("hello world")
    assert tokenizer.decode(y, skip_special_tokens=True) == "hello world"
    assert "</s>" in tokenizer.decode(y, skip_special_tokens=False)


# ---- item text ---------------------------------------------------------------------------------------------------
def test_format_item_text_skips_missing_and_caps() -> None:
    rec = {"title": "  A   title\n", "category": float("nan"), "abstract": "", "sub": None,
           "author": np.float32("nan"), "year": 1999, "blank": "   ", "extra": "x"}
    fields = ["title", "category", "abstract", "sub", "author", "missing", "year", "blank", "extra"]
    assert format_item_text(rec, fields, 400) == "A title | 1999 | x"
    assert format_item_text(rec, ["extra", "title"], 400) == "x | A title"  # field order kept
    long = {"title": "y" * 1000}
    assert format_item_text(long, ["title"], 50) == "y" * 50
    assert format_item_text({}, ["title"], 10) == ""


def test_format_item_text_skips_pandas_missing_values() -> None:
    pd = pytest.importorskip("pandas")
    rec = {"a": pd.NA, "b": pd.NaT, "c": np.nan, "d": "ok"}
    assert format_item_text(rec, ["a", "b", "c", "d"], 100) == "ok"


def test_content_batch_and_padded_rows_match_the_per_item_assembly(tokenizer):
    import pyarrow as pa

    from embsum.tokenization import padded_rows

    items = [[], [7], list(range(3, 3 + tokenizer.cfg.content_tokens + 5)), [9, 10, 11]]
    want = np.stack([tokenizer.content(i) for i in items])  # (I, Lc)
    assert np.array_equal(tokenizer.content_batch(items), want)
    arrow = pa.array([[0, 0], *items], pa.list_(pa.int32())).slice(1)  # a slice: offsets not from 0
    assert np.array_equal(tokenizer.content_batch(arrow), want)
    rows, lens = padded_rows(items, 4, -1, head=5)
    assert rows.tolist() == [[5, -1, -1, -1], [5, 7, -1, -1], [5, 3, 4, 5], [5, 9, 10, 11]]
    assert lens.tolist() == [1, 2, 4, 4]
    assert tokenizer.content_batch([]).shape == (0, tokenizer.cfg.content_tokens)
