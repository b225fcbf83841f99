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

from embsum.config import EmbSumConfig
from embsum.data.catalog import CatalogIndex

EXAMPLE_KINDS = ("train", "valid_examples")
EVAL_KINDS = ("valid", "test")
_STR_LIST = pa.list_(pa.string())


def output_schema(kind: str, cfg: EmbSumConfig, negatives: int) -> pa.Schema:
    """The columns layout.py promises for ``kind`` (train, valid_examples, valid, test, users)."""
    sessions = pa.fixed_shape_tensor(pa.int32(), [cfg.num_sessions, cfg.session_tokens])  # (G, L)
    if kind in EXAMPLE_KINDS:
        cands = pa.fixed_shape_tensor(pa.int32(), [1 + negatives, cfg.content_tokens])  # (C, Lc)
        return pa.schema([("example_id", pa.string()), ("user_id", pa.string()), ("impression_id", pa.string()),
                          ("session_ids", sessions), ("candidate_ids", cands), ("candidate_item_ids", _STR_LIST)])
    if kind in EVAL_KINDS:
        return pa.schema([("impression_id", pa.string()), ("user_id", pa.string()), ("session_ids", sessions),
                          ("history", _STR_LIST), ("candidate_item_ids", _STR_LIST), ("labels", pa.list_(pa.int8()))])
    if kind == "users":
        return pa.schema([("user_id", pa.string()), ("split", pa.string()), ("history", _STR_LIST),
                          ("session_ids", sessions)])
    raise ValueError(f"unknown output kind {kind!r}; expected one of train, valid_examples, valid, test, users")


def _tensor(arr: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr, dtype=np.int32))


def session_ids(histories: list[list[str]], index: CatalogIndex) -> np.ndarray:
    """Histories (item ids, oldest first) -> (B, G, L) int32; each distinct history built once."""
    tok = index.assembler
    cfg = tok.cfg
    out = np.empty((len(histories), cfg.num_sessions, cfg.session_tokens), dtype=np.int32)  # (B, G, L)
    built: dict[tuple[str, ...], np.ndarray] = {}
    for b, hist in enumerate(histories):
        key = tuple(hist)
        s = built.get(key)
        if s is None:
            s = built[key] = tok.sessions([index.tokens[index.position[i]] for i in hist])  # (G, L)
        out[b] = s
    return out


def candidate_ids(candidates: list[list[str]], index: CatalogIndex) -> np.ndarray:
    """Fixed-size candidate lists -> (B, C, Lc) int32 by lookup in the precomputed content array."""
    pos = np.array([[index.position[c] for c in row] for row in candidates], dtype=np.int64)  # (B, C)
    return index.content[pos]  # (B, C, Lc)


def tensorize(plan: pa.Table, kind: str, index: CatalogIndex, negatives: int) -> pa.Table:
    """Plan rows of one kind (examples.PLAN_SCHEMA) -> rows of ``output_schema(kind)``."""
    schema = output_schema(kind, index.assembler.cfg, negatives)
    if plan.num_rows == 0:
        return schema.empty_table()
    hist = plan.column("history").to_pylist()
    cols: dict[str, pa.Array] = {"session_ids": _tensor(session_ids(hist, index))}
    if kind in EXAMPLE_KINDS:
        cands = plan.column("candidates").to_pylist()
        if any(len(c) != 1 + negatives for c in cands):
            raise AssertionError(f"{kind}: every example must have 1 + {negatives} candidates")
        cols["candidate_ids"] = _tensor(candidate_ids(cands, index))
        cols["candidate_item_ids"] = pa.array(cands, _STR_LIST)
    elif kind in EVAL_KINDS:
        cols["history"] = pa.array(hist, _STR_LIST)
        cols["candidate_item_ids"] = plan.column("candidates").combine_chunks().cast(_STR_LIST)
        cols["labels"] = plan.column("labels").combine_chunks().cast(pa.list_(pa.int8()))
    else:
        cols["history"] = pa.array(hist, _STR_LIST)
    for name in schema.names:
        if name not in cols:
            cols[name] = plan.column(name).combine_chunks().cast(schema.field(name).type)
    return pa.table([cols[n] for n in schema.names], schema=schema)
