"""The prepare stage's report (WORKDIR/data/prepare_report.json) and its one-line summary.

Built on the driver from the counts each user partition returned (every parsed row was counted by
exactly one partition) and the catalog: rows in and out, quarantined rows by reason, dropped ids,
examples, eval impressions and users per split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from embsum.config import Config
from embsum.data.catalog import Catalog
from embsum.data.partition import COUNTER_COLUMNS
from embsum.data.sources import Source


def build_report(cfg: Config, fp: str, inter: Source, items: Source, catalog: Catalog, stats: Counter,
                 seconds: float, outputs: tuple[str, ...]) -> dict[str, Any]:
    """The report from the partitions' counts (every parsed row was counted by exactly one);
    ``outputs``: the names written under WORKDIR/data."""
    reasons = Counter({k.removeprefix("input.reason."): v for k, v in stats.items() if k.startswith("input.reason.")})
    sums = {c: stats.get(f"input.sum.{c}", 0) for c in COUNTER_COLUMNS}  # over every parsed row
    rows_in, rows_out = stats.get("input.rows", 0), stats.get("input.good", 0)
    cat_reasons = Counter(catalog.quarantine.column("reason").to_pylist())
    examples = {k: stats.get(f"examples.{k}", 0) for k in ("train", "valid_examples")}
    n_examples = sum(examples.values())
    return {
        "status": "ok",
        "format": cfg.data.format,
        "fingerprint": fp,
        "inputs": {s.field: [{"uri": f.uri, "size": f.size, "mtime_ns": f.mtime_ns} for f in s.files]
                   for s in (inter, items)},
        "data_config": asdict(cfg.data),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "quarantined": sum(reasons.values()) + sum(cat_reasons.values()),
        "quarantined_by_reason": dict(sorted((reasons + cat_reasons).items())),
        "interactions": {"rows_in": rows_in, "rows_out": rows_out, "quarantined": sum(reasons.values()),
                         "quarantined_by_reason": dict(sorted(reasons.items()))},
        "items": {"rows_in": catalog.rows_in, "items": len(catalog.index), "quarantined": sum(cat_reasons.values()),
                  "quarantined_by_reason": dict(sorted(cat_reasons.items()))},
        "candidates": {"in": sums["n_candidates"], "clicked": sums["n_clicks"],
                       "dropped_not_in_catalog": sums["n_missing_candidates"]},
        "history_items": {"in": sums["n_history"], "dropped_not_in_catalog": sums["n_missing_history"]},
        "labels": {"positive": sums["n_clicks"], "ignored": sums["n_ignored"]},
        "dropped": {"item not in catalog": sums["n_missing_candidates"],
                    "history item not in catalog": sums["n_missing_history"], "ignored label": sums["n_ignored"]},
        "examples": examples,
        "eval_impressions": {k: stats.get(f"eval.{k}", 0) for k in ("valid", "test")},
        "users": {**{k: stats.get(f"users.{k}", 0) for k in ("train", "valid", "test")},
                  "total": sum(stats.get(f"users.{k}", 0) for k in ("train", "valid", "test"))},
        "skipped": {k: v for k, v in sorted(stats.items()) if k.startswith(("skipped.", "eval_skipped."))},
        "seconds": round(seconds, 3),
        "examples_per_s": round(n_examples / seconds, 1) if seconds > 0 else None,
        "outputs": {name: str(cfg.data_dir / name) for name in outputs},
    }


def summary_line(r: dict[str, Any]) -> str:
    """The report in one line, for the console."""
    ex = r["examples"]
    return (f"{r['rows_in']:,} rows in, {r['rows_out']:,} out, {r['quarantined']:,} quarantined; "
            f"{r['items']['items']:,} items, {r['users']['total']:,} users; examples {ex['train']:,} train + "
            f"{ex['valid_examples']:,} valid; eval impressions {r['eval_impressions']['valid']:,} valid + "
            f"{r['eval_impressions']['test']:,} test; {r['examples_per_s']:,} examples/s")

