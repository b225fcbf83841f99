"""`embsum models`: registry lookups (MLflow) in-process: versions with aliases and key metrics, one
version in full, two versions' metrics side by side."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from embsum.cli_stage import CliError, ConfigOpt, OverridesArg, cli_config, console

models_app = typer.Typer(no_args_is_help=True, help="Registry lookups (MLflow): versions, aliases, metrics.")

_KEY_METRICS = ("valid_auc", "test_auc", "valid_mrr", "valid_ndcg10", "val_auc")


@models_app.command("list")
def models_list(config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Registered versions with aliases, key metrics, data fingerprint and teacher."""
    from embsum.registry import Registry, RegistryError

    reg = Registry(cli_config(config, overrides))
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
        info = Registry(cli_config(config, overrides)).version(version)
    except (ValueError, RegistryError) as e:
        raise CliError(str(e)) from None
    console.print_json(json.dumps(asdict(info), default=str))


@models_app.command("compare")
def models_compare(a: str = typer.Argument(..., help="Version A."), b: str = typer.Argument(..., help="Version B."),
                   config: str = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Metrics of two versions side by side, with B - A."""
    from embsum.registry import Registry, RegistryError

    reg = Registry(cli_config(config, overrides))
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
