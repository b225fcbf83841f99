"""Numbered raw lines -> validated records, or quarantine rows that say why.

Three readers share one shape of output (``RECORD_SCHEMA``): one row per input row, either a
record (``reason == ''``) or a quarantine entry (``reason`` set, ``raw`` the line as read).

- MIND ``behaviors.tsv`` (5 tab-separated columns, no header): one row is one impression.
- generic logs (csv / tsv with a header, JSON lines, parquet rows read as typed columns): one row is one
  engagement, mapped by ``data.user_col`` / ``item_col`` / ``timestamp_col`` / ``label_col`` /
  ``impression_col``.
- catalogs (``CATALOG_SCHEMA``): MIND ``news.tsv`` (8 columns, no header) or a generic table keyed
  by ``data.item_id_col``, whose ``data.item_text_fields`` make the item's text.

What is quarantined, and why (a row is the unit: a row with any malformed field is not trusted):
'wrong column count', 'bad encoding' (not UTF-8), 'bad json', 'missing field' (JSON key absent),
'empty user id', 'empty item id', 'empty impression id', 'bad label' (not a number, or a MIND
candidate not ending in -0/-1), 'bad timestamp', 'no candidates' (MIND), 'item not in catalog',
'duplicate impression id' and 'duplicate item id' (decided later, globally, by the job).

Missing catalog ids are handled differently per format, on purpose. A log row names one item: if
that item has no text the row teaches nothing, so the row is quarantined. A MIND row names dozens:
real MIND samples reference many news ids that news.tsv lacks (see the data README), so unknown
candidates are dropped from the impression and unknown history ids from the history, each counted
(``n_missing_candidates``, ``n_missing_history``); the row is quarantined ('item not in catalog')
only when none of its ids is known, i.e. when nothing in it is usable.

Whole-file problems (wrong delimiter, a missing required column) are not row problems: ``preflight``
checks each file's head on the driver and raises ``ValueError`` naming the file before any job runs
(embsum/data/preflight.py). Field values (timestamps, text cells) are read by embsum/data/fields.py.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from embsum.config import DataConfig
from embsum.data.fields import decode_utf8, parse_time, split_fields, text_value
from embsum.data.preflight import preflight as preflight  # re-exported (tests and older importers)
from embsum.tokenization import format_item_text

MIND_BEHAVIOR_COLUMNS = ("impression_id", "user_id", "time", "history", "impressions")
MIND_NEWS_COLUMNS = ("news_id", "category", "subcategory", "title", "abstract", "url", "title_entities",
                     "abstract_entities")

WRONG_COLUMNS, BAD_ENCODING, BAD_JSON, MISSING_FIELD = "wrong column count", "bad encoding", "bad json", "missing field"
EMPTY_USER, EMPTY_ITEM, EMPTY_IMPRESSION = "empty user id", "empty item id", "empty impression id"
BAD_LABEL, BAD_TIMESTAMP, NO_CANDIDATES = "bad label", "bad timestamp", "no candidates"
NOT_IN_CATALOG, DUPLICATE_IMPRESSION = "item not in catalog", "duplicate impression id"
DUPLICATE_ITEM = "duplicate item id"

IGNORED = -1  # label of a row whose value is in data.ignore_labels: kept only as "the user saw it"

RECORD_SCHEMA = pa.schema([
    ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string()),
    ("user_id", pa.string()), ("impression_id", pa.string()), ("ts", pa.float64()),
    ("history", pa.list_(pa.string())), ("items", pa.list_(pa.string())), ("labels", pa.list_(pa.int8())),
    ("n_candidates", pa.int32()), ("n_clicks", pa.int32()), ("n_missing_candidates", pa.int32()),
    ("n_history", pa.int32()), ("n_missing_history", pa.int32()), ("n_ignored", pa.int32()),
])
CATALOG_SCHEMA = pa.schema([
    ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string()),
    ("item_id", pa.string()), ("text", pa.string()), ("fields", pa.string()), ("token_ids", pa.list_(pa.int32())),
])


@dataclass(frozen=True)
class LogSpec:
    """How one engagement log maps onto records (from DataConfig)."""

    fmt: str
    user_col: str
    item_col: str
    timestamp_col: str | None
    label_col: str | None
    impression_col: str | None
    positive_threshold: float
    ignore_labels: frozenset[float]

    @classmethod
    def from_config(cls, d: DataConfig, fmt: str) -> LogSpec:
        return cls(fmt, d.user_col, d.item_col, d.timestamp_col, d.label_col, d.impression_col,
                   d.positive_threshold, frozenset(float(x) for x in d.ignore_labels))

    @property
    def required(self) -> tuple[str, ...]:
        cols = (self.user_col, self.item_col, self.timestamp_col, self.label_col, self.impression_col)
        return tuple(dict.fromkeys(c for c in cols if c))


@dataclass(frozen=True)
class CatalogSpec:
    """How a catalog maps onto items: id column, text fields (in order), text cap."""

    fmt: str  # 'mind' or a table format
    item_id_col: str
    text_fields: tuple[str, ...]
    max_chars: int

    @classmethod
    def from_config(cls, d: DataConfig, fmt: str) -> CatalogSpec:
        id_col = "news_id" if fmt == "mind" else d.item_id_col
        return cls(fmt, id_col, tuple(d.item_text_fields), d.item_text_max_chars)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.item_id_col, *self.text_fields)))


# ---- rows -> records ------------------------------------------------------------------------

@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch transform builds many small objects
    (usable as a decorator). The transforms here allocate hundreds of thousands of lists, tuples
    and strings per batch and free them by reference counting (none forms a cycle), yet the cyclic
    collector, triggered every 700 allocations, keeps rescanning every live one. Measured on 20k
    MIND impressions: plan_batch 1.6 -> 0.9 CPU-s, parse_behaviors 0.69 -> 0.50. The previous
    state is restored, so nested uses and callers that paused it themselves keep theirs."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Out:
    """Column buffers for RECORD_SCHEMA / CATALOG_SCHEMA; one ``add`` per input row."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.cols: dict[str, list[Any]] = {n: [] for n in schema.names}
        self.defaults: dict[str, Any] = {f.name: ([] if pa.types.is_list(f.type) else (None if f.name == "ts" else
                         (0 if pa.types.is_integer(f.type) else ""))) for f in schema}

    def add(self, **values: Any) -> None:
        for name, col in self.cols.items():
            col.append(values.get(name, self.defaults[name]))

    def table(self) -> pa.Table:
        return pa.table({n: pa.array(v, self.schema.field(n).type) for n, v in self.cols.items()}, schema=self.schema)


