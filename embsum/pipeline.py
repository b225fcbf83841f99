"""`embsum run`: the whole pipeline on one Ray cluster, ending with a served model and a report.

The stages are the same programs a KubeRay RayJob runs; here they share one local cluster that
this process starts (or the cluster at ``ray.address``), each stage attaching to it as a driver.

Versions are explicit (DESIGN.md 8): the train stage registers version N and every later stage is
told N, never "the newest" or "the alias": evaluate N, embed N, the gate on N (which promotes only
a version whose embeddings exist, so a replica never finds a champion without them), then the
serve stage rolls the app out to the version the gate leaves as champion, by number. ``STAGES``
is the one ordered list; the RayJob (cluster/base/pipeline.sh) runs ``embsum run --no-serve``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from embsum.config import Config
from embsum.embeddings import read_manifest, version_dir
from embsum.metrics import METRIC_NAMES
from embsum.runtime import SERVE_STOP_TIMEOUT_S

# The pipeline, in order. Each stage after train acts on the version train registered (or --version).
STAGES = ("prepare", "summarize", "train", "evaluate", "embed", "promote", "serve")
# Each stage's program: a Ray driver run as `python -m MODULE --config FILE [args] KEY=VALUE...` (the CLI's
# commands, `embsum run` and a RayJob run the same ones); promote runs in the caller's process.
STAGE_PROGRAMS = {"prepare": "embsum.train.prepare", "summarize": "embsum.train.summarize",
                  "train": "embsum.train.train", "evaluate": "embsum.train.evaluate", "embed": "embsum.train.embed",
                  "serve": "embsum.serve.control"}
_NEEDS_VERSION = ("evaluate", "embed", "promote", "serve")


def select_stages(names: Sequence[str] | None = None, serve: bool = True) -> list[str]:
    """``names`` (default: all) in pipeline order, without 'serve' when ``serve`` is False."""
    chosen = list(names) if names else list(STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages, in order: {','.join(STAGES)}")
    return [s for s in STAGES if s in chosen and (serve or s != "serve")]


def run_pipeline(cfg: Config, config_path: str, overrides: list[str], *, stage: Callable[..., dict[str, Any]],
                 console: Console, stages: Sequence[str] = STAGES, version: str | None = None,
                 keep_serving: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run ``stages`` (in STAGES order) on one Ray cluster; ``version`` is required when train is not
    among them and a later stage is. ``verbose``: this process's Ray connection forwards worker logs
    to the console too (every stage's own logs are in WORKDIR/logs/ either way)."""
    stages = select_stages(stages)
    if version is None and "train" not in stages and any(s in _NEEDS_VERSION for s in stages):
        raise ValueError(f"stages {','.join(stages)} act on one model version: give --version N (the version "
                         f"a train stage registered), or include train")
    t0 = time.perf_counter()
    own_cluster = cfg.ray.address is None
    ov = _hold_cluster(cfg, overrides, console, own=own_cluster, verbose=verbose)
    started: list[str] = []  # the stages begun, in order (a failed or interrupted one included)
    try:
        if version is not None:  # a number or an alias -> the number, once, at the start of the run
            from embsum.registry import Registry

            version = Registry(cfg).resolve(version).version
        out = _run_stages(cfg, config_path, ov, stage, console, stages, version, started)
        out["seconds"] = time.perf_counter() - t0
        _report(cfg, out, console)
        if "serve" in out and keep_serving:
            _serve_until_ctrl_c(cfg, console)
        return out
    finally:
        if own_cluster:
            _release_cluster(cfg, config_path, ov, serve_started="serve" in started)


def _hold_cluster(cfg: Config, overrides: list[str], console: Console, *, own: bool, verbose: bool) -> list[str]:
    """Start the local Ray cluster (``own``) or join the one at ``ray.address``; -> the overrides every
    stage gets (with the local cluster's address, so each stage attaches to it as a driver)."""
    import ray

    from embsum.console import shown_path
    from embsum.runtime import default_local_serve_drain, init_ray

    if own:
        # A stopping Serve replica keeps answering for the local drain period (not Ray's 30 s, never
        # less than HAProxy takes to stop routing to it: embsum/runtime.py). The serve stage
        # forwards RAY_SERVE_* variables to the controller and replicas.
        default_local_serve_drain()
    # This process only holds the cluster (the stages are its drivers): no worker of its own logs
    # anything, and Ray's cluster-wide messages (e.g. the raylet's) belong in the logs, not here.
    init_ray(cfg.ray, log_to_driver=verbose)
    ov = list(overrides)
    logs = shown_path(cfg.workdir_path / "logs")
    if own:
        ov.append(f"ray.address={ray.get_runtime_context().gcs_address}")
        console.print(f"local Ray cluster at {ray.get_runtime_context().gcs_address} "
                      f"({int(ray.cluster_resources().get('CPU', 0))} logical CPUs); each stage's log in {logs}/",
                      highlight=False, soft_wrap=True)
    return ov


