"""The prepare stage's inputs (step 1 of train/prepare.py, on the driver): where the interactions
and the catalog are and in which format, checked as whole files before any job runs
(embsum/data/preflight.py), and fingerprinted with the settings that shape the outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from embsum.config import Config
from embsum.data import synth
from embsum.data.preflight import preflight
from embsum.data.records import MIND_BEHAVIOR_COLUMNS, MIND_NEWS_COLUMNS, CatalogSpec, LogSpec
from embsum.data.sources import Source, detect_format, fingerprint, resolve


def resolve_inputs(cfg: Config) -> tuple[bool, Source, str, Source, str]:
    """-> (is_mind, interactions, their format, items, their format). Synthetic data is generated
    under WORKDIR/data/synthetic first (reused when its parameters match) and read as MIND."""
    d = cfg.data
    if d.format == "synthetic":
        beh, news = synth.ensure(cfg.data_dir / "synthetic", d.synth_users, d.synth_items, d.synth_impressions, d.seed)
        return True, resolve(str(beh), "data.interactions"), "tsv", resolve(str(news), "data.items"), "mind"
    inter, items = resolve(d.interactions, "data.interactions"), resolve(d.items, "data.items")
    if d.format == "mind":
        return True, inter, "tsv", items, "mind"
    return (False, inter, detect_format(d.interactions_format, inter, "data.interactions"),
            items, detect_format(d.items_format, items, "data.items"))


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of one run (step 1): sources, formats, how they map, csv/tsv headers."""

    mind: bool
    inter: Source
    inter_fmt: str
    items: Source
    items_fmt: str
    cspec: CatalogSpec
    lspec: LogSpec | None
    item_headers: dict[str, list[str]]
    inter_headers: dict[str, list[str]]
    fingerprint: str


def check_inputs(cfg: Config) -> Inputs:
    """1. preflight (driver): resolve the inputs, fail at once on files wrong as a whole, and
    fingerprint them with the settings that shape the outputs."""
    d = cfg.data
    mind, inter, inter_fmt, items, items_fmt = resolve_inputs(cfg)
    cspec = CatalogSpec.from_config(d, items_fmt)
    lspec = None if mind else LogSpec.from_config(d, inter_fmt)
    item_headers = preflight(items, items_fmt, cspec.required, "data.items",
                             MIND_NEWS_COLUMNS if items_fmt == "mind" else None)
    if mind:
        inter_headers = preflight(inter, "mind", (), "data.interactions", MIND_BEHAVIOR_COLUMNS)
    else:
        assert lspec is not None
        inter_headers = preflight(inter, inter_fmt, lspec.required, "data.interactions")
    model_keys = ("tokenizer", "backbone", "sos_token", "num_sessions", "items_per_session", "session_tokens",
                  "content_tokens")
    shaping = {k: v for k, v in asdict(d).items() if k != "teacher"}  # the teacher does not shape these outputs
    fp = fingerprint([inter, items], {"data": shaping, "model": {k: getattr(cfg.model, k) for k in model_keys}},
                     mtimes=d.format != "synthetic")  # synthetic files are a pure function of the config
    return Inputs(mind, inter, inter_fmt, items, items_fmt, cspec, lspec, item_headers, inter_headers, fp)
