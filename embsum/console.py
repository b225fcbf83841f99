"""The console a person reads while `embsum` runs stage programs: a rule per stage, live progress,
one summary line per stage; everything else in a log file per stage.

A stage program's stdout and stderr (its own lines, Ray's logs and the worker output Ray forwards
to it, DeepSpeed's banner, warnings) go, every line, to ``WORKDIR/logs/<stage>.log``. The console
shows only the stage's events (embsum/events.py): its progress, drawn live on a terminal (rich)
or, when stdout is not a terminal (CI, a pod log, ``| tee``), written as one line at most every
``EMBSUM_PROGRESS_INTERVAL`` seconds (default 15); and its summary line when it ends. A failing
stage's error line names its log file and shows the log's last relevant lines.

``--verbose`` (or ``EMBSUM_VERBOSE=1``, which the RayJob sets) also copies every line to the
console as it arrives, so nothing is hidden there either.

Warnings are fixed where they come from, not filtered. What the logs still hold from Ray and
DeepSpeed, and why it is not fixed here:
- ``core_worker.cc ... has constructor arguments in the object store and max_restarts > 0``, once
  per Ray Data actor pool (evaluate, embed, summarize) and for Ray Train's PreemptionWatcher: Ray
  Data hands every pool actor its DataContext and map function as object references and restarts
  pool actors on failure (max_restarts=-1), and Ray core flags any such actor, whatever the size of
  its arguments (ray-project/ray#57733; the restart limitation it warns of: #53727). Our actors'
  own arguments are small; turning restarts off would only trade the line for less fault tolerance.
- ``Exception in thread ...completion-signaler ... InterruptedError`` (now and then, from a read's
  file listing): a shutdown race in Ray Data's work-stealing file lister (ray/data/_internal/
  dynamic_work_queue.py, from ray-project/ray#64388): its signaler thread puts its stop markers after
  the consumer, already done, has interrupted the queue. Harmless: the listing had completed.
- ``FutureWarning: torch.distributed.all_gather_into_tensor is deprecated`` (once per train
  worker): DeepSpeed's ZeRO-1/2 optimizer calls it (deepspeed/runtime/zero/stage_1_and_2.py,
  deepspeed/runtime/utils.py); torch 2.13 renamed it all_gather_single. Our code calls no
  deprecated collective.
- ``(raylet) WARNING: 16 PYTHON worker processes have been started ... 4x the maximum expected
  startup concurrency (4)``, once or twice per train stage, in run.log and the stage's log: a
  heuristic for leaked workers (ray-project/ray#3644). A train run holds about that many workers
  for real: Train's controller, cleaner and preemption watcher, two train workers, Ray Data's
  split coordinators and stats, autoscaling and location actors, read tasks, and the idle
  workers runtime.local_system_config keeps (which it also sets the startup concurrency for).
- Ray Train's ``Reporting training result ...`` and Ray Data's execution plans and progress
  blocks: INFO lines, useful when reading a log.
Fixed in our setup instead: Train's ``PlacementGroupCleaner ... State API may be temporarily
unavailable`` (every second: the local cluster ran without the dashboard that serves the State
API; embsum/runtime.py now starts it and pins its address; under heavy machine load the State
API can still time out now and then), and read-only arrays handed to torch.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column

from embsum import events

DEFAULT_INTERVAL_S = 15.0
# A stage asked to stop (Ctrl-C, `embsum serve stop`) gets this long to end on its own before it is
# killed: it shuts Serve down with a bounded timeout and stops its local cluster.
STOP_GRACE_S = 30.0
# Lines that only repeat state the console already shows: kept out of a failure's "last lines".
_NOISE = ("======= Running Dataset", "Total Progress:", "=======")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def progress_interval() -> float:
    try:
        return max(0.5, float(os.environ.get("EMBSUM_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is under it (shorter to read), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _fmt_num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.4g}"


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class StageState:
    """What the console knows about a running stage, from its progress events."""

    name: str
    phase: str = "starting"
    done: float | None = None
    total: float | None = None
    unit: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    first: tuple[float, float] | None = None  # (time, done) of the phase's first count: the rate's origin
    last: tuple[float, float] | None = None  # (time, done) of its latest count
    summary: str = ""
    version: int = 0  # bumps on every change

    def update(self, fields: dict[str, Any]) -> None:
        phase = str(fields.get("phase") or self.phase)
        if phase != self.phase:  # a new phase starts its counts, rate and metrics afresh
            self.phase, self.phase_started, self.first, self.last = phase, time.monotonic(), None, None
            self.done = self.total = None
            self.unit, self.metrics = "", {}
        if "done" in fields:
            self.done = fields["done"]
        if "total" in fields:
            self.total = fields["total"]
        if fields.get("unit"):
            self.unit = str(fields["unit"])
        self.metrics.update(fields.get("metrics") or {})
        if self.done is not None:
            now = time.monotonic()
            if self.first is None:
                self.first = (now, float(self.done))
            if "done" in fields:
                self.last = (now, float(self.done))
        self.version += 1

    def rate(self) -> float | None:
        """Units per second between the phase's first and latest counts (None until they differ)."""
        if self.first is None or self.last is None:
            return None
        dt, dn = self.last[0] - self.first[0], self.last[1] - self.first[1]
        return dn / dt if dt > 0.5 and dn > 0 else None

    def counts(self) -> str:
        if self.done is None:
            return ""
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{_fmt_num(self.done)}/{_fmt_num(self.total)}{unit}"
        return f"{_fmt_num(self.done)}{unit}"

    def detail(self) -> str:
        """Rate, ETA and metrics: '1.9 steps/s · ETA 12s · loss 1.23 · val_auc 0.61'."""
        parts = []
        r = self.rate()
        if r:
            parts.append(f"{r:.3g} {self.unit or 'items'}/s")
            if self.total and self.done is not None and self.total > self.done:
                parts.append(f"ETA {_fmt_seconds((self.total - self.done) / r)}")
        parts += [f"{k} {_fmt_num(v)}" for k, v in self.metrics.items() if isinstance(v, (int, float))]
        return " · ".join(parts)

    def line(self) -> str:
        """One plain line for a non-terminal console."""
        body = " · ".join(p for p in (self.phase, self.counts(), self.detail()) if p)
        return f"  {self.name}: {body} · {_fmt_seconds(time.monotonic() - self.started)}"


