"""Prometheus metrics of the Serve application, through Ray Serve's metrics API.

Ray exports them on each node's metrics port with a ``ray_`` prefix (``ray_embsum_requests_total``)
and adds the ``deployment``, ``replica`` and ``application`` tags; Ray Serve's own request
metrics (``ray_serve_*``) come on top. Created inside replicas only (the in-process bench app and
unit tests pass no observer), so importing this module has no side effect.

| name (as exported)                      | type      | tags           | what                                  |
| --------------------------------------- | --------- | -------------- | ------------------------------------- |
| ray_embsum_requests_total               | counter   | route, code    | HTTP requests answered by the ingress |
| ray_embsum_request_latency_ms           | histogram | route, code    | ingress latency, request in -> out    |
| ray_embsum_batch_size                   | histogram | kind           | requests per vectorized scorer call   |
| ray_embsum_cold_encodes_total           | counter   | kind           | users/items encoded on the fly        |
| ray_embsum_model_version                | gauge     | version        | 1 for the version a replica serves    |
| ray_embsum_catalog_items                | gauge     |                | items in the served embeddings        |
| ray_embsum_rollouts_total               | counter   | outcome        | reconfigure: loaded / failed / same   |

Ray exports a gauge only in the reports that follow a ``set``, and its metrics agent drops a gauge
series that no report refreshed for two report intervals (``metrics_report_interval_ms``, 10 s by
default): a gauge set once at a rollout vanished from the scrape about 20 s later, while counters
stayed. So a replica re-sets its two gauges every half interval (a daemon thread) for as long as it
serves. The previous version's series is not refreshed: it leaves the scrape after the TTL.
"""

from __future__ import annotations

import threading

LATENCY_MS_BOUNDARIES: list[float] = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def report_interval_s() -> float:
    """Ray's metrics report interval in this process (its ``metrics_report_interval_ms``, floored at
    1 s as Ray's exporter does); 10 s, Ray's default, outside a Ray worker."""
    try:
        import ray

        ms = float(ray._config.metrics_report_interval_ms())  # Ray's own recorder reads it the same way
    except Exception:  # noqa: BLE001 - no Ray config in this process
        ms = 10_000.0
    return max(ms, 1000.0) / 1000.0


class IngressMetrics:
    """Per-route request counts and latency (the API calls ``observe`` once per response)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        # Ray hints tag_keys as Tuple[str] (one key); it takes any number.
        self.requests = Counter("embsum_requests_total", description="HTTP requests by route and status code.",
                                tag_keys=("route", "code"))  # type: ignore[arg-type]
        self.latency = Histogram("embsum_request_latency_ms", description="Ingress latency in ms by route.",
                                 boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("route", "code"))  # type: ignore[arg-type]

    def observe(self, route: str, code: int, seconds: float) -> None:
        tags = {"route": route, "code": str(code)}
        self.requests.inc(tags=tags)
        self.latency.observe(seconds * 1000.0, tags=tags)


class ScorerMetrics:
    """Batching, cold path and model-version metrics of a scorer replica."""

    def __init__(self, refresh_s: float | None = None) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.batch_size = Histogram("embsum_batch_size", description="Requests per vectorized scoring call.",
                                    boundaries=BATCH_BOUNDARIES, tag_keys=("kind",))
        self.cold = Counter("embsum_cold_encodes_total", description="Users/items encoded on the fly (cold path).",
                            tag_keys=("kind",))
        self.version = Gauge("embsum_model_version", description="1 for the model version this replica serves.",
                             tag_keys=("version",))
        self.items = Gauge("embsum_catalog_items", description="Items in the served embeddings.")
        self.rollouts = Counter("embsum_rollouts_total", description="Reconfigure outcomes.", tag_keys=("outcome",))
        self._served: str | None = None
        self._items = 0
        self.refresh_s = refresh_s if refresh_s is not None else report_interval_s() / 2
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def batch(self, kind: str, size: int, cold_users: int, cold_items: int) -> None:
        self.batch_size.observe(size, tags={"kind": kind})
        if cold_users:
            self.cold.inc(cold_users, tags={"kind": "user"})
        if cold_items:
            self.cold.inc(cold_items, tags={"kind": "item"})

    def serving(self, version: str, items: int) -> None:
        """The replica now serves ``version`` with ``items`` items: set the gauges, and keep them set."""
        with self._lock:
            if self._served is not None and self._served != version:
                self.version.set(0, tags={"version": self._served})
            self._served, self._items = version, items
            self._set_gauges()
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="embsum-gauges", daemon=True)
                self._refresher.start()

    def _set_gauges(self) -> None:
        if self._served is not None:
            self.version.set(1, tags={"version": self._served})
            self.items.set(self._items)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                self._set_gauges()

    def close(self) -> None:
        """Stop refreshing the gauges (the replica is shutting down)."""
        self._stop.set()

    def rollout(self, outcome: str) -> None:
        self.rollouts.inc(tags={"outcome": outcome})
