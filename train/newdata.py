"""New logs for `embsum evaluate --impressions PATH --items PATH`: a MIND-format impressions file
(behaviors.tsv: impression id, user, time, history, candidates with -1/-0 labels) and a catalog that
prepare never saw, turned into the evaluation layout (embsum/data/layout.py) so the one scoring
path of ``train/evaluate.py`` scores them.

The version's own tokenizer (saved with the model) and item-text formatting (the catalog fields
and cap recorded in its metadata at training time; the run config's for versions older than that)
build the ids, so a model is judged on text formatted exactly as it was trained on. Bad rows are
quarantined as in prepare (file, line, reason), under ``<out>/quarantine/``, and counted.

Both files are read in chunks of lines on the driver (one chunk in memory at a time); impressions
go to parquet parts as they are parsed. The catalog is held whole, as prepare holds it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embsum.checkpoint import read_meta
from embsum.config import Config, ModelConfig
from embsum.data.catalog import QUARANTINE_SCHEMA, Catalog, build_catalog
from embsum.data.preflight import preflight
from embsum.data.records import CatalogSpec, parse_behaviors, parse_catalog
from embsum.data.sources import detect_format, read_chunk, resolve, split_lines
from embsum.data.tensorize import output_schema
from embsum.tokenization import EmbSumTokenizer, load_tokenizer

CHUNK_BYTES = 8 << 20
SPLIT = "new"


def version_tokenizer(model_dir: Path) -> EmbSumTokenizer:
    """The tokenizer saved with the version, over the version's model config."""
    meta = read_meta(model_dir)
    fields = {f for f in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**{k: v for k, v in meta["embsum"].items() if k in fields})
    return EmbSumTokenizer(load_tokenizer(str(model_dir / "tokenizer")), cfg)


def catalog_spec(cfg: Config, model_dir: Path, fmt: str) -> CatalogSpec:
    """The run config's catalog mapping with the version's recorded text fields and cap."""
    spec = CatalogSpec.from_config(cfg.data, fmt)
    meta = read_meta(model_dir).get("metadata") or {}
    if meta.get("item_text_fields"):
        spec = dc_replace(spec, text_fields=tuple(meta["item_text_fields"]),
                          max_chars=int(meta.get("item_text_max_chars", spec.max_chars)))
    return spec


def _lines(src: Any, headed: bool) -> Any:
    for chunk in split_lines(src, CHUNK_BYTES, headed):
        yield read_chunk(src.filesystem, chunk)


def _read_catalog(cfg: Config, model_dir: Path, items: str, tok: EmbSumTokenizer) -> Catalog:
    src = resolve(items, "--items")
    fmt = "mind" if cfg.data.format in ("mind", "synthetic") else detect_format(cfg.data.items_format, src, "--items")
    spec = catalog_spec(cfg, model_dir, fmt)
    table_fmt = "tsv" if fmt == "mind" else fmt
    if table_fmt == "parquet":
        raise ValueError("--items: a parquet catalog is not supported here; give tsv, csv or jsonl")
    headers = preflight(src, table_fmt, spec.required, "--items") if fmt != "mind" else {}
    parts = [parse_catalog(t, spec, headers, tok) for t in _lines(src, table_fmt in ("csv", "tsv"))]
    return build_catalog(pa.concat_tables(parts), tok)


def prepare_new_data(cfg: Config, model_dir: Path, impressions: str, items: str, out: Path) -> dict[str, Any]:
    """-> a report; writes out/items.parquet, out/new/*.parquet (impressions), out/quarantine/."""
    tok = version_tokenizer(model_dir)
    catalog = _read_catalog(cfg, model_dir, items, tok)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(catalog.items, out / "items.parquet")
    (out / SPLIT).mkdir(exist_ok=True)
    (out / "quarantine").mkdir(exist_ok=True)
    quarantine = [catalog.quarantine]
    stats: Counter = Counter()
    schema = output_schema("test", tok.cfg, 0)
    src = resolve(impressions, "--impressions")
    for part, lines in enumerate(_lines(src, headed=False)):
        recs = parse_behaviors(lines, catalog.index.position, keep_raw=False)
        bad = recs.filter(pa.compute.not_equal(recs.column("reason"), ""))
        quarantine.append(bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA))
        stats["rows"] += recs.num_rows
        stats["quarantined"] += bad.num_rows
        table = _impressions(recs.filter(pa.compute.equal(recs.column("reason"), "")), catalog, tok, stats)
        pq.write_table(table.cast(schema), out / SPLIT / f"part-{part:05d}.parquet")
    q = pa.concat_tables(quarantine)
    pq.write_table(q, out / "quarantine" / "part-00000.parquet")
    reasons = Counter(q.column("reason").to_pylist())
    return {"impressions_file": impressions, "items_file": items, "items": len(catalog.index),
            "rows": stats["rows"], "impressions": stats["impressions"], "quarantined": dict(reasons),
            "skipped_without_both_labels": stats["skipped"], "dropped_unknown_candidates": stats["unknown"]}


def _impressions(good: pa.Table, catalog: Catalog, tok: EmbSumTokenizer, stats: Counter) -> pa.Table:
    index = catalog.index
    rows: dict[str, list[Any]] = {k: [] for k in ("impression_id", "user_id", "history", "candidate_item_ids",
                                                  "labels")}
    sessions = []
    cols = [good.column(c).to_pylist() for c in ("impression_id", "user_id", "history", "items", "labels",
                                                 "n_missing_candidates")]
    for imp, user, hist, items, labels, missing in zip(*cols, strict=True):
        stats["unknown"] += int(missing or 0)
        if not items or sum(labels) in (0, len(labels)):
            stats["skipped"] += 1  # AUC needs a clicked and an unclicked candidate
            continue
        h = hist[-tok.cfg.num_sessions * tok.cfg.items_per_session:]
        sessions.append(tok.sessions([index.tokens[index.position[i]] for i in h]))  # (G, L)
        for k, v in (("impression_id", imp), ("user_id", user), ("history", h), ("candidate_item_ids", items),
                     ("labels", labels)):
            rows[k].append(v)
        stats["impressions"] += 1
    g, seq = tok.cfg.num_sessions, tok.cfg.session_tokens
    arr = np.stack(sessions) if sessions else np.zeros((0, g, seq), np.int32)  # (I, G, L)
    return pa.table({
        "impression_id": pa.array(rows["impression_id"], pa.string()),
        "user_id": pa.array(rows["user_id"], pa.string()),
        "session_ids": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr, np.int32)),
        "history": pa.array(rows["history"], pa.list_(pa.string())),
        "candidate_item_ids": pa.array(rows["candidate_item_ids"], pa.list_(pa.string())),
        "labels": pa.array(rows["labels"], pa.list_(pa.int8()))})
