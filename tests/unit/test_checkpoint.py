"""Checkpoint: safetensors round trip, integrity checks, no pickle anywhere."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embsum.checkpoint import META, WEIGHTS, load_model, read_meta, save_model
from embsum.config import ModelConfig
from embsum.model import EmbSum
from embsum.scoring import score
from embsum.tokenization import EmbSumTokenizer

HISTORIES = [["Stocks rally as rates fall", "New phone unveiled"], [], ["Recipe: lemon cake"] * 7]
ITEMS = ["Football final tonight", "Election results are in", "Ten easy pasta dishes"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def trained(tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer) -> EmbSum:
    model = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=3)
    with torch.no_grad():  # move the heads off their init so the round trip checks real values
        for p in (model.user_poly.codes, model.content_poly.codes, model.item_gate.weight):
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained: EmbSum, tokenizer: EmbSumTokenizer) -> Path:
    return save_model(trained, tokenizer, tmp_path_factory.mktemp("ckpt") / "model", metadata={"run": "unit"})


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _scores(model: EmbSum, tok: EmbSumTokenizer) -> torch.Tensor:
    with torch.no_grad():
        upe = model.encode_user(torch.as_tensor(tok.sessions_from_texts(HISTORIES)).long())
        cpe, key = model.encode_content(torch.as_tensor(tok.content_from_texts(ITEMS)).long())
        return score(upe, cpe, key)


def test_round_trip_gives_identical_scores_and_ids(saved: Path, trained: EmbSum, tokenizer: EmbSumTokenizer) -> None:
    model, tok = load_model(saved, expect=trained.cfg)
    assert not model.training
    assert model.cfg == trained.cfg and model.sos_id == trained.sos_id
    ref, got = trained.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert torch.equal(_scores(model, tok), _scores(trained, tokenizer))
    s = torch.as_tensor(tok.sessions_from_texts(HISTORIES)).long()
    with torch.no_grad():  # generation reads the LM head, which scores never touch
        assert torch.equal(model.generate_summary_ids(*model.encode_sessions(s)),
                           trained.generate_summary_ids(*trained.encode_sessions(s)))
        y = torch.as_tensor(tok.summary("likes cake")).long()[None].repeat(len(HISTORIES), 1)
        torch.testing.assert_close(model.summary_logits(model.user_encoding(s, y).summary_states),
                                   trained.summary_logits(trained.user_encoding(s, y).summary_states), atol=0, rtol=0)
    np.testing.assert_array_equal(tok.sessions_from_texts(HISTORIES), tokenizer.sessions_from_texts(HISTORIES))
    np.testing.assert_array_equal(tok.content_from_texts(ITEMS), tokenizer.content_from_texts(ITEMS))
    np.testing.assert_array_equal(tok.summary("likes cake"), tokenizer.summary("likes cake"))
    assert (tok.sos_id, tok.pad_id, tok.eos_id) == (tokenizer.sos_id, tokenizer.pad_id, tokenizer.eos_id)
    assert read_meta(saved)["metadata"] == {"run": "unit"}


def test_nothing_pickled_is_written_or_read(saved: Path, monkeypatch) -> None:
    suffixes = {p.suffix for p in saved.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, suffixes
    assert (saved / WEIGHTS).is_file() and (saved / META).is_file()

    def refuse(*a, **k):
        raise AssertionError("load_model unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _ = load_model(saved)
    assert isinstance(model, EmbSum)


def test_save_is_atomic_and_overwrites(saved: Path, trained: EmbSum, tokenizer: EmbSumTokenizer,
                                       tmp_path: Path) -> None:
    dst = tmp_path / "m"
    save_model(trained, tokenizer, dst)
    save_model(trained, tokenizer, dst, metadata={"second": True})
    assert read_meta(dst)["metadata"] == {"second": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_flipped_bytes_are_detected(saved: Path, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    data = bytearray((d / WEIGHTS).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted") as e:
        load_model(d)
    assert WEIGHTS in str(e.value)


def test_truncated_weights_are_detected(saved: Path, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupted"):
        load_model(d)


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    (d / META).unlink()
    with pytest.raises(ValueError, match=f"{META} is missing"):
        load_model(d)
    d2 = tmp_path / "copy2"
    shutil.copytree(saved, d2)
    (d2 / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=f"{WEIGHTS} is missing"):
        load_model(d2)
    with pytest.raises(ValueError, match="not an EmbSum model directory"):
        load_model(tmp_path / "nowhere")


def test_broken_meta(saved: Path, tmp_path: Path) -> None:
    d = _copy(saved, tmp_path)
    (d / META).write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_model(d)
    (d / META).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_model(d)
    meta = read_meta(saved)
    meta["format_version"] = 99
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_model(d)
    meta = read_meta(saved)
    del meta["t5"]
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="t5"):
        load_model(d)


def test_mismatched_expected_config(saved: Path, trained: EmbSum) -> None:
    other = dataclasses.replace(trained.cfg, user_codes=trained.cfg.user_codes + 1)
    with pytest.raises(ValueError, match="mismatch") as e:
        load_model(saved, expect=other)
    msg = str(e.value)
    assert "user_codes" in msg and str(trained.cfg.user_codes) in msg and str(other.user_codes) in msg
    # Fields that do not change the weights or the inputs may differ.
    load_model(saved, expect=dataclasses.replace(trained.cfg, dropout=0.2, backbone="elsewhere"))


def test_weights_of_another_model_are_refused(saved: Path, tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer,
                                              tmp_path: Path) -> None:
    # A well-formed safetensors file with a matching sha256 but the wrong shapes.
    other = EmbSum.from_config(dataclasses.replace(tiny_cfg, content_codes=tiny_cfg.content_codes + 2),
                               tokenizer.sos_id, seed=0)
    o = save_model(other, tokenizer, tmp_path / "other")
    d = tmp_path / "mixed"
    shutil.copytree(saved, d)
    shutil.copy(o / WEIGHTS, d / WEIGHTS)
    meta = read_meta(d)
    meta["weights_sha256"] = read_meta(o)["weights_sha256"]
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        load_model(d)
