"""`embsum`: the command line. One config file (``--config``), dotted overrides (``train.lr=3e-4``),
``--address`` for an existing Ray cluster (a local one by default).

Pipeline stages run as their own Ray driver programs (``python -m train.<stage>``, ``serve.app``),
exactly as they run as Ray jobs on a cluster; ``embsum run`` starts one local Ray cluster and
chains them on it. Registry and client commands run in-process. Errors are one line (``--debug``
for the traceback) with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from embsum.config import Config, load_config

console = Console()
err = Console(stderr=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train and serve the EmbSum recommender on Ray. Every command takes --config "
                       "(default ray_config.yaml) and trailing KEY=VALUE overrides.")
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
    """A stage program failed and already printed its one-line error."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_STATE: dict[str, Any] = {"debug": False}
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


def _stage(module: str, config: str, overrides: list[str], *extra: str, title: str | None = None) -> dict[str, Any]:
    """Run ``python -m MODULE`` as its own Ray driver; return the JSON result it writes."""
    cfg = _config(config, overrides)
    result = cfg.workdir_path / "stages" / f"{module.split('.')[-1]}-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", module, "--config", config, "--result", str(result), *extra, *overrides]
    if _STATE["debug"]:
        cmd.insert(3, "--debug")
    console.rule(f"[bold]{title or module}")
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode == 1:  # the stage printed its own one-line error
        raise StageFailed(1)
    if proc.returncode != 0:
        raise CliError(f"{title or module} stopped with exit code {proc.returncode} (killed or crashed)")
    out = json.loads(result.read_text()) if result.is_file() else {}
    result.unlink(missing_ok=True)
    console.print(f"[green]✓[/green] {title or module} done in {time.perf_counter() - t0:.1f}s")
    return out


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
@app.command()
def prepare(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Validate, sessionize, build examples and tokenize the logs with Ray Data. Writes WORKDIR/data/
    (items.parquet, users/, train/, valid_examples/, valid/, test/, quarantine/, prepare_report.json)."""
    _stage("train.prepare", config, _ov(overrides, address), title="prepare")


@app.command()
def summarize(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Write one teacher summary per training user (data.teacher: offline or an OpenAI-compatible endpoint).
    Writes WORKDIR/data/summaries/ and summarize_report.json; cached responses are never paid twice."""
    _stage("train.summarize", config, _ov(overrides, address), title="summarize")


@app.command()
def train(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Train with Ray Train + DeepSpeed; log to MLflow; register the best checkpoint's model.
    Writes checkpoints under train.storage_path and a new registered model version."""
    _stage("train.train", config, _ov(overrides, address), title="train")


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
    _stage("train.evaluate", config, _ov(overrides, address), *extra, title="evaluate")


@app.command()
def embed(version: str = typer.Option(None, "--version", help="Version (default: serve.model_version or the alias)."),
          config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Precompute item CPEs and user UPEs (+ generated summaries) for a version. Writes
    EMBEDDINGS/v<VERSION>/ (items/, users/, manifest.json)."""
    _stage("train.embed", config, _ov(overrides, address), *(["--version", version] if version else []),
           title="embed")


@app.command()
def promote(version: str = typer.Argument(None, help="Version to promote (default: the newest)."),
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
    foreground until Ctrl-C, or --detach onto an existing cluster."""
    if detach and not address:
        raise CliError("--detach needs --address of a running Ray cluster (a local one would stop with this command)")
    _stage("serve.app", config, _ov(overrides, address), "deploy" if detach else "run", title="serve")


@serve_app.command("stop")
def serve_stop(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Shut Serve down on a running cluster."""
    _stage("serve.app", config, _ov(overrides, address or "auto"), "shutdown", title="serve stop")


@serve_app.command("status")
def serve_status(config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Print the Serve application status and the served model version."""
    out = _stage("serve.app", config, _ov(overrides, address or "auto"), "status", title="serve status")
    console.print_json(json.dumps(out, default=str))


@serve_app.command("rollout")
def serve_rollout(version: str = typer.Option(None, "--version", help="Version (default: the alias's)."),
                  config: str = ConfigOpt, address: str = AddressOpt, overrides: list[str] = OverridesArg) -> None:
    """Roll the running service to a version (default: where the alias points) in place; if it cannot load,
    the old version keeps serving and the error is printed."""
    extra = ["rollout", *(["--version", version] if version else [])]
    out = _stage("serve.app", config, _ov(overrides, address or "auto"), *extra, title="serve rollout")
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
    from embsum.pipeline import run_pipeline, select_stages
    from embsum.registry import RegistryError

    cfg = _config(config, _ov(overrides, address))
    try:
        chosen = select_stages(stages.split(",") if stages else None, serve=serve_demo)
        out = run_pipeline(cfg, config, _ov(overrides, address), stage=_stage, console=console, stages=chosen,
                           version=version, keep_serving=keep_serving)
    except RegistryError as e:
        raise CliError(str(e)) from None
    if report:
        from embsum.stage import write_result

        write_result(report, out)


def main() -> None:
    argv = sys.argv[1:]
    if "--debug" in argv:
        argv.remove("--debug")
        _STATE["debug"] = True
        os.environ["EMBSUM_DEBUG"] = "1"
    try:
        app(args=argv, prog_name="embsum", standalone_mode=False)
    except CliError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except StageFailed as e:
        sys.exit(e.code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors, ValueErrors from config, anything else: one line
        import click

        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
            err.print(f"[red]error:[/red] {e.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if _STATE["debug"]:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        err.print(f"[red]error:[/red] {msg}" + ("" if _STATE["debug"] else " (--debug for the traceback)"),
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
