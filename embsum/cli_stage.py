"""How a command of `embsum` runs: its config and overrides, its one-line errors, and a stage program.

A pipeline stage runs as its own Ray driver (``python -m embsum.train.<stage>``, ``embsum.serve.control``:
train/ and serve/ by their installed names; embsum/pipeline.py ``STAGE_PROGRAMS``), exactly as it runs as
a Ray job on a cluster. Its output (its own, Ray's, DeepSpeed's) goes to WORKDIR/logs/<stage>.log and the
console shows its progress and one summary line (embsum/console.py; ``--verbose`` shows everything).
The command modules (embsum/cli.py, cli_serve.py, cli_models.py) share what is here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from embsum.config import Config, load_config

console = Console()
err = Console(stderr=True)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


class StageFailed(Exception):
    """A stage program failed and its one-line error was printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM, or `embsum serve stop`) stopped a stage; it has ended."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


STATE: dict[str, Any] = {"debug": False, "verbose": False}
ConfigOpt = typer.Option("ray_config.yaml", "--config", "-c", help="Run config (YAML).")
AddressOpt = typer.Option(None, "--address", help="Existing Ray cluster ('auto', 'ray://host:10001', 'host:6379'); "
                                                   "default: start a local one.")
OverridesArg = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.max_steps=50.")


def cli_config(path: str, overrides: list[str] | None, address: str | None = None) -> Config:
    """The command's config: the file, its overrides and ``--address``; a bad one is a CliError."""
    ov = [o for o in (overrides or [])]
    bad = [o for o in ov if "=" not in o]
    if bad:
        raise CliError(f"unexpected argument {bad[0]!r}: overrides look like KEY=VALUE (e.g. train.lr=3e-4)")
    if address:
        ov.append(f"ray.address={address}")
    try:
        return load_config(path, ov)
    except ValueError as e:
        raise CliError(str(e)) from None


def with_address(overrides: list[str] | None, address: str | None) -> list[str]:
    """The overrides a stage program gets: the command's, plus ``ray.address`` from ``--address``."""
    return [*(overrides or []), *([f"ray.address={address}"] if address else [])]


def verbose() -> bool:
    """--verbose or EMBSUM_VERBOSE=1: every stage's log lines on the console too."""
    from embsum.console import env_flag

    return bool(STATE["verbose"]) or env_flag("EMBSUM_VERBOSE")


def program(name: str) -> str:
    """The stage's program module (embsum/pipeline.py STAGE_PROGRAMS: the one table `embsum run` uses too)."""
    from embsum.pipeline import STAGE_PROGRAMS

    return STAGE_PROGRAMS[name]


def _log_name(module: str, extra: tuple[str, ...]) -> str:
    """logs/<name>.log: the stage (prepare, train, ...), or serve / serve-<action> for serve.control."""
    name = module.split(".")[-1]
    if module == program("serve"):
        action = next((a for a in extra if a in ("run", "deploy", "rollout", "status", "shutdown")), "")
        return "serve" if action in ("run", "deploy", "") else f"serve-{action}"
    return name


def stage_header(title: str, log: Path) -> None:
    """The stage's rule, naming its log file (on a line of its own when the rule cannot hold it)."""
    from embsum.console import shown_path

    where = shown_path(log)
    text = f"{title} · log {where}"
    if len(text) + 8 <= console.width:
        console.rule(f"[bold]{title}[/bold] [dim]· log {where}[/dim]")
    else:
        console.rule(f"[bold]{title}")
        console.print(f"[dim]log {where}[/dim]", soft_wrap=True, highlight=False)


def stage(module: str, config: str, overrides: list[str], *extra: str, title: str | None = None) -> dict[str, Any]:
    """Run ``python -m MODULE`` as its own Ray driver; return the JSON result it writes. Its output
    goes to WORKDIR/logs/<stage>.log, its progress and summary to the console (embsum/console.py)."""
    from embsum.console import run_stage, shown_path

    cfg = cli_config(config, overrides)
    result = cfg.workdir_path / "stages" / f"{module.split('.')[-1]}-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", module, "--config", config, "--result", str(result), *extra, *overrides]
    if STATE["debug"]:
        cmd.insert(3, "--debug")
    title = title or module
    log = cfg.workdir_path / "logs" / f"{_log_name(module, extra)}.log"
    stage_header(title, log)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Its output is a file: Ray Data's progress from workers (a Train dataset's split coordinator) as
    # plain log lines, not tqdm bars redrawn with cursor codes that only a terminal can undo.
    env.setdefault("RAY_TQDM", "0")
    out = run_stage(cmd, name=title.split()[-1], log=log, console=console, env=env, verbose=verbose())
    if out.interrupted:
        console.print(f"[yellow]stopped[/yellow] {title} after {out.seconds:.1f}s (exit code {out.returncode}; "
                      f"log {shown_path(log)})", soft_wrap=True, highlight=False)
        result.unlink(missing_ok=True)
        raise Interrupted(out.returncode)
    if out.returncode != 0:
        _stage_error(title, out)
    data = json.loads(result.read_text()) if result.is_file() else {}
    result.unlink(missing_ok=True)
    console.print(f"[green]✓[/green] {title} {out.seconds:.1f}s" + (f" · {out.summary}" if out.summary else ""),
                  soft_wrap=True, highlight=False)
    return data


def _stage_error(title: str, out: Any) -> None:
    """One 'error:' line naming the stage and its log, then the log's last relevant lines."""
    from embsum.console import shown_path

    what = out.error or (f"stopped with exit code {out.returncode} (killed or crashed)" if out.returncode != 1
                         else "failed")
    err.print(Text.assemble(("error:", "red"), f" {title}: {what} (log: {shown_path(out.log)})"), highlight=False,
              soft_wrap=True)
    if out.tail and not verbose():  # --verbose showed them already
        err.print(f"[dim]  last lines of {shown_path(out.log)}:[/dim]", highlight=False, soft_wrap=True)
        for line in out.tail:
            err.print(f"  | {line}", markup=False, highlight=False, soft_wrap=True)
    raise StageFailed(1)
