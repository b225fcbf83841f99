"""`embsum`: the command line. One config file (``--config``), dotted overrides (``train.lr=3e-4``),
``--address`` for an existing Ray cluster (a local one by default).

Pipeline stages run as their own Ray driver programs (``python -m embsum.train.<stage>``,
``embsum.serve.control``: train/ and serve/ by their installed names), exactly as they run as Ray jobs
on a cluster; ``embsum run`` starts one local Ray cluster and chains them on it. A stage's output
(its own, Ray's, DeepSpeed's) goes to WORKDIR/logs/<stage>.log and the console shows its progress
and one summary line (embsum/console.py; ``--verbose`` shows everything). Registry and client
commands run in-process. Errors are one line (``--debug`` for the traceback) with a non-zero exit code.

This module is the app, its top-level commands and ``main``; the ``serve`` and ``models`` command
groups are embsum/cli_serve.py and embsum/cli_models.py, and what every command shares (config,
errors, running a stage program) is embsum/cli_stage.py.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from embsum.cli_models import models_app
from embsum.cli_serve import serve_app
from embsum.cli_stage import (
    STATE,
    AddressOpt,
    CliError,
    ConfigOpt,
    Interrupted,
    OverridesArg,
    StageFailed,
    cli_config,
    console,
    err,
    program,
    stage,
    verbose,
    with_address,
)
from embsum.config import Config

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train and serve the EmbSum recommender on Ray. Every command takes --config "
                       "(default ray_config.yaml) and trailing KEY=VALUE overrides. --verbose (or EMBSUM_VERBOSE=1): "
                       "every stage's log lines on the console too (they are always in WORKDIR/logs/); "
                       "--debug: tracebacks.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic demo set.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")


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

    cfg = cli_config(config, overrides)
    d = cfg.data
    folder = out or cfg.data_dir / "synthetic"
    b, n = synth.ensure(folder, d.synth_users, d.synth_items, d.synth_impressions, d.seed)
    console.print(f"wrote {b} and {n}")


# ---- stages ---------------------------------------------------------------------------------------------
@app.command()
def prepare(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Validate, sessionize, build examples and tokenize the logs with Ray Data. Writes WORKDIR/data/
    (items.parquet, users/, train/, valid_examples/, valid/, test/, quarantine/, prepare_report.json)."""
    stage(program("prepare"), config, with_address(overrides, address), title="prepare")


@app.command()
def summarize(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Write one teacher summary per training user (data.teacher: offline or an OpenAI-compatible endpoint).
    Writes WORKDIR/data/summaries/ and summarize_report.json; cached responses are never paid twice."""
    stage(program("summarize"), config, with_address(overrides, address), title="summarize")


@app.command()
def train(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Train with Ray Train + DeepSpeed; log to MLflow; register the best checkpoint's model.
    Writes checkpoints under train.storage_path and a new registered model version."""
    stage(program("train"), config, with_address(overrides, address), title="train")


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
    stage(program("evaluate"), config, with_address(overrides, address), *extra, title="evaluate")


@app.command()
def embed(version: str = typer.Option(None, "--version", help="Version (default: serve.model_version or the alias)."),
          config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Precompute item CPEs and user UPEs (+ generated summaries) for a version. Writes
    EMBEDDINGS/v<VERSION>/ (items/, users/, manifest.json)."""
    stage(program("embed"), config, with_address(overrides, address), *(["--version", version] if version else []),
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
    cfg = cli_config(config, overrides)
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

    cfg = cli_config(config, overrides)
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

    cfg = cli_config(config, [])
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
    console.print_json(json.dumps(cli_config(config, overrides).to_dict(), default=str))


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

    cfg = cli_config(config, with_address(overrides, address))
    # This process holds the local cluster: what Ray prints here (its start-up lines, messages it
    # sends every driver) goes to logs/run.log unless --verbose.
    quiet = nullcontext() if verbose() else process_output_to(cfg.workdir_path / "logs" / "run.log", console, err)
    try:
        chosen = select_stages(stages.split(",") if stages else None, serve=serve_demo)
        with quiet:
            out = run_pipeline(cfg, config, with_address(overrides, address), stage=stage, console=console,
                               stages=chosen, version=version, keep_serving=keep_serving, verbose=verbose())
    except RegistryError as e:
        raise CliError(str(e)) from None
    if report:
        from embsum.stage import write_result

        write_result(report, out)


def _error(msg: str) -> None:
    err.print(Text.assemble(("error:", "red"), f" {msg}"), highlight=False, soft_wrap=True)


def main() -> None:
    from embsum.runtime import process_env

    process_env()
    argv = sys.argv[1:]
    if "--debug" in argv:
        argv.remove("--debug")
        STATE["debug"] = True
        os.environ["EMBSUM_DEBUG"] = "1"
    for flag in ("--verbose", "-v"):
        if flag in argv:  # everything on the console: each stage's log lines as they come (see embsum/console.py)
            argv.remove(flag)
            STATE["verbose"] = True
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
        if STATE["debug"]:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        _error(msg + ("" if STATE["debug"] else " (--debug for the traceback)"))
        sys.exit(1)


if __name__ == "__main__":
    main()
