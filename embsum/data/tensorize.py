"""Plan rows (item ids) -> the parquet rows of embsum/data/layout.py (fixed-shape int32 tensors).

Tensor columns use pyarrow's native ``fixed_shape_tensor`` extension type: parquet keeps it,
``ray.data.read_parquet(...).iter_torch_batches()`` yields (B, G, L) / (B, C, Lc) int32 tensors
from it, and plain pyarrow reads it without Ray (``column.combine_chunks().to_numpy_ndarray()``).
Every output has an explicit schema, so a batch whose lists are all empty still writes
``list<string>`` and the files of one dataset never disagree.

No tokenizer call happens here: item token ids come from the ``CatalogIndex`` (tokenized once),
sessions are assembled by ``EmbSumTokenizer.sessions`` (the index's ``assembler``, which holds the
special ids but no Hugging Face tokenizer) and candidates are rows of the index's
precomputed (N, Lc) array. Histories repeat (every click of an impression shares one), so a
batch builds each distinct history's sessions once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embsum.config import ModelConfig
from embsum.data.catalog import CatalogIndex
from embsum.tokenization import padded_rows

EXAMPLE_KINDS = ("train", "valid_examples")
EVAL_KINDS = ("valid", "test")
_STR_LIST = pa.list_(pa.string())


def output_schema(kind: str, cfg: ModelConfig, negatives: int, targets: int = 1) -> pa.Schema:
    """The columns layout.py promises for ``kind`` (train, valid_examples, valid, test, users).
    ``targets``: positives per training example (valid_examples always have one)."""
    sessions = pa.fixed_shape_tensor(pa.int32(), [cfg.num_sessions, cfg.session_tokens])  # (G, L)
    if kind in EXAMPLE_KINDS:
        t = targets if kind == "train" else 1
        cands = pa.fixed_shape_tensor(pa.int32(), [t * (1 + negatives), cfg.content_tokens])  # (T*C, Lc)
        return pa.schema([("example_id", pa.string()), ("user_id", pa.string()), ("impression_id", pa.string()),
                          ("session_ids", sessions), ("history", _STR_LIST), ("candidate_ids", cands),
                          ("candidate_item_ids", _STR_LIST), ("labels", pa.list_(pa.int8()))])
    if kind in EVAL_KINDS:
        return pa.schema([("impression_id", pa.string()), ("user_id", pa.string()), ("session_ids", sessions),
                          ("history", _STR_LIST), ("candidate_item_ids", _STR_LIST), ("labels", pa.list_(pa.int8()))])
    if kind == "users":
        return pa.schema([("user_id", pa.string()), ("split", pa.string()), ("history", _STR_LIST),
                          ("session_ids", sessions)])
    raise ValueError(f"unknown output kind {kind!r}; expected one of train, valid_examples, valid, test, users")


def write_options(schema: pa.Schema) -> dict[str, object]:
    """Parquet writer options for an output table (the same bytes whichever process writes).

    zstd level 1, with dictionary encoding and statistics only for the id/string columns. The
    token-id tensors are most of the bytes and are mostly padding: dictionary-encoding them and
    keeping min/max statistics cost more than they save. Measured on 36k train rows: write 0.33 ->
    0.22 CPU-s, read back 0.56 -> 0.24 CPU-s, 4.9 -> 4.1 MB (pyarrow's default: snappy, every
    column dictionary-encoded).
    """
    small = [f.name for f in schema if not isinstance(f.type, pa.ExtensionType)]
    return {"compression": "zstd", "compression_level": 1, "use_dictionary": small, "write_statistics": small}


def _tensor(arr: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr, dtype=np.int32))


def _item_ids(index: CatalogIndex) -> pa.Array:
    """The catalog's item ids as an Arrow array (row k = position k), built once per index."""
    if index.id_array is None:
        index.id_array = pa.array(index.ids, pa.string())
    return index.id_array


