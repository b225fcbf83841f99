"""`embsum serve`: start the Ray Serve app (foreground or --detach), its status, a rollout, stop.

Each runs the serve stage program (``embsum.serve.control``) as its own Ray driver (embsum/cli_stage.py);
``stop`` of a foreground server signals its process.
"""

from __future__ import annotations

import json
import time

import typer

from embsum.cli_stage import (
    AddressOpt,
    CliError,
    ConfigOpt,
    Interrupted,
    OverridesArg,
    cli_config,
    console,
    program,
    stage,
    with_address,
)

serve_app = typer.Typer(no_args_is_help=True, help="The Ray Serve app: start it (foreground or --detach), "
                                                     "status, rollout, stop.")


@serve_app.command("start")
def serve_start(detach: bool = typer.Option(False, "--detach", help="Deploy and return (needs a running cluster: "
                                                                     "--address)."),
                config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Start the Serve app (serve.app:build_app) for models:/NAME@ALIAS on serve.host:serve.port, in the
    foreground until Ctrl-C or `embsum serve stop` (then Serve and the local Ray cluster it started
    stop, exit code 0), or --detach onto an existing cluster."""
    if detach and not address:
        raise CliError("--detach needs --address of a running Ray cluster (a local one would stop with this command)")
    try:
        stage(program("serve"), config, with_address(overrides, address), "deploy" if detach else "run", title="serve")
    except Interrupted as e:
        if e.code != 0:
            raise
        # Ctrl-C / SIGTERM: the server stopped cleanly, which is how a foreground server ends.


@serve_app.command("stop")
def serve_stop(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Stop a foreground `embsum serve start` of this config (same workdir and serve.port): it shuts Serve
    down, stops the local Ray cluster it started and exits 0. With --address, or when no foreground
    server of this config runs: shut Serve down on that running cluster (default address: auto)."""
    from embsum.runtime import foreground_pid, foreground_record

    cfg = cli_config(config, overrides)
    record = foreground_record(cfg.workdir_path, cfg.serve.port)
    pid = None if address else foreground_pid(record)
    if pid is None:
        stage(program("serve"), config, with_address(overrides, address or "auto"), "shutdown", title="serve stop")
        return
    import psutil

    t0 = time.monotonic()
    proc = psutil.Process(pid)
    proc.terminate()  # SIGTERM: the server's signal to stop serving (serve/control.py serve_until_stopped)
    try:
        proc.wait(timeout=60)
    except psutil.TimeoutExpired:
        raise CliError(f"the server (pid {pid}) did not stop within 60s; its log: "
                       f"{cfg.workdir_path / 'logs' / 'serve.log'}") from None
    console.print(f"[green]✓[/green] stopped the server on port {cfg.serve.port} (pid {pid}) in "
                  f"{time.monotonic() - t0:.1f}s: Serve and its local Ray cluster are down", highlight=False,
                  soft_wrap=True)


@serve_app.command("status")
def serve_status(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Print the Serve application status and the served model version."""
    out = stage(program("serve"), config, with_address(overrides, address or "auto"), "status", title="serve status")
    console.print_json(json.dumps(out, default=str))


@serve_app.command("rollout")
def serve_rollout(version: str = typer.Option(None, "--version", help="Version (default: the alias's)."),
                  config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Roll the running service to a version (default: where the alias points) in place; if it cannot load,
    the old version keeps serving and the error is printed."""
    extra = ["rollout", *(["--version", version] if version else [])]
    out = stage(program("serve"), config, with_address(overrides, address or "auto"), *extra, title="serve rollout")
    console.print_json(json.dumps(out, default=str))

