"""`embsum run`'s order and version hand-over (embsum/pipeline.py) with recorded stage programs and
a real MLflow store (SQLite; no Ray: the stages are stand-ins, the gate is the real one).

Checks: stages run in STAGES order; every stage after train is told the number train registered;
the gate runs after embed and promotes that version only because its embeddings exist; a run
without train needs --version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from embsum import pipeline
from embsum.config import config_from_dict
from embsum.embeddings import Manifest, version_dir, write_manifest


@pytest.fixture()
def registered(tmp_path: Path, tiny_cfg, tokenizer):
    """A registry with a tiny model registered by a stand-in train stage."""
    from embsum.checkpoint import save_model
    from embsum.model import EmbSum
    from embsum.registry import Registry

    cfg = config_from_dict({"workdir": str(tmp_path), "ray": {"address": "auto"}})  # a cluster it does not own
    model_dir = save_model(EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0), tokenizer, tmp_path / "m")
    return cfg, Registry(cfg), model_dir


def run(cfg, registry, model_dir, monkeypatch, *, embed_writes: bool = True, **kw) -> tuple[dict, list]:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def stage(module: str, config: str, ov: list[str], *extra: str, title: str = "") -> dict[str, Any]:
        calls.append((module, extra))
        if module == "embsum.train.train":
            run_id = registry.start_run("t")
            registry.log_metrics(run_id, {"valid_auc": 0.7})
            v = registry.log_and_register(run_id, model_dir)
            registry.end_run(run_id)
            return {"version": v}
        if module == "embsum.train.embed" and embed_writes:
            v = extra[extra.index("--version") + 1]
            folder = version_dir(cfg.embeddings_dir, v)
            folder.mkdir(parents=True)
            write_manifest(folder, Manifest(model_name=registry.name, model_version=v, model_fingerprint="",
                                            items=1, users=1, dtype="float32", user_codes=1, content_codes=1,
                                            d_model=8))
        return {}

    monkeypatch.setattr("embsum.runtime.init_ray", lambda *a, **k: None)
    out = pipeline.run_pipeline(cfg, "ray_config.yaml", [], stage=stage, console=Console(quiet=True), **kw)
    return out, calls


def test_stages_run_in_order_on_the_version_train_registered(registered, monkeypatch):
    cfg, registry, model_dir = registered
    out, calls = run(cfg, registry, model_dir, monkeypatch, stages=pipeline.select_stages(serve=False))
    v = out["version"]
    assert calls == [("embsum.train.prepare", ()), ("embsum.train.summarize", ()), ("embsum.train.train", ()),
                     ("embsum.train.evaluate", ("--version", v)), ("embsum.train.embed", ("--version", v))]
    assert out["promote"]["promoted"] and out["promote"]["serving"] == v and registry.champion().version == v


def test_the_gate_refuses_a_version_without_embeddings(registered, monkeypatch):
    cfg, registry, model_dir = registered
    out, _ = run(cfg, registry, model_dir, monkeypatch, embed_writes=False, stages=["train", "embed", "promote"])
    assert not out["promote"]["promoted"] and "cannot serve: no embeddings" in out["promote"]["reason"]
    assert registry.champion() is None
    with pytest.raises(ValueError, match="nothing to serve"):  # and the serve stage has nothing to roll out
        run(cfg, registry, model_dir, monkeypatch, embed_writes=False, stages=["train", "embed", "promote", "serve"])


def test_later_stages_alone_need_the_version(registered, monkeypatch):
    cfg, registry, model_dir = registered
    with pytest.raises(ValueError, match="give --version N"):
        run(cfg, registry, model_dir, monkeypatch, stages=["evaluate", "promote"])
    first, _ = run(cfg, registry, model_dir, monkeypatch, stages=["train"])
    out, calls = run(cfg, registry, model_dir, monkeypatch, stages=["embed", "evaluate", "promote"],
                     version=first["version"])
    # Pipeline order, not the given order.
    assert [c[0] for c in calls] == ["embsum.train.evaluate", "embsum.train.embed"]
    assert out["promote"]["promoted"] and out["version"] == first["version"]


def test_every_stage_but_the_gate_has_one_program_and_it_exists() -> None:
    import importlib.util

    from embsum.pipeline import STAGE_PROGRAMS, STAGES

    assert set(STAGE_PROGRAMS) == set(STAGES) - {"promote"}  # the gate runs in the caller's process
    for stage, module in STAGE_PROGRAMS.items():
        assert importlib.util.find_spec(module) is not None, f"{stage}: no module {module}"