def _segments(index: CatalogIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per catalog item, its piece of a session: ``[SOS] + token ids[:budget - 1]`` (what
    ``EmbSumTokenizer.sessions`` appends per item), padded: ((N, budget) int32, (N,) lengths).
    Built once per index (workers keep the index across tasks)."""
    if index.segments is None:
        tok = index.assembler
        assert tok.item_budget >= 1, "config validation guarantees (L - 1) // P >= 2"
        index.segments = padded_rows(index.tokens, tok.item_budget, tok.pad_id, head=tok.sos_id)  # (N, budget), (N,)
    return index.segments


def _positions(values: pa.Array, index: CatalogIndex, what: str) -> np.ndarray:
    """Item ids -> catalog positions (C++ hash lookup, no Python loop)."""
    pos = pc.index_in(values, value_set=_item_ids(index))
    if pos.null_count:
        raise AssertionError(f"{what}: {pos.null_count} item id(s) not in the catalog")
    return np.asarray(pos.to_numpy(zero_copy_only=False), dtype=np.int64)


def _list_array(column: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.fill_null([]) if arr.null_count else arr


def session_ids(histories: pa.ChunkedArray | pa.Array, index: CatalogIndex) -> np.ndarray:
    """Histories (list<string> of item ids, oldest first) -> (B, G, L) int32, vectorized.

    The same arrays as ``EmbSumTokenizer.sessions`` per row (a unit test holds them equal): the
    most recent H = G * P items, session g holding items g*P .. g*P + P - 1 of them, each as its
    ``[SOS] + tokens`` segment, then EOS, padded; unused sessions stay padding. Each row's item
    positions go into a (B, G, P) matrix; segment lengths give every token its column by a
    cumulative sum; one scatter writes them all. Consecutive rows with the same history (the
    clicks of one impression) are built once.
    """
    cfg = index.assembler.cfg
    h = cfg.num_sessions * cfg.items_per_session
    hist = _list_array(histories)
    rows = len(hist)
    if rows == 0:
        return np.zeros((0, cfg.num_sessions, cfg.session_tokens), dtype=np.int32)  # (0, G, L)
    flat = _positions(hist.flatten(), index, "history")  # (total items,)
    lengths = np.asarray(pc.list_value_length(hist).to_numpy(zero_copy_only=False), dtype=np.int64)  # (B,)
    n = np.minimum(lengths, h)  # (B,) items kept: the most recent H
    j = np.arange(h)  # (H,)
    valid = j[None, :] < n[:, None]  # (B, H)
    take = np.where(valid, (np.cumsum(lengths) - n)[:, None] + j[None, :], 0)  # (B, H) index into flat
    items = np.where(valid, flat[take] if len(flat) else 0, -1).astype(np.int32)  # (B, H), -1 = no item
    new = np.ones(rows, dtype=bool)  # (B,) first row of a run of equal histories
    new[1:] = (items[1:] != items[:-1]).any(axis=1)
    built = _sessions(items[new], index)  # (U, G, L)
    return built if new.all() else built[np.cumsum(new) - 1]  # (B, G, L)


def _sessions(items: np.ndarray, index: CatalogIndex) -> np.ndarray:
    """(U, H) item positions (-1 = none, items first) -> (U, G, L) int32 session ids."""
    tok = index.assembler
    cfg = tok.cfg
    n_g, n_p, n_l = cfg.num_sessions, cfg.items_per_session, cfg.session_tokens
    rows = len(items)
    out = np.full((rows, n_g, n_l), tok.pad_id, dtype=np.int32)  # (U, G, L)
    seg, seg_len = _segments(index)
    budget = seg.shape[1]
    slots = items.reshape(rows, n_g, n_p)  # (U, G, P)
    present = slots >= 0  # (U, G, P)
    safe = np.where(present, slots, 0)  # (U, G, P)
    length = np.where(present, seg_len[safe], 0).astype(np.int32)  # (U, G, P) tokens per item slot
    start = np.cumsum(length, axis=2, dtype=np.int32) - length  # (U, G, P) first column of each segment
    k = np.arange(budget, dtype=np.int32)  # (budget,)
    write = k < length[..., None]  # (U, G, P, budget)
    itype = np.dtype(np.int32 if out.size < 2**31 else np.int64)
    base = ((np.arange(rows, dtype=itype)[:, None] * n_g + np.arange(n_g, dtype=itype)) * n_l)  # (U, G)
    dest = (base[..., None] + start)[..., None] + k  # (U, G, P, budget) flat index of every token
    flat_out = out.reshape(-1)
    flat_out[dest[write]] = seg[safe][write]
    total = length.sum(axis=2)  # (U, G) tokens before EOS
    used = total > 0  # (U, G) sessions with at least one item
    flat_out[(base + total)[used]] = tok.eos_id
    return out


def candidate_ids(candidates: pa.ChunkedArray | pa.Array, index: CatalogIndex, width: int) -> np.ndarray:
    """Candidate lists of exactly ``width`` item ids -> (B, C, Lc) int32 by lookup in the
    precomputed content array."""
    cands = _list_array(candidates)
    pos = _positions(cands.flatten(), index, "candidates").reshape(len(cands), width)  # (B, C)
    return index.content[pos]  # (B, C, Lc)


def tensorize(plan: pa.Table, kind: str, index: CatalogIndex, negatives: int, targets: int = 1) -> pa.Table:
    """Plan rows of one kind (examples.PLAN_SCHEMA) -> rows of ``output_schema(kind)``."""
    schema = output_schema(kind, index.assembler.cfg, negatives, targets)
    if plan.num_rows == 0:
        return schema.empty_table()
    hist = _list_array(plan.column("history")).cast(_STR_LIST)
    cols: dict[str, pa.Array] = {"session_ids": _tensor(session_ids(hist, index))}
    if kind in EXAMPLE_KINDS:
        cols["history"] = hist  # what the teacher summarizes for this example
        width = (targets if kind == "train" else 1) * (1 + negatives)
        cands = _list_array(plan.column("candidates")).cast(_STR_LIST)
        if pc.any(pc.not_equal(pc.list_value_length(cands), width)).as_py():
            raise AssertionError(f"{kind}: every example must have {width} candidates (T x (1 + {negatives}))")
        cols["candidate_ids"] = _tensor(candidate_ids(cands, index, width))
        cols["candidate_item_ids"] = cands
        cols["labels"] = plan.column("labels").combine_chunks().cast(pa.list_(pa.int8()))
    elif kind in EVAL_KINDS:
        cols["history"] = hist
        cols["candidate_item_ids"] = plan.column("candidates").combine_chunks().cast(_STR_LIST)
        cols["labels"] = plan.column("labels").combine_chunks().cast(pa.list_(pa.int8()))
    else:
        cols["history"] = hist
    for name in schema.names:
        if name not in cols:
            cols[name] = plan.column(name).combine_chunks().cast(schema.field(name).type)
    return pa.table([cols[n] for n in schema.names], schema=schema)
