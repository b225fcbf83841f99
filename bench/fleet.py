"""A serving fleet under closed-loop load: autoscaling, killed replicas, an alias move and a rollout.

Shared by the integration test (tests/integration/test_serve.py, which asserts on what it records)
and the benchmark (bench/fleet_bench.py, which reports it), so both exercise one scenario:

1. closed-loop load starts (each client sends its next request when the previous one answered);
2. autoscaling adds a replica: the time from load start to 2 RUNNING replicas is recorded;
3. one replica is killed with ``ray.kill`` (a crashed process, not a graceful stop) while the
   load goes on; Serve starts a replacement;
4. optionally the alias moves to another version and a replica is killed again: its replacement
   must load the fleet's pinned version, not the alias's;
5. optionally ``serve.control.rollout`` moves every replica to the alias's version, under load;
6. the load drops to one client (at most one request in flight: below a target of 1 per
   replica on any machine, but traffic all the same): autoscaling removes the extra replica while
   requests keep arriving, so the scale-down and the stopping replica's drain happen under load;
   the time to 1 replica (the stopped one gone) is recorded, then the load stops.

The replica states Serve reports are sampled throughout (``FleetRun.states``), so a caller can
check the shape of the run: one scale-up, one scale-down, no replica stopped in between other
than the killed ones.

Every request's send time, status and the model version it was answered by are kept, so any
window (before the kill, around it, during the rollout) can be counted afterwards. Needs a running
Serve app (``serve.control.deploy``) and the Ray connection of the process that deployed it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embsum.config import Config


@dataclass(frozen=True, slots=True)
class Outcome:
    sent: float  # time.monotonic() when the request was sent
    seconds: float
    status: int  # HTTP status; 0 = no response (connection error, timeout)
    version: str | None  # model_version of a 200 answer
    body: Any = None  # the parsed 200 body when ``keep_bodies`` (tests check every score)
    error: str = ""


class ClosedLoop:
    """``clients`` threads, each with one keep-alive HTTP connection, POSTing ``body`` to ``url``
    back to back until ``stop()``; ``lighten()`` keeps fewer of them sending, with a pause."""

    def __init__(self, url: str, body: dict[str, Any], clients: int, token: str | None = None, *,
                 timeout_s: float = 30.0, keep_bodies: bool = False) -> None:
        self.url, self.body, self.clients, self.timeout_s = url, body, clients, timeout_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.keep_bodies = keep_bodies
        self.outcomes: list[Outcome] = []  # appended by the client threads (list.append is atomic)
        self._active, self._pause_s = clients, 0.0  # read by the client threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> float:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True, name=f"load-{i}")
                         for i in range(self.clients)]
        t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return t0

    def lighten(self, clients: int = 1, pause_s: float = 0.05) -> float:
        """From now on only the first ``clients`` threads send, each pausing ``pause_s`` after every
        answer (a light load: in flight at most clients x latency / (latency + pause_s))."""
        self._pause_s, self._active = pause_s, clients
        return time.monotonic()

    def stop(self) -> float:
        self._stop.set()
        t = time.monotonic()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        return t

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(headers=self.headers, timeout=self.timeout_s) as http:
            while not self._stop.is_set():
                if index >= self._active:  # lightened: this client sends no more
                    self._stop.wait(0.1)
                    continue
                if self._pause_s:
                    self._stop.wait(self._pause_s)
                t0 = time.monotonic()
                try:
                    r = http.post(self.url, json=self.body)
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                    self.outcomes.append(Outcome(t0, time.monotonic() - t0, r.status_code,
                                                 body["model_version"] if ok else None,
                                                 body if ok and self.keep_bodies else None,
                                                 "" if ok else r.text[:200]))
                except Exception as e:  # noqa: BLE001 - a failed request is what the scenario counts
                    self.outcomes.append(Outcome(t0, time.monotonic() - t0, 0, None, None, repr(e)[:200]))

    def between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        """Requests sent in [start, end)."""
        return [o for o in list(self.outcomes) if start <= o.sent < end]


def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts of a window: requests, ok, failed (with the first few reasons), versions answered."""
    failed = [o for o in outcomes if o.status != 200]
    return {"requests": len(outcomes), "ok": len(outcomes) - len(failed), "failed": len(failed),
            "failure_samples": [f"{o.status} {o.error}" for o in failed[:5]],
            "versions": dict(Counter(o.version for o in outcomes if o.version is not None))}


# ---- the fleet as Serve sees it --------------------------------------------------------------------------
def replica_states(app: str, deployment: str) -> dict[str, int]:
    """{'RUNNING': n, 'STARTING': m, ...} of the deployment's replicas."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    states = status.deployments[deployment].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items() if v}


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> float:
    """Poll ``check`` until true -> time.monotonic() then; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not reached within {timeout_s:.0f}s")


