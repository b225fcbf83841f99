"""The quality study's run cache: how summaries are decoded is not part of a run's key (a cached run is
decoded again instead of trained again); everything that shapes training is."""

from __future__ import annotations

from pathlib import Path

from bench.quality import GENERATION, generation, run_key, study_config
from embsum.config import replace

DEMO = Path(__file__).resolve().parents[2] / "ray_config.yaml"


def test_decoding_is_not_in_the_run_key_but_training_is() -> None:
    base = study_config(DEMO, [])
    beams = replace(replace(base, "model.summary_num_beams", 4), "model.summary_no_repeat_ngram", 2)
    assert run_key(beams) == run_key(base)
    assert generation(beams) == {"summary_num_beams": 4, "summary_no_repeat_ngram": 2} != generation(base)
    assert set(generation(base)) == set(GENERATION)
    assert run_key(replace(base, "model.d_model", base.model.d_model * 2)) != run_key(base)
    assert run_key(replace(base, "train.summary_weight", 0.0)) != run_key(base)


def test_a_killed_study_run_is_resumed_from_its_checkpoint_not_started_again(tmp_path: Path) -> None:
    from bench.quality import resumable_run_name

    cfg = replace(study_config(DEMO, []), "train.storage_path", str(tmp_path))
    fresh = resumable_run_name(cfg, "full-s0", "abcdef0123")
    assert fresh.startswith("bench-full-s0-abcdef01-")
    (tmp_path / "bench-full-s0-abcdef01-100" / "checkpoint_step_00000500").mkdir(parents=True)
    (tmp_path / "bench-full-s0-abcdef01-200").mkdir()  # started, killed before its first checkpoint
    (tmp_path / "bench-full-s1-abcdef01-300" / "checkpoint_step_00000500").mkdir(parents=True)  # another run
    assert resumable_run_name(cfg, "full-s0", "abcdef0123") == "bench-full-s0-abcdef01-100"
