"""The public names import; importing embsum stays cheap and side-effect free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_public_names_import() -> None:
    from embsum import EmbSum, ModelConfig, load_config, score
    from embsum.model import EmbSum as ModelEmbSum
    from embsum.scoring import score as scoring_score

    assert EmbSum is ModelEmbSum and score is scoring_score
    assert callable(load_config) and ModelConfig().user_codes >= 1
    from embsum import EmbSumConfig

    assert EmbSumConfig is ModelConfig  # the former name still works

    import embsum

    for name in embsum.__all__:
        assert getattr(embsum, name) is not None, name


def test_import_embsum_pulls_in_no_heavy_modules(tmp_path: Path) -> None:
    code = ("import sys, json, embsum; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert list(tmp_path.iterdir()) == []  # no files or folders created on import
