"""`embsum`: the command line. One config file (``--config``), dotted overrides (``train.lr=3e-4``),
``--address`` for an existing Ray cluster (a local one by default).

Pipeline stages run as their own Ray driver programs (``python -m embsum.train.<stage>``,
``embsum.serve.control``: train/ and serve/ by their installed names), exactly as they run as Ray jobs
on a cluster; ``embsum run`` starts one local Ray cluster and chains them on it. A stage's output
(its own, Ray's, DeepSpeed's) goes to WORKDIR/logs/<stage>.log and the console shows its progress
and one summary line (embsum/console.py; ``--verbose`` shows everything). Registry and client
commands run in-process. Errors are one line (``--debug`` for the traceback) with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from embsum.config import Config, load_config

console = Console()
err = Console(stderr=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train and serve the EmbSum recommender on Ray. Every command takes --config "
                       "(default ray_config.yaml) and trailing KEY=VALUE overrides. --verbose (or EMBSUM_VERBOSE=1): "
                       "every stage's log lines on the console too (they are always in WORKDIR/logs/); "
                       "--debug: tracebacks.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic demo set.")
models_app = typer.Typer(no_args_is_help=True, help="Registry lookups (MLflow): versions, aliases, metrics.")
serve_app = typer.Typer(no_args_is_help=True, help="The Ray Serve app: start it (foreground or --detach), "
                                                     "status, rollout, stop.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")


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


_STATE: dict[str, Any] = {"debug": False, "verbose": False}
ConfigOpt = typer.Option("ray_config.yaml", "--config", "-c", help="Run config (YAML).")
AddressOpt = typer.Option(None, "--address", help="Existing Ray cluster ('auto', 'ray://host:10001', 'host:6379'); "
                                                   "default: start a local one.")
OverridesArg = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. train.max_steps=50.")


def _config(path: str, overrides: list[str] | None, address: str | None = None) -> Config:
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


def _ov(overrides: list[str] | None, address: str | None) -> list[str]:
    return [*(overrides or []), *([f"ray.address={address}"] if address else [])]


def _verbose() -> bool:
    from embsum.console import env_flag

    return bool(_STATE["verbose"]) or env_flag("EMBSUM_VERBOSE")


def _log_name(module: str, extra: tuple[str, ...]) -> str:
    """logs/<name>.log: the stage (prepare, train, ...), or serve / serve-<action> for serve.control."""
    name = module.split(".")[-1]
    if module == _program("serve"):
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


def _stage(module: str, config: str, overrides: list[str], *extra: str, title: str | None = None) -> dict[str, Any]:
    """Run ``python -m MODULE`` as its own Ray driver; return the JSON result it writes. Its output
    goes to WORKDIR/logs/<stage>.log, its progress and summary to the console (embsum/console.py)."""
    from embsum.console import run_stage, shown_path

    cfg = _config(config, overrides)
    result = cfg.workdir_path / "stages" / f"{module.split('.')[-1]}-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", module, "--config", config, "--result", str(result), *extra, *overrides]
    if _STATE["debug"]:
        cmd.insert(3, "--debug")
    title = title or module
    log = cfg.workdir_path / "logs" / f"{_log_name(module, extra)}.log"
    stage_header(title, log)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Its output is a file: Ray Data's progress from workers (a Train dataset's split coordinator) as
    # plain log lines, not tqdm bars redrawn with cursor codes that only a terminal can undo.
    env.setdefault("RAY_TQDM", "0")
    out = run_stage(cmd, name=title.split()[-1], log=log, console=console, env=env, verbose=_verbose())
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
    if out.tail and not _verbose():  # --verbose showed them already
        err.print(f"[dim]  last lines of {shown_path(out.log)}:[/dim]", highlight=False, soft_wrap=True)
        for line in out.tail:
            err.print(f"  | {line}", markup=False, highlight=False, soft_wrap=True)
    raise StageFailed(1)


# ---- data ---------------------------------------------------------------------------------------------
@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(None, "--out", help="Folder for behaviors.tsv + news.tsv "
                                                 "(default WORKDIR/data/synthetic)."),
    config: str = ConfigOpt, overrides: list[str] = OverridesArg,
) -> None:
    """Generate the synthetic MIND-format dataset (users with latent interests; sizes from data.synth_*;
    deterministic by data.seed). Writes behaviors.tsv and news.tsv."""
    from embsum.data import synth

    cfg = _config(config, overrides)
    d = cfg.data
    folder = out or cfg.data_dir / "synthetic"
    b, n = synth.ensure(folder, d.synth_users, d.synth_items, d.synth_impressions, d.seed)
    console.print(f"wrote {b} and {n}")


# ---- stages ---------------------------------------------------------------------------------------------
def _program(stage: str) -> str:
    """The stage's program module (embsum/pipeline.py STAGE_PROGRAMS: the one table `embsum run` uses too)."""
    from embsum.pipeline import STAGE_PROGRAMS

    return STAGE_PROGRAMS[stage]


