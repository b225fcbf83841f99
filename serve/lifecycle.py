"""How a Serve process stops: the signals that ask it to (Ctrl-C, SIGTERM from `embsum serve stop` or
Kubernetes) and a bounded ``serve.shutdown()``."""

from __future__ import annotations

import signal
import threading
from typing import Any

from ray import serve

from embsum.runtime import SERVE_STOP_TIMEOUT_S


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (`embsum serve stop`, a background `serve run`, Kubernetes) set ``stopping``
    from the moment this is entered until it exits, then the previous handlers come back. Armed before the
    foreground record is written: a stop that finds the record always reaches this handler, never the one
    Ray's driver installed for its local node (which would tear the node down without stopping Serve)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            signal.signal(s, lambda *_: self.stopping.set())
        return self

    def ignore(self) -> None:
        """Further signals are ignored while stopping: a second Ctrl-C must not cut the clean-up short
        and leave HAProxy or the cluster behind."""
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def shutdown_serve(timeout_s: float = SERVE_STOP_TIMEOUT_S) -> bool:
    """``serve.shutdown()``, waited on for at most ``timeout_s``: False if it did not finish (a dead
    or stuck controller: Serve retries its graceful-shutdown call forever and waits 30 s for it).
    For a cluster this process is about to stop, where a stuck Serve must not hold the exit up;
    Serve first, so its proxies stop their HAProxy processes (which a killed proxy would orphan)."""

    def stop() -> None:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - on the way out: the cluster stops next either way
            pass

    t = threading.Thread(target=stop, name="embsum-serve-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()
