"""The item catalog after validation: one row per item id, its text tokenized exactly once.

``build_catalog`` runs on the driver over the parsed catalog rows (the catalog is collected there
anyway: every history and candidate is checked against it, and its token ids are shipped to the
workers that assemble sessions). Duplicate item ids keep their first row in file order; the
later rows are quarantined ('duplicate item id'), since two texts for one id would make the
output depend on which row a worker happened to see.

``CatalogIndex`` is the compact read-only form the workers get through the object store: item ids,
their positions, token id lists and the (N, Lc) candidate arrays, so building a candidate is an
array lookup and building a session is concatenation; no worker calls the tokenizer again. It also
carries an ``assembler``: an ``EmbSumTokenizer`` over ``SpecialIds`` instead of a Hugging Face
tokenizer, so the workers that assemble sessions (``EmbSumTokenizer.sessions``, the one
implementation) never import transformers: that import costs a few CPU seconds per worker process,
measured as a large share of the job's CPU on small inputs.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from embsum.config import ModelConfig
from embsum.data.records import DUPLICATE_ITEM
from embsum.tokenization import EmbSumTokenizer

QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                               ("raw", pa.string())])
_RESERVED = ("item_id", "text", "token_ids")


@functools.lru_cache(maxsize=4)
def cached_tokenizer(cfg: ModelConfig) -> EmbSumTokenizer:
    """One tokenizer per process and model config: Ray workers are reused across tasks, so a
    worker loads the SentencePiece model once, not once per batch."""
    return EmbSumTokenizer.from_config(cfg)


@dataclass(frozen=True)
class SpecialIds:
    """The part of a tokenizer that id assembly uses: the marker, padding and EOS ids."""

    sos_token: str
    sos_id: int
    pad_token_id: int
    eos_token_id: int
    unk_token_id: int = -1

    @classmethod
    def of(cls, tok: EmbSumTokenizer) -> SpecialIds:
        return cls(tok.cfg.sos_token, tok.sos_id, tok.pad_id, tok.eos_id)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.sos_id if token == self.sos_token else self.unk_token_id


@dataclass
class CatalogIndex:
    """Item id -> position, token ids and candidate array; what every tensorizing worker reads."""

    ids: list[str]
    position: dict[str, int]
    tokens: pa.ListArray | Sequence[Sequence[int]]  # build_catalog gives Arrow: no Python int per token
    content: np.ndarray  # (N, Lc) int32: [SOS] text </s> padded, one row per item
    assembler: EmbSumTokenizer  # sessions()/content() only: built on SpecialIds, cannot tokenize text
    # Built on first use by tensorize (per process; a worker keeps the index across its tasks):
    id_array: pa.Array | None = field(default=None, repr=False, compare=False)  # ids as Arrow, for lookups
    segments: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.position


@dataclass
class Catalog:
    """``items``: the items.parquet table; ``quarantine``: duplicate rows; ``index``: for workers."""

    items: pa.Table
    quarantine: pa.Table
    index: CatalogIndex
    rows_in: int


def build_catalog(parsed: pa.Table, tokenizer: EmbSumTokenizer) -> Catalog:
    """Parsed catalog rows (records.CATALOG_SCHEMA, good and bad) -> the deduplicated catalog.

    Bad rows (reason set) go to ``quarantine`` as they are; good rows are ordered by (source,
    line) and the first row of each item id wins.
    """
    is_bad = pc.not_equal(parsed.column("reason"), "")
    bad = parsed.filter(is_bad).select(QUARANTINE_SCHEMA.names)
    # Row indices until the one take at the end: the parsed rows may live in the object store
    # (zero-copy), and every copy or page-in of them here is driver memory that grows with the catalog.
    good_rows = pa.array(np.flatnonzero(~np.asarray(is_bad.to_numpy(zero_copy_only=False))))  # (G,)
    keys = parsed.select(["source", "line", "item_id"]).take(good_rows)
    order = pc.sort_indices(keys, sort_keys=[("source", "ascending"), ("line", "ascending")])  # (G,)
    ranked = pa.table({"item_id": keys.column("item_id").take(order),
                       "_pos": pa.array(np.arange(len(order), dtype=np.int64))})
    first = ranked.group_by("item_id", use_threads=False).aggregate([("_pos", "min")]).column("_pos_min")
    is_first = np.zeros(len(order), dtype=bool)  # by (source, line) position: the first row of each id
    is_first[np.asarray(first.to_numpy(), dtype=np.int64)] = True
    ordered = np.asarray(good_rows.to_numpy(), dtype=np.int64)[np.asarray(order.to_numpy(), dtype=np.int64)]
    dups = parsed.select(["source", "line", "raw"]).take(pa.array(ordered[~is_first]))
    quarantine = pa.concat_tables([
        bad,
        dups.append_column("reason", pa.array([DUPLICATE_ITEM] * dups.num_rows, pa.string()))
        .select(QUARANTINE_SCHEMA.names),
    ]).cast(QUARANTINE_SCHEMA)
    good = parsed.select(["item_id", "text", "token_ids", "fields", "source"]).take(pa.array(ordered[is_first]))
    ids = good.column("item_id").to_pylist()
    tokens = good.column("token_ids").combine_chunks()
    index = CatalogIndex(ids=ids, position={i: k for k, i in enumerate(ids)}, tokens=tokens,
                         content=tokenizer.content_batch(tokens),  # (N, Lc)
                         assembler=EmbSumTokenizer(SpecialIds.of(tokenizer), tokenizer.cfg))
    return Catalog(items=_items_table(good), quarantine=quarantine, index=index, rows_in=parsed.num_rows)


def _items_table(good: pa.Table) -> pa.Table:
    """items.parquet: item_id, text, token_ids, then every raw catalog column as str (for the
    offline teacher); a raw column named like one of the first three gets a 'raw_' prefix."""
    cols: dict[str, pa.Array] = {
        "item_id": good.column("item_id").combine_chunks(),
        "text": good.column("text").combine_chunks(),
        "token_ids": good.column("token_ids").combine_chunks(),
    }
    for name, values in _raw_fields(good.column("fields"), good.column("source")).items():
        cols[f"raw_{name}" if name in _RESERVED else name] = values
    return pa.table(cols)


def _raw_fields(fields: pa.ChunkedArray, sources: pa.ChunkedArray) -> dict[str, pa.Array]:
    """The rows' raw fields (JSON objects of str -> str) as string columns, missing keys as "".
    Every row of one source file has that file's header as keys, so the names come from the first
    row of each source and Arrow's JSON reader parses the rest (no Python dict per item)."""
    if len(fields) == 0:
        return {}
    firsts = pc.index_in(pc.unique(sources), value_set=sources)  # (sources,) first row of each
    names = list(dict.fromkeys(k for i in firsts.to_pylist() for k in json.loads(fields[i].as_py())))
    schema = pa.schema([(n, pa.string()) for n in names])
    data = "\n".join(fields.to_pylist()).encode()
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=len(data) + 1),
                                  parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                                                     unexpected_field_behavior="error"))
    except pa.ArrowInvalid:  # a row with keys its source's first row lacks: the general path
        records = [json.loads(f) for f in fields.to_pylist()]
        names = list(dict.fromkeys(k for r in records for k in r))
        return {n: pa.array([r.get(n, "") for r in records], pa.string()) for n in names}
    return {n: pc.fill_null(table.column(n), "").combine_chunks() for n in names}