def kill_replica(app: str, deployment: str) -> str:
    """``ray.kill`` one RUNNING replica of the deployment (its process dies, no graceful stop). A
    replica that is stopping (draining after a scale-down) is never picked: killing it would not
    change the running count the scenario waits on."""
    import ray
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    app_details = details.applications.get(app)
    replicas = app_details.deployments[deployment].replicas if app_details and deployment in \
        app_details.deployments else []
    names = sorted(r.actor_name for r in replicas if str(getattr(r.state, "value", r.state)) == "RUNNING"
                   and r.actor_name)
    if not names:
        raise RuntimeError(f"no RUNNING replica of {app}/{deployment} found")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def served_versions(app: str, replicas: int, timeout_s: float = 120.0) -> list[str | None]:
    """What each of ``replicas`` distinct replicas serves (their own report, not a response), asked
    until that many have answered or ``timeout_s`` passed (then fewer are returned). The driver's
    handle picks the replica itself and learns of a new one a while after Serve reports it
    RUNNING (later on a loaded machine), so a fixed number of calls may all reach the same one."""
    from serve.control import _replica_reports

    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas and time.monotonic() < deadline:
        seen.update((r["replica"], r) for r in _replica_reports(app, replicas, 10 * replicas))
        if len(seen) < replicas:
            time.sleep(0.5)
    return sorted((r["serving"] for r in seen.values()), key=str)


@dataclass
class FleetRun:
    """Times (time.monotonic()) of each step, and what the replicas reported."""

    marks: dict[str, float] = field(default_factory=dict)
    states: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (time, replica states)
    killed: list[str] = field(default_factory=list)
    pinned_after_restart: list[str | None] = field(default_factory=list)
    rollout: dict[str, Any] = field(default_factory=dict)

    def seconds(self, a: str, b: str) -> float:
        return self.marks[b] - self.marks[a]

    def kill_windows(self) -> list[tuple[float, float]]:
        """From each kill until its replacement ran ``settle_s``: where a killed replica may cost requests."""
        m = self.marks
        spans = [("kill", "kill_window_end"), ("alias_moved", "restart_window_end")]
        return [(m[a], m[b]) for a, b in spans if a in m and b in m]

    def states_between(self, start: float, end: float = float("inf")) -> list[dict[str, int]]:
        """The replica states sampled in [start, end)."""
        return [st for t, st in self.states if start <= t < end]

    def timeline(self) -> dict[str, float]:
        """Seconds of each step from the load start (the figures the bench reports)."""
        return {k: round(v - self.marks["load_start"], 2) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}


class _StateSampler:
    """Samples the deployment's replica states every ``interval_s`` into ``run.states``."""

    def __init__(self, run: FleetRun, app: str, deployment: str, interval_s: float = 0.25) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(run, app, deployment, interval_s), daemon=True,
                                        name="fleet-states")

    def _loop(self, run: FleetRun, app: str, deployment: str, interval_s: float) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                run.states.append((t, replica_states(app, deployment)))
            except Exception:  # noqa: BLE001 - a missed sample is not a failed run
                pass
            self._stop.wait(interval_s)

    def __enter__(self) -> _StateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_fleet(cfg: Config, load: ClosedLoop, *, app: str, deployment: str, move_alias_to: str | None = None,
              rollout: bool = False, settle_s: float = 3.0, timeout_s: float = 180.0,
              light_pause_s: float = 0.05) -> FleetRun:
    """The scenario of the module docstring on a deployed app with max_replicas >= 2 and a target
    of at least 1 request in flight per replica (the light load, one client with ``light_pause_s``
    between requests, must stay below it)."""
    run = FleetRun()
    m = run.marks

    def running(n: int) -> Callable[[], bool]:
        return lambda: replica_states(app, deployment).get("RUNNING", 0) == n

    def only(n: int) -> Callable[[], bool]:
        return lambda: replica_states(app, deployment) == {"RUNNING": n}

    with _StateSampler(run, app, deployment):
        m["load_start"] = load.start()
        try:
            m["two_replicas"] = wait_until("autoscaling to 2 replicas under load", running(2), timeout_s)
            time.sleep(settle_s)
            m["kill"] = time.monotonic()
            run.killed.append(kill_replica(app, deployment))
            wait_until("the killed replica's death seen by Serve", lambda: not running(2)(), timeout_s, 0.05)
            m["recovered"] = wait_until("a replacement for the killed replica", only(2), timeout_s)
            time.sleep(settle_s)
            m["kill_window_end"] = time.monotonic()
            if move_alias_to is not None:
                from embsum.registry import Registry

                Registry(cfg).promote(move_alias_to)
                m["alias_moved"] = time.monotonic()
                run.killed.append(kill_replica(app, deployment))
                wait_until("the second killed replica's death seen by Serve", lambda: not running(2)(),
                           timeout_s, 0.05)
                m["restarted"] = wait_until("a replacement after the alias moved", only(2), timeout_s)
                run.pinned_after_restart = served_versions(app, 2, timeout_s)
                time.sleep(settle_s)
                m["restart_window_end"] = time.monotonic()
            if rollout:
                from serve.control import rollout as roll

                m["rollout_start"] = time.monotonic()
                run.rollout = roll(cfg, name=app)
                m["rollout_end"] = time.monotonic()
                time.sleep(settle_s)
            m["load_light"] = load.lighten(1, light_pause_s)
            m["one_replica"] = wait_until("autoscaling back to 1 replica under light load", only(1), timeout_s)
        finally:
            m["load_stop"] = load.stop()
    return run
