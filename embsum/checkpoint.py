"""A served model is one directory: ``model.safetensors`` + ``embsum.json`` + tokenizer files.

Loading never unpickles (safetensors only) and needs no network: the T5 config travels in
``embsum.json``. The weights' sha256 is recorded at save time and checked at load time, so a
truncated or altered file is a clear error rather than silently wrong scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from embsum.config import ModelConfig
from embsum.config_parse import build
from embsum.tokenization import EmbSumTokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
META = "embsum.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: Any, tokenizer: EmbSumTokenizer, path: str | Path,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write the directory atomically (temp dir + rename), so a crash never leaves half a model."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        save_file(_unique_state(model), str(tmp / WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, **model.extra_state(),
                "weights_sha256": _sha256(tmp / WEIGHTS), "metadata": metadata or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        tokenizer.tok.save_pretrained(str(tmp / "tokenizer"))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _unique_state(model: Any) -> dict[str, torch.Tensor]:
    """Each parameter once (T5 ties its embeddings), as its own contiguous CPU tensor: DeepSpeed
    keeps parameters as views into flat buffers, which safetensors refuses to save as shared."""
    state = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()}
    state.update({n: b.detach().to("cpu", copy=True).contiguous() for n, b in model.named_buffers()})
    return state


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise ValueError(f"{path} is not an EmbSum model directory: {META} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is corrupted (not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} is corrupted (expected a JSON object, got {type(meta).__name__})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    missing = [k for k in ("embsum", "t5", "sos_id", "weights_sha256") if k not in meta]
    if missing:  # a clear error here rather than a KeyError deep inside load_model
        raise ValueError(f"{meta_file} is incomplete: missing {missing}")
    return meta


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"model.{f.name}: checkpoint has {getattr(a, f.name)!r}, expected {getattr(b, f.name)!r}"
            for f in fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]


# Fields that change the weights' shapes or the meaning of the inputs; others (dropout, backbone
# name, tokenizer path) may differ between the run that trained and the code that loads.
_SHAPE_FIELDS = ("sos_token", "num_sessions", "items_per_session", "session_tokens", "content_tokens",
                 "summary_tokens", "user_codes", "content_codes")


def load_model(path: str | Path, expect: ModelConfig | None = None,
               device: str | torch.device = "cpu") -> tuple[Any, EmbSumTokenizer]:
    """-> (EmbSum in eval mode, its tokenizer). ``expect``: fail if the checkpoint's layout differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import T5Config, T5ForConditionalGeneration

    from embsum.model import EmbSum

    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{path}: {WEIGHTS} is missing")
    if _sha256(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights} is corrupted: its sha256 does not match the one recorded in {META}")
    cfg = build(ModelConfig, meta["embsum"], "model.")
    if expect is not None:
        diff = [d for d in _config_diff(cfg, expect) if d.split(":")[0].split(".")[1] in _SHAPE_FIELDS]
        if diff:
            raise ValueError(f"{path}: model config mismatch: " + "; ".join(diff))
    t5 = T5ForConditionalGeneration(T5Config.from_dict(meta["t5"]))
    model = EmbSum(cfg, t5, sos_id=int(meta["sos_id"]))
    try:
        state = load_file(str(weights))
        expected = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
        bad = {k: (tuple(v.shape), tuple(expected[k])) for k, v in state.items()
               if k in expected and v.shape != expected[k]}
        if bad:
            raise ValueError(f"{weights} does not match {META}: shape mismatch {dict(list(bad.items())[:3])}")
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if not missing and not unexpected:
            model.load_state_dict(state, strict=False)  # tied aliases are filled through their owner
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{weights} is corrupted or does not match {META}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {META}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.to(device).eval()
    tok = EmbSumTokenizer(load_tokenizer(str(path / "tokenizer")), cfg)
    if tok.sos_id != model.sos_id:
        raise ValueError(f"{path}: tokenizer maps {cfg.sos_token!r} to {tok.sos_id}, weights expect {model.sos_id}")
    return model, tok

