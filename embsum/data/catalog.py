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
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embsum.config import EmbSumConfig
from embsum.data.records import DUPLICATE_ITEM
from embsum.tokenization import EmbSumTokenizer

QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                               ("raw", pa.string())])
_RESERVED = ("item_id", "text", "token_ids")


@functools.lru_cache(maxsize=4)
def cached_tokenizer(cfg: EmbSumConfig) -> EmbSumTokenizer:
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
    tokens: list[list[int]]
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
    bad = parsed.filter(pc.not_equal(parsed.column("reason"), ""))
    good = parsed.filter(pc.equal(parsed.column("reason"), "")).sort_by([("source", "ascending"),
                                                                         ("line", "ascending")])
    seen: set[str] = set()
    keep: list[int] = []
    dup: list[int] = []
    for i, item_id in enumerate(good.column("item_id").to_pylist()):
        (dup if item_id in seen else keep).append(i)
        seen.add(item_id)
    dups = good.take(pa.array(dup, pa.int64()))
    quarantine = pa.concat_tables([
        bad.select(QUARANTINE_SCHEMA.names),
        dups.select(["source", "line", "raw"]).append_column("reason", pa.array([DUPLICATE_ITEM] * len(dup),
                                                                                 pa.string()))
        .select(QUARANTINE_SCHEMA.names),
    ]).cast(QUARANTINE_SCHEMA)
    good = good.take(pa.array(keep, pa.int64()))
    ids = good.column("item_id").to_pylist()
    tokens = [list(t) for t in good.column("token_ids").to_pylist()]
    index = CatalogIndex(ids=ids, position={i: k for k, i in enumerate(ids)}, tokens=tokens,
                         content=tokenizer.content_batch(tokens),  # (N, Lc)
                         assembler=EmbSumTokenizer(SpecialIds.of(tokenizer), tokenizer.cfg))
    return Catalog(items=_items_table(good), quarantine=quarantine, index=index, rows_in=parsed.num_rows)


def _items_table(good: pa.Table) -> pa.Table:
    """items.parquet: item_id, text, token_ids, then every raw catalog column as str (for the
    offline teacher); a raw column named like one of the first three gets a 'raw_' prefix."""
    records = [json.loads(f) for f in good.column("fields").to_pylist()]
    names = list(dict.fromkeys(k for r in records for k in r))
    cols: dict[str, pa.Array] = {
        "item_id": good.column("item_id").combine_chunks(),
        "text": good.column("text").combine_chunks(),
        "token_ids": good.column("token_ids").combine_chunks(),
    }
    for name in names:
        out = f"raw_{name}" if name in _RESERVED else name
        cols[out] = pa.array([r.get(name, "") for r in records], pa.string())
    return pa.table(cols)
