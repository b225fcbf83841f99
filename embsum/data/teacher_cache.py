"""On-disk cache of teacher responses, so a rerun of the summarize stage never pays twice.

One small JSON file per key (``<dir>/<key[:2]>/<key>.json``) rather than one database: several
Ray actors on several processes (and, with a shared filesystem, several nodes) write at once, and
a file written to a unique temporary name then ``os.replace``d into place is atomic on POSIX, so a
reader sees either nothing or a whole entry, never a torn one, with no locks. Two workers racing
on the same key both write the same summary; the last rename wins, which is harmless.

Only successful responses are cached: a failed request must be retried by the next run.
The key covers what changes the answer: the prompt version, the model and the rendered prompt
(system and user messages). Sampling settings (temperature, max_tokens) are deliberately not in
the key: bump ``data.teacher.prompt_version`` when changing them on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any


def cache_key(prompt_version: str, model: str, messages: list[dict[str, str]]) -> str:
    """sha256 over prompt version, model and the rendered messages (hex, 64 chars).

    Fields are JSON-encoded as a list, so ('ab', 'c') and ('a', 'bc') cannot collide.
    """
    blob = json.dumps([prompt_version, model, [[m["role"], m["content"]] for m in messages]],
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TeacherCache:
    """A directory of ``key -> summary`` entries, safe for concurrent writers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"teacher cache key {key!r} is not a hex digest (use cache_key())")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached summary, or None when absent or unreadable (a corrupt entry is a miss)."""
        p = self._path(key)
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        summary = entry.get("summary") if isinstance(entry, dict) else None
        return summary if isinstance(summary, str) and summary else None

    def put(self, key: str, summary: str, meta: dict[str, Any] | None = None) -> None:
        """Write an entry atomically: temp file in the same directory, fsync'd, then renamed."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        entry = {"summary": summary, "created": time.time(), **(meta or {})}
        tmp = p.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if tmp.exists():  # the rename failed: do not leave temp files behind
                tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json"))