def _rows(batch: pa.Table) -> Any:
    return zip(*(batch.column(c).to_pylist() for c in ("source", "line", "raw")), strict=True)


def _entries(batch: pa.Table, fmt: str, headers: dict[str, list[str]],
             fixed: Sequence[str] | None = None) -> Iterator[tuple[str, int, Any, str]]:
    """(source, line, field dict or quarantine reason, the row as text) for every row of a batch:
    numbered text lines (``raw``: decoded and split here) or parquet rows (``record``: already
    typed; their text, JSON, is made only when a row is quarantined or kept raw: ``_row_text``).
    ``fixed``: the columns of a headerless layout (MIND news), else each csv/tsv file's header."""
    if "record" in batch.column_names:
        for source, line, rec in zip(batch.column("source").to_pylist(), batch.column("line").to_pylist(),
                                     batch.column("record").to_pylist(), strict=True):
            yield source, line, rec, ""
        return
    for source, line, raw in _rows(batch):
        text = decode_utf8(raw)
        if text is None:
            yield source, line, BAD_ENCODING, raw.decode("utf-8", "backslashreplace")
        else:
            yield source, line, _record(text, fmt, fixed or headers.get(source)), text


def _row_text(rec: Any, text: str) -> str:
    """A row's text for quarantine/raw: the line as read, or a parquet row as JSON."""
    return text or json.dumps(rec, default=str, ensure_ascii=False)


def _record(text: str, fmt: str, header: Sequence[str] | None) -> dict[str, Any] | str:
    """One line -> field dict, or the quarantine reason."""
    if fmt in ("jsonl", "parquet"):
        try:
            obj = json.loads(text)
        except ValueError:
            return BAD_JSON
        return obj if isinstance(obj, dict) else BAD_JSON
    assert header is not None
    fields = split_fields(text, fmt)
    if len(fields) != len(header):
        return WRONG_COLUMNS
    return dict(zip(header, fields, strict=True))


