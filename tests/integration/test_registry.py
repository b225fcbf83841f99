"""The registry against a real MLflow store (SQLite file + artifact folder): versions, aliases,
the promotion gate, downloads that never unpickle. No Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from embsum.config import config_from_dict

pytestmark = pytest.mark.integration


@pytest.fixture()
def registry(tmp_path: Path):
    from embsum.registry import Registry

    return Registry(config_from_dict({"workdir": str(tmp_path), "mlflow": {"gate_floor": 0.55}}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    from embsum.checkpoint import save_model
    from embsum.model import EmbSum

    d = tmp_path_factory.mktemp("m") / "model"
    save_model(EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0), tokenizer, d)
    return d


def _version(registry, model_dir: Path, valid_auc: float | None) -> str:
    run = registry.start_run("r")
    if valid_auc is not None:
        registry.log_metrics(run, {"valid_auc": valid_auc})
    v = registry.log_and_register(run, model_dir)
    registry.end_run(run)
    return v


def test_gate_promotes_only_better_models(registry, model_dir: Path) -> None:
    v1 = _version(registry, model_dir, 0.70)
    ok, why = registry.gate(v1)
    assert ok and registry.champion().version == v1, why

    v2 = _version(registry, model_dir, 0.65)  # worse: refused, alias stays, the reason names both
    ok, why = registry.gate(v2)
    assert not ok and registry.champion().version == v1
    assert f"version {v2}" in why and f"champion version {v1}" in why

    v3 = _version(registry, model_dir, 0.50)  # below the floor even with no better champion check
    ok, why = registry.gate(v3)
    assert not ok and "floor" in why and registry.champion().version == v1

    v4 = _version(registry, model_dir, None)  # never evaluated: refused
    ok, why = registry.gate(v4)
    assert not ok and "no valid_auc" in why

    v5 = _version(registry, model_dir, 0.80)
    ok, why = registry.gate(v5)
    assert ok and registry.champion().version == v5 and f"(was {v1})" in why
    assert [v.version for v in registry.versions()] == [v1, v2, v3, v4, v5]


def test_download_by_alias_and_number(registry, model_dir: Path, tmp_path: Path) -> None:
    from embsum.checkpoint import load_model

    v = _version(registry, model_dir, 0.7)
    registry.promote(v)
    by_alias = registry.download("champion", tmp_path / "a")
    by_num = registry.download(v, tmp_path / "b")
    for d in (by_alias, by_num):
        assert (d / "model.safetensors").is_file() and not list(d.rglob("*.pkl")) and not list(d.rglob("*.bin"))
        load_model(d)
    with pytest.raises(ValueError, match="no version or alias '99'"):
        registry.version("99")
    with pytest.raises(ValueError, match="no version or alias 'prod'"):
        registry.version("@prod")
