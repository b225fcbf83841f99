"""The console a person reads (embsum/console.py, embsum/events.py): a stage's output goes to its log
file, the console shows its events; a failure names the log and shows its last lines; Ctrl-C asks
the stage to stop and waits for it. Stand-in stages are tiny Python programs (no Ray)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console

from embsum import events
from embsum.console import StageState, _relevant_tail, run_stage
from tests.conftest import REPO


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=100, force_terminal=False), buf


def _stage(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def test_events_round_trip_and_are_found_in_forwarded_lines(capsys) -> None:
    events.progress("training", 3, 12, "steps", loss=1.25, val_auc=None)
    events.summary("done: 12 steps")
    lines = capsys.readouterr().out.splitlines()
    assert events.parse(lines[0]) == ("progress", {"phase": "training", "done": 3, "total": 12, "unit": "steps",
                                                   "metrics": {"loss": 1.25}})
    # Ray prefixes what it forwards from a worker; the event is still found.
    assert events.parse("(RayTrainWorker pid=42) " + lines[1]) == ("summary", {"text": "done: 12 steps"})
    assert events.parse("embsum:progress {not json") is None and events.parse("plain line") is None


def test_state_line_has_counts_rate_eta_and_metrics(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    s = StageState("train")
    s.update({"phase": "training", "done": 2, "total": 12, "unit": "steps"})
    now[0] = 104.0
    s.update({"done": 6, "metrics": {"loss": 1.5}})
    line = s.line()
    assert "training · 6/12 steps · 1 steps/s · ETA 6s · loss 1.5" in line, line
    s.update({"phase": "registering"})  # a new phase starts afresh
    assert s.counts() == "" and s.metrics == {}


def test_output_goes_to_the_log_and_only_events_to_the_console(tmp_path: Path) -> None:
    cmd = _stage(tmp_path, """
        import sys
        from embsum import events
        print("ray says: a great deal")
        print("(RayTrainWorker pid=7) WARNING something Ray-internal", file=sys.stderr)
        for i in range(1, 4):
            events.progress("counting", i, 3, "rows")
        events.summary("3 rows counted")
    """)
    console, buf = _console()
    out = run_stage(cmd, name="count", log=tmp_path / "logs" / "count.log", console=console, env=_env(), interval=0.5)
    assert out.returncode == 0 and out.summary == "3 rows counted" and not out.interrupted
    log = (tmp_path / "logs" / "count.log").read_text()
    assert "ray says: a great deal" in log and "WARNING something Ray-internal" in log and "embsum:summary" in log
    shown = buf.getvalue()
    assert "ray says" not in shown and "WARNING" not in shown and "embsum:" not in shown


def test_verbose_shows_every_line(tmp_path: Path) -> None:
    cmd = _stage(tmp_path, """
        from embsum import events
        print("ray says: a great deal")
        events.summary("ok")
    """)
    console, buf = _console()
    run_stage(cmd, name="v", log=tmp_path / "v.log", console=console, env=_env(), verbose=True)
    assert "ray says: a great deal" in buf.getvalue() and "embsum:" not in buf.getvalue()


def test_non_terminal_progress_is_a_line_every_interval(tmp_path: Path) -> None:
    cmd = _stage(tmp_path, """
        import time
        from embsum import events
        for i in range(1, 13):
            events.progress("working", i, 12, "steps")
            time.sleep(0.25)
    """)
    console, buf = _console()
    run_stage(cmd, name="w", log=tmp_path / "w.log", console=console, env=_env(), interval=1.0)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 4, lines  # ~3 s of work: a line a second at most, never one per event
    assert all(ln.startswith("  w: working · ") and "/12 steps" in ln for ln in lines), lines


def test_a_failure_keeps_its_error_line_and_relevant_tail(tmp_path: Path) -> None:
    cmd = _stage(tmp_path, """
        import sys
        from embsum import events
        events.progress("loading", 1, 2, "steps")
        print("======= Running Dataset: x =======")
        print("the detail that explains it")
        print("error: bad things (rerun with --debug)", file=sys.stderr)
        sys.exit(1)
    """)
    console, _ = _console()
    out = run_stage(cmd, name="f", log=tmp_path / "f.log", console=console, env=_env())
    assert out.returncode == 1 and out.error == "bad things (rerun with --debug)"
    assert out.tail == ["the detail that explains it"]


def test_tail_starts_at_the_last_traceback() -> None:
    lines = ["noise"] * 50 + ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: no"]
    assert _relevant_tail(lines, "")[0] == "Traceback (most recent call last):"


def test_ctrl_c_asks_the_stage_to_stop_and_waits_for_it(tmp_path: Path) -> None:
    """SIGINT to the `embsum`-side process: the stage (its own session, so a terminal's Ctrl-C reaches
    only the parent) gets one SIGINT, cleans up, and the parent returns within seconds."""
    stage = _stage(tmp_path, """
        import signal, sys, time
        from embsum import events
        stop = []
        signal.signal(signal.SIGINT, lambda *a: stop.append(1))
        events.note("serving - Ctrl-C to stop")
        while not stop:
            time.sleep(0.05)
        print("stage: got SIGINT, cleaning up", flush=True)
        time.sleep(0.5)
        sys.exit(0)
    """)
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rich.console import Console
        from embsum.console import run_stage
        out = run_stage({stage!r}, name="s", log=Path({str(tmp_path / 's.log')!r}), console=Console())
        print("interrupted" if out.interrupted else "not interrupted", out.returncode, flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(parent)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert "serving - Ctrl-C to stop" in p.stdout.readline()
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 10 and p.returncode == 0, rest
    assert "interrupted 0" in rest
    assert "got SIGINT, cleaning up" in (tmp_path / "s.log").read_text()
