"""Whole-file checks on the driver, before any job runs: a wrong delimiter, a missing required
column or field, or a headerless file with the wrong column count is a problem of the file, not of
its rows, so ``preflight`` raises ``ValueError`` naming the file (row problems are quarantined by
embsum/data/records.py instead).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from embsum.data.fields import split_fields
from embsum.data.sources import HEAD_BYTES, Source, iter_lines, read_head, read_parquet_schema


def _head_lines(head: bytes) -> list[str]:
    lines = [raw.decode("utf-8", "replace") for _, raw in iter_lines(head)]
    return lines[:-1] if len(head) >= HEAD_BYTES and len(lines) > 1 else lines  # last one may be cut


def preflight(source: Source, fmt: str, required: Sequence[str], what: str,
              fixed_columns: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Fail fast on files that are wrong as a whole; return {uri: header columns} for csv/tsv.

    ``fixed_columns``: a headerless layout (MIND) whose lines must have exactly that many columns.
    """
    headers: dict[str, list[str]] = {}
    for ref in source.files:
        where = f"{what} file {ref.uri!r}"
        if fmt == "parquet":
            names = read_parquet_schema(source, ref).names
            missing = [c for c in required if c not in names]
            if missing:
                raise ValueError(f"{where}: missing required column(s) {missing}; it has {names}")
            continue
        lines = _head_lines(read_head(source, ref))
        if not lines:
            continue  # an empty file holds no rows; nothing to check
        if fmt == "jsonl":
            objs = []
            for text in lines[:200]:
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    objs.append(obj)
            if not objs:
                raise ValueError(f"{where}: expected JSON lines (one object per line); none of its first "
                                 f"{min(len(lines), 200)} lines is a JSON object")
            missing = [c for c in required if not any(c in o for o in objs)]
            if missing:
                raise ValueError(f"{where}: missing required field(s) {missing}; its objects have "
                                 f"{sorted({k for o in objs for k in o})}")
            continue
        delim = "tab" if fmt in ("tsv", "mind") else "comma"
        if fixed_columns is not None:
            counts = [len(split_fields(t, "tsv")) for t in lines[:200]]
            if not any(c == len(fixed_columns) for c in counts):
                raise ValueError(f"{where}: expected {len(fixed_columns)} {delim}-separated columns "
                                 f"{list(fixed_columns)} without a header; its first lines have "
                                 f"{sorted(set(counts))} column(s) (wrong delimiter or wrong file?)")
            continue
        header = [c.strip() for c in split_fields(lines[0].lstrip("\ufeff"), fmt)]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{where}: missing required column(s) {missing}; its header (line 1, "
                             f"{delim}-separated) is {header} (wrong delimiter or column mapping?)")
        data = lines[1:201]
        if len(header) > 1 and data and all(len(split_fields(t, fmt)) == 1 for t in data):
            raise ValueError(f"{where}: every line has 1 column but the header has {len(header)}; expected "
                             f"{delim}-separated values (wrong delimiter?)")
        headers[ref.uri] = header
    return headers
