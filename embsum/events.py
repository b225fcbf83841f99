"""What a stage program tells the person at the console: its progress and its one-line summary.

A stage (``python -m embsum.train.<stage>``, ``embsum.serve.control``) writes everything it and Ray have to say to
its stdout/stderr; ``embsum`` copies all of it to ``WORKDIR/logs/<stage>.log`` and shows on the
console only these events (embsum/console.py). An event is one line, ``embsum:<kind> <json>``:
readable in a log or a RayJob's output, and found anywhere in a line, because Ray prefixes the
lines it forwards from a worker (``(RayTrainWorker pid=123) embsum:progress {...}``).

Kinds: ``progress`` (a phase of the stage, optionally ``done`` of ``total`` ``unit`` and metrics
such as loss), ``summary`` (the stage's result in one line, shown when it ends) and ``note`` (a
line a person needs now, e.g. where a foreground service listens).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

MARK = "embsum:"
KINDS = ("progress", "summary", "note")


def _print(line: str) -> None:
    print(line, flush=True)


def emit(kind: str, out: Callable[[str], None] | None = None, **fields: Any) -> None:
    """Write one event line. ``out``: how (default: print to stdout); a Ray Train worker passes its
    logger, which Ray forwards to the driver."""
    assert kind in KINDS, kind
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()
             if v is not None}
    (out or _print)(f"{MARK}{kind} {json.dumps(clean, default=str, separators=(',', ':'))}")


def progress(phase: str, done: float | None = None, total: float | None = None, unit: str = "",
             out: Callable[[str], None] | None = None, **metrics: float | None) -> None:
    """``phase`` (what the stage is doing now), ``done``/``total`` in ``unit`` where countable, and
    metrics to show beside them (``loss=...``; None ones are left out)."""
    emit("progress", out, phase=phase, done=done, total=total, unit=unit or None,
         metrics={k: v for k, v in metrics.items() if v is not None} or None)


def summary(text: str, out: Callable[[str], None] | None = None) -> None:
    """The stage's result in one line (the console prints it when the stage ends)."""
    emit("summary", out, text=text)


def note(text: str, out: Callable[[str], None] | None = None) -> None:
    """A line shown on the console at once."""
    emit("note", out, text=text)


def parse(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(kind, fields)`` of the event in ``line``, or None for any other line (and a damaged one)."""
    at = line.find(MARK)
    if at < 0:
        return None
    kind, _, payload = line[at + len(MARK):].partition(" ")
    if kind not in KINDS:
        return None
    try:
        fields = json.loads(payload)
    except ValueError:
        return None
    return (kind, fields) if isinstance(fields, dict) else None