def _release_cluster(cfg: Config, config_path: str, ov: list[str], *, serve_started: bool) -> None:
    """Stop the local cluster this run started. Serve first, when the serve stage started it, so its
    proxies stop their HAProxy processes (a killed proxy would orphan them): through the serve stage
    program (embsum/ holds no Serve code), bounded, so a stuck Serve cannot keep Ctrl-C waiting."""
    import ray

    if serve_started:
        log = cfg.workdir_path / "logs" / "serve.log"
        cmd = [sys.executable, "-m", STAGE_PROGRAMS["serve"], "shutdown", "--config", config_path, *ov]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"\n# embsum: {' '.join(cmd)}\n")
            f.flush()
            try:  # its own session: a second Ctrl-C at the terminal must not cut the shutdown short
                subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=SERVE_STOP_TIMEOUT_S + 60, start_new_session=True, check=False)
            except subprocess.TimeoutExpired:
                f.write("# embsum: Serve's shutdown timed out; stopping the cluster\n")
    ray.shutdown()


def _run_stages(cfg: Config, config_path: str, ov: list[str], stage: Callable[..., dict[str, Any]],
                console: Console, stages: Sequence[str], version: str | None, started: list[str]) -> dict[str, Any]:
    """Each of ``stages`` in order, every one after train on the version train registered (or
    ``version``); -> each stage's result by name, and the version they acted on. Each stage's name
    goes on ``started`` as it begins."""
    out: dict[str, Any] = {}
    for i, name in enumerate(stages, 1):
        started.append(name)
        title = f"{i}/{len(stages)} {name}"
        if name in ("prepare", "summarize", "train"):
            out[name] = stage(STAGE_PROGRAMS[name], config_path, ov, title=title)
            if name == "train":
                version = str(out["train"]["version"])
            continue
        assert version is not None  # run_pipeline: train ran, or --version was given
        if name == "evaluate":
            out["evaluate"] = stage(STAGE_PROGRAMS["evaluate"], config_path, ov, "--version", version, title=title)
        elif name == "embed":
            if _has_embeddings(cfg, cfg.mlflow.registered_model, version):
                console.rule(f"[bold]{title}")
                console.print(f"[green]✓[/green] {title} · embeddings for v{version} already exist at "
                              f"{version_dir(cfg.embeddings_dir, version)}", highlight=False, soft_wrap=True)
            else:
                out["embed"] = stage(STAGE_PROGRAMS["embed"], config_path, ov, "--version", version, title=title)
        elif name == "promote":
            console.rule(f"[bold]{title}")
            out["promote"] = _promote(cfg, version, console)
        else:  # serve: the version the gate left as champion, or the one given
            served = out["promote"]["serving"] if "promote" in out else version
            if served is None:
                raise ValueError(f"no version holds the alias {cfg.mlflow.alias!r} "
                                 f"({out['promote']['reason']}); nothing to serve")
            out["serve"] = _serve_and_ask(cfg, config_path, ov, stage, console, served, title)
    out["version"] = version
    return out


def _serve_until_ctrl_c(cfg: Config, console: Console) -> None:
    console.print(f"serving on http://{cfg.serve.host}:{cfg.serve.port} - Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping Serve and the local Ray cluster")


def _promote(cfg: Config, version: str, console: Console) -> dict[str, Any]:
    """The gate on ``version``; -> what it decided and which version holds the alias after it. A
    registry failure raises (RegistryError) and stops the run with the alias unchanged."""
    from embsum.registry import Registry

    registry = Registry(cfg)
    promoted, why = registry.gate(version)
    console.print(("[green]✓[/green] promoted: " if promoted else "[yellow]✓ not promoted[/yellow]: ") + why,
                  highlight=False, soft_wrap=True)
    champion = registry.champion()
    return {"promoted": promoted, "reason": why, "version": version,
            "serving": champion.version if champion is not None else None}


def _has_embeddings(cfg: Config, name: str, version: str) -> bool:
    try:
        m = read_manifest(version_dir(cfg.embeddings_dir, version))
    except ValueError:
        return False
    return m.model_name == name and str(m.model_version) == str(version)