@app.command()
def prepare(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Validate, sessionize, build examples and tokenize the logs with Ray Data. Writes WORKDIR/data/
    (items.parquet, users/, train/, valid_examples/, valid/, test/, quarantine/, prepare_report.json)."""
    _stage(_program("prepare"), config, _ov(overrides, address), title="prepare")


@app.command()
def summarize(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Write one teacher summary per training user (data.teacher: offline or an OpenAI-compatible endpoint).
    Writes WORKDIR/data/summaries/ and summarize_report.json; cached responses are never paid twice."""
    _stage(_program("summarize"), config, _ov(overrides, address), title="summarize")


@app.command()
def train(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Train with Ray Train + DeepSpeed; log to MLflow; register the best checkpoint's model.
    Writes checkpoints under train.storage_path and a new registered model version."""
    _stage(_program("train"), config, _ov(overrides, address), title="train")


@app.command()
def evaluate(version: str = typer.Option(None, "--version", help="Version number or alias (default: newest)."),
             impressions: str = typer.Option(None, "--impressions",
                                             help="Score new logs instead: a MIND-format behaviors file."),
             items: str = typer.Option(None, "--items", help="The new logs' catalog (the run config's item format)."),
             config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Score whole valid/test impressions for a registered version (Ray Data batch inference); print and log
    AUC, MRR, nDCG@5, nDCG@10. Writes WORKDIR/eval/v<VERSION>/<split>/ per-impression scores. With
    --impressions and --items: the same for new logs prepare never saw (bad rows quarantined)."""
    extra = [*(["--version", version] if version else []), *(["--impressions", impressions] if impressions else []),
             *(["--items", items] if items else [])]
    _stage(_program("evaluate"), config, _ov(overrides, address), *extra, title="evaluate")


@app.command()
def embed(version: str = typer.Option(None, "--version", help="Version (default: serve.model_version or the alias)."),
          config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Precompute item CPEs and user UPEs (+ generated summaries) for a version. Writes
    EMBEDDINGS/v<VERSION>/ (items/, users/, manifest.json)."""
    _stage(_program("embed"), config, _ov(overrides, address), *(["--version", version] if version else []),
           title="embed")


@app.command()
def promote(version: str | None = typer.Argument(None, help="Version to promote (default: the newest)."),
            force: bool = typer.Option(False, "--force", help="Skip the metric comparison (the version must "
                                                              "still have its embeddings)."),
            config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Move the alias (mlflow.alias, default 'champion') to a version whose embeddings exist if it beats the
    current champion's validation metric (the gate), or without comparing with --force. A registry failure is
    an error (exit 1) and leaves the alias where it was. Roll out (`embsum serve rollout`) to serve it."""
    from embsum.registry import Registry, RegistryError

    if version and "=" in version:
        overrides, version = [version, *(overrides or [])], None
    cfg = _config(config, overrides)
    try:
        reg = Registry(cfg)
        if version is None:
            vs = reg.versions()
            if not vs:
                raise CliError(f"no registered versions of {reg.name!r} at {reg.uri}")
            version = vs[-1].version
        ok, why = reg.gate(version, force=force)
    except (ValueError, RegistryError) as e:
        raise CliError(str(e)) from None
    console.print(("[green]promoted[/green]: " if ok else "[yellow]not promoted[/yellow]: ") + why)


# ---- serve ------------------------------------------------------------------------------------------------
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
        _stage(_program("serve"), config, _ov(overrides, address), "deploy" if detach else "run", title="serve")
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

    cfg = _config(config, overrides)
    record = foreground_record(cfg.workdir_path, cfg.serve.port)
    pid = None if address else foreground_pid(record)
    if pid is None:
        _stage(_program("serve"), config, _ov(overrides, address or "auto"), "shutdown", title="serve stop")
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
    out = _stage(_program("serve"), config, _ov(overrides, address or "auto"), "status", title="serve status")
    console.print_json(json.dumps(out, default=str))


@serve_app.command("rollout")
def serve_rollout(version: str = typer.Option(None, "--version", help="Version (default: the alias's)."),
                  config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Roll the running service to a version (default: where the alias points) in place; if it cannot load,
    the old version keeps serving and the error is printed."""
    extra = ["rollout", *(["--version", version] if version else [])]
    out = _stage(_program("serve"), config, _ov(overrides, address or "auto"), *extra, title="serve rollout")
    console.print_json(json.dumps(out, default=str))


# ---- registry ------------------------------------------------------------------------------------------------
_KEY_METRICS = ("valid_auc", "test_auc", "valid_mrr", "valid_ndcg10", "val_auc")


@models_app.command("list")
def models_list(config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Registered versions with aliases, key metrics, data fingerprint and teacher."""
    from embsum.registry import Registry, RegistryError

    reg = Registry(_config(config, overrides))
    try:
        versions = reg.versions()
    except RegistryError as e:
        raise CliError(str(e)) from None
    if not versions:
        console.print(f"no registered versions of {reg.name!r} at {reg.uri}")
        return
    t = Table(title=f"{reg.name} @ {reg.uri}")
    for col in ("version", "aliases", *_KEY_METRICS, "data", "teacher", "run"):
        t.add_column(col)
    for v in versions:
        t.add_row(v.version, ",".join(v.aliases), *(_fmt(v.metric(m)) for m in _KEY_METRICS),
                  v.tags.get("data_fingerprint", "")[:12], v.tags.get("teacher", ""), v.run_id[:8])
    console.print(t)


@models_app.command("show")
def models_show(version: str = typer.Argument(..., help="Version number or alias."),
                config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Everything about one version: source, tags, metrics."""
    from dataclasses import asdict

    from embsum.registry import Registry, RegistryError

    try:
        info = Registry(_config(config, overrides)).version(version)
    except (ValueError, RegistryError) as e:
        raise CliError(str(e)) from None
    console.print_json(json.dumps(asdict(info), default=str))


@models_app.command("compare")
def models_compare(a: str = typer.Argument(..., help="Version A."), b: str = typer.Argument(..., help="Version B."),
                   config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Metrics of two versions side by side, with B - A."""
    from embsum.registry import Registry, RegistryError

    reg = Registry(_config(config, overrides))
    try:
        va, vb = reg.version(a), reg.version(b)
    except (ValueError, RegistryError) as e:
        raise CliError(str(e)) from None
    t = Table(title=f"{reg.name}: v{va.version} vs v{vb.version}")
    for col in ("metric", f"v{va.version}", f"v{vb.version}", "B - A"):
        t.add_column(col)
    for m in sorted(set(va.metrics) | set(vb.metrics)):
        x, y = va.metric(m), vb.metric(m)
        t.add_row(m, _fmt(x), _fmt(y), _fmt(y - x if x is not None and y is not None else None))
    console.print(t)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


# ---- client ------------------------------------------------------------------------------------------------
def _base_url(cfg: Config, url: str | None) -> str:
    from embsum import client

    return url or client.base_url(cfg)


def _token(cfg: Config) -> str | None:
    from embsum import client

    try:
        return client.read_token(cfg.serve)
    except ValueError as e:
        raise CliError(str(e)) from None


@app.command()
def recommend(user_id: str = typer.Argument(..., help="A known user id."),
              k: int = typer.Option(5, "--k", "-k", help="How many items."),
              url: str = typer.Option(None, "--url", help="Service base URL (default from serve.host/port)."),
              config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Ask a running service for a user's top-k items (POST /v1/recommend) and print them."""
    from embsum import client

    cfg = _config(config, overrides)
    try:
        out = client.recommend(_base_url(cfg, url), user_id, k, token=_token(cfg))
    except client.ApiError as e:
        raise CliError(str(e)) from None
    _print_recs(out)


@app.command()
def score(user_id: str = typer.Argument(..., help="A known user id."),
          items: list[str] = typer.Argument(..., help="Candidate item ids."),
          url: str = typer.Option(None, "--url", help="Service base URL."),
          config: str = ConfigOpt) -> None:
    """Score candidate items for a user on a running service (POST /v1/score)."""
    from embsum import client

    cfg = _config(config, [])
    try:
        out = client.score(_base_url(cfg, url), items, user_id=user_id, token=_token(cfg))
    except client.ApiError as e:
        raise CliError(str(e)) from None
    console.print_json(json.dumps(out, default=str))


def _print_recs(out: dict[str, Any]) -> None:
    t = Table(title=f"top {len(out.get('items', []))} for {out.get('user_id')} (model v{out.get('model_version')})")
    t.add_column("#")
    t.add_column("item")
    t.add_column("score")
    t.add_column("text")
    for i, it in enumerate(out.get("items", []), 1):
        t.add_row(str(i), str(it.get("item_id")), f"{it.get('score', 0):.4f}", str(it.get("text", ""))[:70])
    console.print(t)


# ---- config ------------------------------------------------------------------------------------------------
@app.command("config")
def config_cmd(docs: bool = typer.Option(False, "--docs", help="Print the reference of every key (Markdown)."),
               config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Print the fully resolved config (after overrides), or with --docs the reference of every key."""
    from embsum.config import config_reference

    if docs:
        print(config_reference())
        return
    console.print_json(json.dumps(_config(config, overrides).to_dict(), default=str))


# ---- the whole pipeline ------------------------------------------------------------------------------------------
@app.command()
def run(config: str = ConfigOpt, address: str = AddressOpt,
        serve_demo: bool = typer.Option(True, "--serve/--no-serve", help="Start the Serve app and send requests."),
        keep_serving: bool = typer.Option(False, "--keep-serving", help="Keep the service up until Ctrl-C."),
        stages: str = typer.Option(None, "--stages", help="Comma-separated subset of prepare,summarize,train,"
                                                          "evaluate,embed,promote,serve (run in that order)."),
        version: str = typer.Option(None, "--version", help="The version later stages act on when train is not "
                                                            "among --stages."),
        report: Path = typer.Option(None, "--report", help="Also write the final report as JSON here."),
        overrides: list[str] = OverridesArg) -> None:
    """The whole pipeline: prepare -> summarize -> train -> evaluate -> embed -> promote (gate) -> serve, then a
    report (metrics, a user's generated summary, top-5 recommendations, where everything is). Every stage after
    train acts on the version train registered. On the embedded default: a local Ray cluster, MLflow in
    WORKDIR/mlflow, the synthetic demo data, the offline teacher."""
    from contextlib import nullcontext

    from embsum.console import process_output_to
    from embsum.pipeline import run_pipeline, select_stages
    from embsum.registry import RegistryError

    cfg = _config(config, _ov(overrides, address))
    # This process holds the local cluster: what Ray prints here (its start-up lines, messages it
    # sends every driver) goes to logs/run.log unless --verbose.
    quiet = nullcontext() if _verbose() else process_output_to(cfg.workdir_path / "logs" / "run.log", console, err)
    try:
        chosen = select_stages(stages.split(",") if stages else None, serve=serve_demo)
        with quiet:
            out = run_pipeline(cfg, config, _ov(overrides, address), stage=_stage, console=console, stages=chosen,
                               version=version, keep_serving=keep_serving, verbose=_verbose())
    except RegistryError as e:
        raise CliError(str(e)) from None
    if report:
        from embsum.stage import write_result

        write_result(report, out)


def _error(msg: str) -> None:
    err.print(Text.assemble(("error:", "red"), f" {msg}"), highlight=False, soft_wrap=True)


def main() -> None:
    argv = sys.argv[1:]
    if "--debug" in argv:
        argv.remove("--debug")
        _STATE["debug"] = True
        os.environ["EMBSUM_DEBUG"] = "1"
    for flag in ("--verbose", "-v"):
        if flag in argv:  # everything on the console: each stage's log lines as they come (see embsum/console.py)
            argv.remove(flag)
            _STATE["verbose"] = True
            os.environ["EMBSUM_VERBOSE"] = "1"
    try:
        app(args=argv, prog_name="embsum", standalone_mode=False)
    except CliError as e:
        _error(str(e))
        sys.exit(1)
    except StageFailed as e:
        sys.exit(e.code)
    except (Interrupted, KeyboardInterrupt):
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors, ValueErrors from config, anything else: one line
        import click

        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
            _error(e.format_message())
            sys.exit(e.exit_code)
        if _STATE["debug"]:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        _error(msg + ("" if _STATE["debug"] else " (--debug for the traceback)"))
        sys.exit(1)


if __name__ == "__main__":
    main()