@gc_paused()
def parse_behaviors(batch: pa.Table, known: Container[str], keep_raw: bool = True) -> pa.Table:
    """MIND behaviors lines -> one record per impression (candidates and history filtered to
    ``known`` catalog ids, the drops counted) or a quarantine row."""
    out = _Out(RECORD_SCHEMA)
    for source, line, raw in _rows(batch):
        text = decode_utf8(raw)
        if text is None:
            out.add(source=source, line=line, reason=BAD_ENCODING, raw=raw.decode("utf-8", "backslashreplace"))
            continue
        cols = text.split("\t")
        reason, ts, items, labels = "", None, [], []
        if len(cols) != 5:
            reason = WRONG_COLUMNS
        elif not cols[0].strip():
            reason = EMPTY_IMPRESSION
        elif not cols[1].strip():
            reason = EMPTY_USER
        elif (ts := parse_time(cols[2])) is None:
            reason = BAD_TIMESTAMP
        else:
            for tok in cols[4].split():
                item, sep, lab = tok.rpartition("-")
                if not sep or lab not in ("0", "1"):
                    reason = BAD_LABEL
                    break
                if not item:
                    reason = EMPTY_ITEM
                    break
                items.append(item)
                labels.append(int(lab))
            if not reason and not items:
                reason = NO_CANDIDATES
        if reason:
            out.add(source=source, line=line, reason=reason, raw=text)
            continue
        history = cols[3].split()
        kept_hist = [h for h in history if h in known]
        keep = [i for i, item in enumerate(items) if item in known]
        counts = dict(n_candidates=len(items), n_clicks=sum(labels), n_missing_candidates=len(items) - len(keep),
                      n_history=len(history), n_missing_history=len(history) - len(kept_hist))
        if not kept_hist and not keep:  # counted like the others: the report's totals cover every parsed row
            out.add(source=source, line=line, reason=NOT_IN_CATALOG, raw=text, **counts)
            continue
        out.add(source=source, line=line, raw=text if keep_raw else "", user_id=cols[1].strip(),
                impression_id=cols[0].strip(), ts=ts, history=kept_hist, items=[items[i] for i in keep],
                labels=[labels[i] for i in keep], **counts)
    return out.table()


@gc_paused()
def parse_logs(batch: pa.Table, spec: LogSpec, headers: dict[str, list[str]], known: Container[str],
               keep_raw: bool = False) -> pa.Table:
    """Log rows -> one record per engagement (label 1 positive, 0 negative, -1 ignored) or a
    quarantine row. ``keep_raw`` keeps good rows' text (needed when impression ids may collide)."""
    out = _Out(RECORD_SCHEMA)
    for source, line, rec, text in _entries(batch, spec.fmt, headers):
        if isinstance(rec, str):
            out.add(source=source, line=line, reason=rec, raw=text)
            continue
        reason, ts, label, imp = "", None, 1, ""
        if any(c not in rec for c in spec.required):
            reason = MISSING_FIELD
        elif not (user := text_value(rec[spec.user_col])):
            reason = EMPTY_USER
        elif not (item := text_value(rec[spec.item_col])):
            reason = EMPTY_ITEM
        elif spec.impression_col and not (imp := text_value(rec[spec.impression_col])):
            reason = EMPTY_IMPRESSION
        elif spec.timestamp_col and (ts := parse_time(rec[spec.timestamp_col])) is None:
            reason = BAD_TIMESTAMP
        elif spec.label_col:
            try:
                value = float(rec[spec.label_col])
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                reason = BAD_LABEL
            elif value in spec.ignore_labels:
                label = IGNORED
            else:
                label = int(value >= spec.positive_threshold)
        if not reason and item not in known:
            reason = NOT_IN_CATALOG
        if reason:
            out.add(source=source, line=line, reason=reason, raw=_row_text(rec, text))
            continue
        out.add(source=source, line=line, raw=_row_text(rec, text) if keep_raw else "", user_id=user,
                impression_id=imp, ts=ts,
                items=[item], labels=[label], n_candidates=1, n_clicks=int(label == 1), n_ignored=int(label == IGNORED))
    return out.table()


@gc_paused()
def parse_catalog(batch: pa.Table, spec: CatalogSpec, headers: dict[str, list[str]], tokenizer: Any) -> pa.Table:
    """Catalog rows -> items (id, formatted text, raw fields as JSON, token ids) or quarantine rows.
    ``tokenizer`` is an ``EmbSumTokenizer``: each item is tokenized here, once."""
    out = _Out(CATALOG_SCHEMA)
    good: list[dict[str, Any]] = []
    mind = spec.fmt == "mind"
    for source, line, rec, text in _entries(batch, "tsv" if mind else spec.fmt, headers,
                                            MIND_NEWS_COLUMNS if mind else None):
        if isinstance(rec, str):
            out.add(source=source, line=line, reason=rec, raw=text)
            continue
        if spec.item_id_col not in rec:
            out.add(source=source, line=line, reason=MISSING_FIELD, raw=_row_text(rec, text))
            continue
        item_id = text_value(rec[spec.item_id_col])
        if not item_id:
            out.add(source=source, line=line, reason=EMPTY_ITEM, raw=_row_text(rec, text))
            continue
        fields = {k: text_value(v) if not isinstance(v, (dict, list)) else json.dumps(v, default=str)
                  for k, v in rec.items()}
        good.append(dict(source=source, line=line, raw=_row_text(rec, text), item_id=item_id, fields=json.dumps(fields),
                         text=format_item_text(fields, spec.text_fields, spec.max_chars)))
    for rec, ids in zip(good, tokenizer.encode_texts([g["text"] for g in good]) if good else [], strict=True):
        out.add(**rec, token_ids=ids)
    return out.table()