class _Display:
    """Live rows on a terminal; a line every ``interval`` seconds, when something changed, elsewhere."""

    def __init__(self, console: Console, state: StageState, interval: float) -> None:
        self.console, self.state, self.interval = console, state, interval
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.last_line, self.last_version = time.monotonic(), 0
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.fields[name]}[/bold] {task.description}"),
                BarColumn(bar_width=20), TextColumn("{task.fields[counts]}"),
                TextColumn("[dim]{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                TimeElapsedColumn(), console=console, transient=True,
                # Not the process's own stdout/stderr: what Ray prints in this process belongs in its
                # log (embsum run sends fds 1 and 2 there), and a Live display would pass it through.
                redirect_stdout=False, redirect_stderr=False)
            self.task = self.progress.add_task(state.phase, total=None, name=state.name, counts="", detail="")
            self.progress.start()

    def refresh(self) -> None:
        s = self.state
        if self.progress is not None:
            self.progress.update(self.task, description=s.phase, total=s.total or None, completed=s.done or 0,
                                 counts=s.counts(), detail=s.detail())
            return
        now = time.monotonic()
        if s.version != self.last_version and now - self.last_line >= self.interval:
            self.console.print(s.line(), markup=False, highlight=False, soft_wrap=True)
            self.last_line, self.last_version = now, s.version

    def print_raw(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@dataclass
class StageOutcome:
    returncode: int
    seconds: float
    summary: str
    error: str  # the stage's own 'error: ...' line, without the prefix ('' if none)
    tail: list[str]  # the log's last relevant lines (for a failure)
    log: Path
    interrupted: bool = False


def _relevant_tail(lines: Sequence[str], error: str, n: int = 10) -> list[str]:
    """The last ``n`` lines worth showing after a failure: no events, blanks, Ray Data progress
    blocks, or the error line itself (printed on its own); from the last traceback if there is one."""
    keep = [ln for ln in lines if ln.strip() and events.parse(ln) is None
            and not any(m in ln for m in _NOISE) and not ln.startswith("error:")]
    tb = max((i for i, ln in enumerate(keep) if "Traceback (most recent call last)" in ln), default=None)
    if tb is not None and len(keep) - tb <= 3 * n:
        keep = keep[tb:]
        return keep if len(keep) <= 2 * n else keep[:3] + ["..."] + keep[-(2 * n - 4):]
    return keep[-n:]


def run_stage(cmd: Sequence[str], *, name: str, log: Path, console: Console, env: dict[str, str] | None = None,
              verbose: bool = False, interval: float | None = None) -> StageOutcome:
    """Run ``cmd`` with its output in ``log`` (overwritten) and its events on ``console``.

    Ctrl-C (SIGINT) or SIGTERM to this process asks the stage to stop: it gets SIGINT and
    ``STOP_GRACE_S`` to end, then SIGKILL; the outcome is marked ``interrupted``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    state = StageState(name)
    recent: deque[str] = deque(maxlen=400)
    error = ""
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8", errors="replace") as f:
        f.write(f"# embsum: {' '.join(cmd)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), name=f"embsum-{name}-output", daemon=True)
        reader.start()
        display = _Display(console, state, progress_interval() if interval is None else interval)
        interrupted = False
        stop_at: float | None = None
        ended_at: float | None = None
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            while True:
                try:
                    if stop_at is not None and time.monotonic() > stop_at and proc.poll() is None:
                        _kill(proc)
                    try:
                        line = lines.get(timeout=0.25)
                    except queue.Empty:
                        # Ended, and quiet: done, even if a process it started (a Ray daemon) still
                        # holds the pipe open, so no end-of-file will come.
                        if proc.poll() is not None and ended_at is not None and time.monotonic() - ended_at > 2:
                            break
                        if proc.poll() is not None and ended_at is None:
                            ended_at = time.monotonic()
                        display.refresh()
                        continue
                    if line is None:
                        break
                    f.write(line)
                    f.flush()
                    ev = events.parse(line)
                    if ev is None:
                        text = line.rstrip("\n")
                        recent.append(text)
                        if text.startswith("error:"):
                            error = text[len("error:"):].strip()
                        if verbose:
                            display.print_raw(text)
                    elif ev[0] == "progress":
                        state.update(ev[1])
                    elif ev[0] == "note":
                        display.print_raw(f"  {ev[1].get('text', '')}")
                    else:
                        state.summary = str(ev[1].get("text", ""))
                    display.refresh()
                except KeyboardInterrupt:
                    if stop_at is None:  # the first Ctrl-C/SIGTERM; later ones change nothing
                        interrupted, stop_at = True, time.monotonic() + STOP_GRACE_S
                        state.update({"phase": "stopping"})
                        _ask_to_stop(proc)
            proc.wait()
        finally:
            display.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:  # this process is going away (an exception): never leave the stage behind
                _kill(proc)
                proc.wait()
        f.write(f"# exit code {proc.returncode} after {time.monotonic() - t0:.1f}s\n")
    return StageOutcome(returncode=proc.returncode, seconds=time.monotonic() - t0, summary=state.summary, error=error,
                        tail=_relevant_tail(list(recent), error), log=log, interrupted=interrupted)


def _ask_to_stop(proc: subprocess.Popen) -> None:
    """SIGINT to the stage: what Ctrl-C would send it (a Python stage gets KeyboardInterrupt and
    cleans up). The stage runs in its own session, so this is the only signal it gets: a terminal's
    Ctrl-C reaches this process alone, and a second signal cannot cut the stage's clean-up short."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the stage's process group: the stage and whatever it started that stayed in it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


@contextmanager
def process_output_to(log: Path, *consoles: Console) -> Iterator[None]:
    """While inside: this process's own stdout and stderr (file descriptors 1 and 2: Python's prints
    and warnings, Ray's log lines and the messages Ray sends every driver, C++ logging) go to ``log``
    (appended); ``consoles`` keep writing where they wrote before. For `embsum run`, whose process
    holds the local Ray cluster the stages share."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [(c, c._file) for c in consoles]  # None: the console follows sys.stdout/sys.stderr
    own = [os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace") for fd in (1, 2)]
    for c, _ in saved:  # a console writing to fd 1 or 2 keeps writing to what they were (a terminal)
        fd = _fd(c.file)
        if fd in (1, 2):
            c.file = own[fd - 1]
    keep = [os.dup(1), os.dup(2)]
    with open(log, "a", encoding="utf-8", errors="replace") as target:
        target.write(f"# embsum: {' '.join(sys.argv)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        target.flush()
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(keep[0], 1)
            os.dup2(keep[1], 2)
            for fd in keep:
                os.close(fd)
            for c, f in saved:
                c._file = f  # back to what it was (None: following sys.stdout/sys.stderr)
            for f in own:
                f.close()


def _fd(f: Any) -> int | None:
    try:
        return f.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _pump(stream: IO[str] | None, out: queue.Queue[str | None]) -> None:
    if stream is not None:
        for line in stream:
            out.put(line)
    out.put(None)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