def _serve_and_ask(cfg: Config, config_path: str, ov: list[str], stage: Callable[..., dict[str, Any]],
                   console: Console, version: str, title: str) -> dict[str, Any]:
    """Deploy ``version`` onto the cluster (or roll a running app out to it), then real HTTP
    requests: the model, a user's summary and top 5."""
    import pyarrow.dataset as pads

    from embsum import client
    from embsum.data import layout

    stage(STAGE_PROGRAMS["serve"], config_path, ov, "deploy", "--version", version, title=title)
    base = client.base_url(cfg)
    token = client.read_token(cfg.serve)
    client.wait_ready(base, timeout_s=120, token=token)
    users = pads.dataset(str(cfg.data_dir / layout.USERS), format="parquet").to_table(columns=["user_id", "split"])
    ids = users.column("user_id").to_pylist()
    splits = users.column("split").to_pylist()
    user = next((u for u, s in zip(ids, splits, strict=True) if s == "test"), ids[0])
    info = client.model(base, token)
    summary = client.summary(base, user, token)
    recs = client.recommend(base, user, 5, token)
    return {"url": base, "model": info, "user": user, "summary": summary, "recommend": recs}


def _report(cfg: Config, out: dict[str, Any], console: Console) -> None:
    console.rule("[bold green]EmbSum pipeline report")
    ev = out.get("evaluate", {})
    if ev:
        t = Table(title=f"evaluation of {cfg.mlflow.registered_model} v{ev.get('version')}")
        t.add_column("split")
        for m in METRIC_NAMES:
            t.add_column(m, justify="right")
        t.add_column("impressions", justify="right")
        for split in ("valid", "test"):
            if isinstance(ev.get(split), dict):
                r = ev[split]
                t.add_row(split, *(f"{r[m]:.4f}" for m in METRIC_NAMES), str(r["impressions"]))
        console.print(t)
    tr = out.get("train", {})
    if tr:
        auc = tr.get("val_auc")
        console.print(f"trained: run {tr.get('run_name')} best step {tr.get('step')} val_auc="
                      f"{f'{auc:.4f}' if isinstance(auc, float) else auc}; registered v{tr.get('version')} (val_auc: "
                      f"training's checkpoint choice, each validation example's positive against its sampled "
                      f"negatives; the table above ranks whole impressions)")
    pr = out.get("promote")
    if pr:
        console.print(f"gate: {pr['reason']}")
        if "serve" not in out and pr.get("serving"):
            console.print(f"to serve v{pr['serving']}: `embsum serve rollout --version {pr['serving']}`, or on "
                          f"KubeRay set user_config.model_version: \"{pr['serving']}\" (cluster/README.md)")
    sv = out.get("serve")
    if sv:
        console.print(Text.assemble("user ", (str(sv["user"]), "bold"), ", generated interest summary: ",
                                    (repr(sv["summary"].get("summary", "")), "italic")), soft_wrap=True)
        rows = [(str(i), str(it.get("item_id")), f"{it.get('score', 0):.4f}", str(it.get("text", "")))
                for i, it in enumerate(sv["recommend"].get("items", []), 1)]
        # One line per item: the text cut to what the console's width leaves (13 = borders and padding).
        room = max(10, console.width - 13 - sum(max([len(h), *(len(r[j]) for r in rows)])
                                                 for j, h in enumerate(("#", "item", "score"))))
        recs = Table(title=f"top 5 for {sv['user']} from {sv['url']} (model v{sv['recommend'].get('model_version')})")
        for name in ("#", "item", "score", "text"):
            recs.add_column(name, no_wrap=True, justify="right" if name == "score" else "left")
        for r in rows:
            recs.add_row(*r[:3], r[3] if len(r[3]) <= room else r[3][:room - 1] + "…")
        console.print(recs)
    console.print(_where(cfg), highlight=False, soft_wrap=True)
    console.print(f"open the MLflow UI: mlflow ui --backend-store-uri {cfg.tracking_uri}\n"
                  f"serve again: embsum serve start --config <this config>   (then: embsum recommend USER_ID)\n"
                  f"total {out.get('seconds', 0):.0f}s", highlight=False, soft_wrap=True)


def _where(cfg: Config) -> str:
    """'written under runs/: data/ checkpoints/ ...', naming in full what lies outside the workdir."""
    from embsum.console import shown_path

    w = cfg.workdir_path
    places = {"data": str(cfg.data_dir), "checkpoints": cfg.storage_path, "mlflow": cfg.tracking_uri,
              "artifacts": cfg.artifact_location, "embeddings": str(cfg.embeddings_dir), "eval": str(w / "eval"),
              "logs": str(w / "logs")}
    inside, outside = [], []
    for name, where in places.items():
        local = where.removeprefix("sqlite:///").removeprefix("file://")
        try:
            rel = Path(local).resolve().relative_to(w)
            inside.append(f"{rel.parts[0]}/" if rel.parts else name)
        except ValueError:
            outside.append(f"{name} {where}")
    line = f"written under {shown_path(w)}/: " + " ".join(dict.fromkeys(inside))
    return line + "".join(f"\n  {o}" for o in outside)
