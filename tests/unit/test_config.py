"""Config: YAML + dotted overrides -> typed, validated (pydantic) dataclasses; errors name key, value, allowed."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from embsum.config import Config, ModelConfig, config_from_dict, config_reference, load_config, replace

REPO = Path(__file__).resolve().parents[2]
RAY_CONFIG = REPO / "ray_config.yaml"


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key, walked from the dataclass definitions (independent of Config.flat)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _yaml_leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_yaml_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _raises(overrides: list[str], *fragments: str) -> str:
    with pytest.raises(ValueError) as e:
        config_from_dict({}, overrides)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message {msg!r}"
    return msg


# ---- loading ---------------------------------------------------------------------------------------------
def test_ray_config_yaml_loads_with_its_values() -> None:
    cfg = load_config(RAY_CONFIG)
    flat = cfg.flat()
    raw = _yaml_leaves(yaml.safe_load(RAY_CONFIG.read_text()))
    assert raw, "ray_config.yaml is empty"
    for key, value in raw.items():
        if key == "train.deepspeed_config":
            # Relative to the config file's folder, made absolute.
            assert flat[key] == str((RAY_CONFIG.parent / value).resolve())
        elif key == "workdir":
            # Relative to the current directory, made absolute (workers run elsewhere).
            assert flat[key] == str(Path(value).resolve())
        elif isinstance(value, float) or isinstance(flat[key], float):
            assert flat[key] == pytest.approx(float(value)), key
        else:
            assert flat[key] == value, key


def test_defaults_without_a_file_are_valid() -> None:
    cfg = load_config(None)
    assert cfg.model == ModelConfig()
    assert Path(cfg.train.deepspeed_config).is_absolute()


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match="not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_invalid_yaml_and_non_mapping_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(scalar)


def test_deepspeed_config_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "c.yaml"
    f.write_text("train:\n  deepspeed_config: ds/zero3.json\n")
    assert load_config(f).train.deepspeed_config == str((tmp_path / "sub" / "ds" / "zero3.json").resolve())
    # A URI is kept as it is, never turned into a local path.
    assert load_config(f, ["train.deepspeed_config=s3://bucket/zero2.json"]).train.deepspeed_config \
        == "s3://bucket/zero2.json"
    f.write_text("train:\n  deepspeed_config: s3://bucket/z.json\n")
    assert load_config(f).train.deepspeed_config == "s3://bucket/z.json"


# ---- overrides -------------------------------------------------------------------------------------------
def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(RAY_CONFIG, ["train.lr=3e-4", "data.teacher.kind=openai", "model.random_init=false",
                                   "ray.address=null", "serve.model_version=3", "train.batch_size=8",
                                   "data.item_text_fields=[title, abstract]", "train.zero_stage=None"])
    assert cfg.train.lr == 0.0003 and isinstance(cfg.train.lr, float)
    assert cfg.data.teacher.kind == "openai"
    assert cfg.model.random_init is False
    assert cfg.ray.address is None
    assert cfg.serve.model_version == "3"
    assert cfg.train.batch_size == 8
    assert cfg.data.item_text_fields == ["title", "abstract"]
    assert cfg.train.zero_stage is None
    # Untouched keys keep the file's values.
    assert cfg.model.d_model == yaml.safe_load(RAY_CONFIG.read_text())["model"]["d_model"]


def test_int_widens_to_float_and_quoted_none_stays_a_string() -> None:
    cfg = config_from_dict({"train": {"lr": 1}}, ["mlflow.alias=\"none\""])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.mlflow.alias == "none"


def test_override_without_equals_sign() -> None:
    _raises(["train.lr"], "train.lr", "KEY=VALUE")


def test_replace_validates_like_an_override() -> None:
    cfg = Config()
    assert replace(cfg, "train.lr", 0.01).train.lr == 0.01
    assert replace(cfg, "mlflow.alias", "none").mlflow.alias == "none"
    with pytest.raises(ValueError, match="train.lr"):
        replace(cfg, "train.lr", 5.0)


# ---- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values,key,allowed", [
    ({"bogus": 1}, "bogus", "train"),
    ({"train": {"lrr": 1}}, "train.lrr", "'lr'"),
    ({"data": {"teacher": {"nope": 1}}}, "data.teacher.nope", "'kind'"),
])
def test_unknown_keys_in_a_mapping(values: dict, key: str, allowed: str) -> None:
    with pytest.raises(ValueError) as e:
        config_from_dict(values)
    assert key in str(e.value) and "unknown key" in str(e.value) and allowed in str(e.value)


def test_unknown_keys_suggest_the_closest_key_and_all_errors_are_reported() -> None:
    with pytest.raises(ValueError) as e:
        config_from_dict({"train": {"batch_sise": 8, "lr": 2}})
    lines = str(e.value).splitlines()
    assert any(line.startswith("train.batch_sise:") and "did you mean 'batch_size'?" in line for line in lines)
    assert any(line.startswith("train.lr:") and "out of range" in line for line in lines), lines
    # No suggestion when nothing is close.
    assert "did you mean" not in _raises(["train.zzzzzz=1"], "train.zzzzzz", "unknown key")


@pytest.mark.parametrize("override,fragments", [
    ("bogus=1", ["bogus", "unknown key", "'train'"]),
    ("train.lrr=1", ["train.lrr", "'lrr'", "'lr'"]),
    ("data.teacher.nope=1", ["data.teacher.nope", "'nope'", "'kind'"]),
])
def test_unknown_override_keys(override: str, fragments: list[str]) -> None:
    _raises([override], *fragments)


@pytest.mark.parametrize("override,fragments", [
    ("train.batch_size=abc", ["train.batch_size", "'abc'", "integer"]),
    ("train.batch_size=1.5", ["train.batch_size", "1.5", "integer"]),
    ("train.batch_size=true", ["train.batch_size", "True", "integer"]),
    ("model.random_init=3", ["model.random_init", "3", "true or false"]),
    ("train.lr=abc", ["train.lr", "'abc'", "number"]),
    ("train.lr=nan", ["train.lr", "nan", "number"]),
    ("data.item_text_fields=title", ["data.item_text_fields", "'title'", "list"]),
    ("train=3", ["train", "3", "mapping"]),
    ("ray.num_cpus=x", ["ray.num_cpus", "'x'", "int"]),
    ("data.item_text_fields=[title, 3]", ["data.item_text_fields[1]", "3", "string"]),
    ("train.lr.x=1", ["train.lr.x", "train.lr is a value"]),
    ("data.positive_threshold=inf", ["data.positive_threshold", "inf", "finite number"]),
])
def test_wrong_types(override: str, fragments: list[str]) -> None:
    _raises([override], *fragments)


@pytest.mark.parametrize("override,fragments", [
    ("train.lr=0", ["train.lr", "0.0", "out of range", "[1e-08, 1.0]"]),
    ("train.lr=2", ["train.lr", "2.0", "[1e-08, 1.0]"]),
    ("serve.port=70000", ["serve.port", "70000", "[1, 65535]"]),
    ("model.user_codes=0", ["model.user_codes", "0", "[1, 1024]"]),
    ("data.teacher.max_retries=-1", ["data.teacher.max_retries", "-1", "[0, 20]"]),
    ("train.lr=inf", ["train.lr", "inf", "[1e-08, 1.0]"]),
])
def test_out_of_range(override: str, fragments: list[str]) -> None:
    _raises([override], *fragments)


@pytest.mark.parametrize("override,fragments", [
    ("data.format=csv", ["data.format", "'csv'", "'mind'", "'synthetic'"]),
    ("data.teacher.kind=vllm", ["data.teacher.kind", "'vllm'", "'offline'", "'openai'"]),
    ("train.precision=fp8", ["train.precision", "'fp8'", "'bf16'"]),
])
def test_bad_literal_choices(override: str, fragments: list[str]) -> None:
    _raises([override], *fragments)


@pytest.mark.parametrize("overrides,fragments", [
    (["serve.max_ongoing_requests=4", "serve.max_batch_size=16"],
     ["serve.max_ongoing_requests=4", "serve.max_batch_size=16", ">="]),
    (["train.precision=fp16"], ["train.precision", "fp16", "bf16", "fp32"]),
    (["serve.min_replicas=3", "serve.max_replicas=2"], ["serve.min_replicas=3", "serve.max_replicas=2", "<="]),
    (["data.valid_fraction=0.5", "data.test_fraction=0.5"], ["data.valid_fraction=0.5", "data.test_fraction=0.5",
                                                              "< 1"]),
    (["model.session_tokens=8", "model.items_per_session=5"], ["model.session_tokens=8",
                                                                "model.items_per_session=5", ">="]),
    (["data.format=logs", "data.event_order=timestamp"], ["data.event_order='timestamp'", "data.timestamp_col",
                                                          "random", "file"]),
    (["data.format=mind", "data.event_order=random"], ["data.event_order='random'", "logs", "auto"]),
])
def test_cross_field_rules(overrides: list[str], fragments: list[str]) -> None:
    _raises(overrides, *fragments)


def test_bf16_on_cpu_is_allowed_and_valid_pairs_pass() -> None:
    cfg = config_from_dict({}, ["train.precision=bf16", "serve.max_ongoing_requests=16", "serve.max_batch_size=16"])
    assert cfg.train.precision == "bf16" and cfg.serve.max_ongoing_requests == cfg.serve.max_batch_size


# ---- reference, flat, fingerprint -----------------------------------------------------------------------
def test_config_reference_lists_every_field() -> None:
    ref = config_reference()
    rows = [line for line in ref.splitlines()[2:] if line.startswith("| `")]
    listed = [re.match(r"\| `([^`]+)`", r).group(1) for r in rows]
    expected = _leaf_keys()
    assert sorted(listed) == sorted(expected)
    assert len(listed) == len(set(listed))
    for r in rows:  # every row has a description
        assert r.rstrip(" |").split("|")[-1].strip(), r


def test_flat_keys_and_values() -> None:
    cfg = load_config(RAY_CONFIG, ["train.lr=3e-4"])
    flat = cfg.flat()
    assert sorted(flat) == sorted(_leaf_keys())
    assert flat["train.lr"] == 0.0003
    assert flat["data.teacher.kind"] == cfg.data.teacher.kind
    assert flat["model.d_model"] == cfg.model.d_model
    assert not any(isinstance(v, dict) for v in flat.values())


def test_fingerprint_is_stable_and_tracks_its_section() -> None:
    a, b = Config(), Config()
    assert a.fingerprint("model") == b.fingerprint("model")
    c = replace(a, "model.user_codes", 16)
    assert c.fingerprint("model") != a.fingerprint("model")
    assert c.fingerprint("train") == a.fingerprint("train")


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


# ---- moved keys ------------------------------------------------------------------------------------------
def test_batch_inference_keys_moved_to_their_section_and_old_names_still_work(tmp_path: Path) -> None:
    cfg = config_from_dict({}, ["infer.actors=3", "infer.batch_size=32"])
    assert (cfg.infer.actors, cfg.infer.batch_size, cfg.infer.rows_per_call) == (3, 32, 2048)
    assert not any(k.startswith("train.infer") for k in cfg.flat())
    old_file = tmp_path / "old.yaml"
    old_file.write_text("train:\n  lr: 0.001\n  infer_actors: 4\n  infer_gpus: 0.5\n")
    with pytest.warns(FutureWarning) as warned:
        old = load_config(old_file, ["train.infer_batch_size=16"])
    assert sorted(str(w.message) for w in warned) == [
        f"config key train.infer_{k} is now infer.{k}; train.infer_{k} will be removed"
        for k in ("actors", "batch_size", "gpus")]
    assert (old.infer.actors, old.infer.gpus, old.infer.batch_size, old.train.lr) == (4, 0.5, 16, 0.001)
    with pytest.raises(ValueError, match="train.infer_cpus and infer.cpus are both set"), \
            pytest.warns(FutureWarning):
        config_from_dict({"train": {"infer_cpus": 2}, "infer": {"cpus": 1}})
    _raises(["infer.actors=0"], "infer.actors", "out of range")


def test_dataclasses_replace_validates_too() -> None:
    """Sections are pydantic dataclasses: code that copies one with dataclasses.replace is checked."""
    with pytest.raises(ValueError, match="lr"):
        dataclasses.replace(Config().train, lr=5.0)
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(Config().train, batch_size="8")  # strict: no "8" -> 8
