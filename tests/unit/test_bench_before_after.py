"""The before/after rows of the benchmark table (bench/before_after.py): on fake result files, and
on the committed results the README's table is built from."""

from __future__ import annotations

import json
from pathlib import Path

from bench import before_after, harness
from bench.before_after import Change


def _serve(rps: float, bare: float, cpu: str) -> dict:
    return {"machine": {"cpu_model": cpu}, "serve_wait_0": {"16": {"rps": rps}}, "bare": {"16": {"rps": bare}}}


CHANGE = Change("serve", "Serve / bare", "x", before_after.serve_ratio("serve_wait_0", "bare"),
                ("b1.json", "b2.json"), ("a1.json", "a2.json", "a3.json"), "old batching", target=1.0)


def test_after_against_before_medians_and_the_target_on_after(tmp_path: Path) -> None:
    for name, (rps, bare) in {"b1.json": (70, 100), "b2.json": (90, 100),  # before: 0.7, 0.9 -> 0.8
                              "a1.json": (95, 100), "a2.json": (110, 100), "a3.json": (99, 100)}.items():
        (tmp_path / name).write_text(json.dumps(_serve(rps, bare, "AMD EPYC")))
    f = before_after.figure(CHANGE, tmp_path)
    assert f is not None and f.name == "before -> after: Serve / bare"
    assert abs(f.value - 0.99) < 1e-9 and abs(f.reference - 0.8) < 1e-9  # medians of after, before
    assert abs(f.ratio - 0.99 / 0.8) < 1e-9 and f.repeats == 3
    assert f.met is False and f.target_text() == ">= 1x"  # 0.99 < 1.0: on the after value
    assert "2 runs, AMD EPYC" in f.ref_name and "3 runs, AMD EPYC" in f.note
    mem = Change("train", "tree PSS", "MB", before_after.tree_memory("pss"), ("b1.json",), ("a1.json",), "main",
                 higher_is_better=False, target=3072, target_kind="value<=")
    (tmp_path / "b1.json").write_text(json.dumps({"memory": {"peak_pss_mb": 6000.0}}))
    (tmp_path / "a1.json").write_text(json.dumps({"memory": {"peak_pss_mb": 3000.0}}))
    m = before_after.figure(mem, tmp_path)
    assert m is not None and m.ratio == 2.0 and m.met is True and "unknown CPU" in m.ref_name


def test_missing_files_give_no_row_and_unreadable_ones_say_why(tmp_path: Path) -> None:
    assert before_after.figure(CHANGE, tmp_path) is None  # a results directory of one's own
    for name in CHANGE.before + CHANGE.after:
        (tmp_path / name).write_text(json.dumps({"machine": {}}))  # no serve figures in it
    f = before_after.figure(CHANGE, tmp_path)
    assert f is not None and "results not readable (KeyError" in f.name and f.ratio is None


def test_every_committed_change_reads_its_results() -> None:
    """The README's before/after rows are rebuilt from these files: each must be there and readable."""
    for change in before_after.CHANGES:
        f = before_after.figure(change, harness.RESULTS)
        assert f is not None, f"a file of {change.figure!r} is missing from {harness.RESULTS}"
        assert f.ratio is not None and f.repeats == len(change.after), f.name
        assert f.target is None or f.met is not None
