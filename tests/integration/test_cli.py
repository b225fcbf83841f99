"""The `embsum` command line as a user runs it: real processes, a real local Ray cluster, MLflow in
a SQLite file, a Serve app answering HTTP. `embsum run` end to end on a tiny config, twice."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

EMBSUM = [sys.executable, "-m", "embsum.cli"]
TINY_RUN = [
    "data.synth_users=60", "data.synth_items=120", "data.synth_impressions=240",
    "model.d_model=32", "model.d_kv=8", "model.d_ff=64", "model.num_heads=4", "model.num_layers=1",
    "model.num_decoder_layers=1", "model.session_tokens=48", "model.content_tokens=20", "model.summary_tokens=12",
    "model.num_sessions=2", "model.items_per_session=4",
    "train.max_steps=12", "train.checkpoint_every=12", "train.log_every=6", "train.eval_batches=1",
    "train.batch_size=8", "train.infer_actors=1",
    "serve.min_replicas=1", "serve.max_replicas=1",
]


def embsum(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*EMBSUM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_run_end_to_end_twice(tmp_path: Path) -> None:
    from embsum.config import load_config
    from embsum.embeddings import read_manifest, version_dir
    from embsum.registry import Registry

    port = random.randint(18000, 18999)
    ov = [f"workdir={tmp_path / 'work'}", f"serve.port={port}", *TINY_RUN]
    report = tmp_path / "report.json"
    p = embsum("run", "--report", str(report), *ov)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(report.read_text())

    cfg = load_config(REPO / "ray_config.yaml", ov)
    reg = Registry(cfg)
    champion = reg.champion()
    assert champion is not None and champion.version == out["promote"]["serving"]
    assert champion.metric("valid_auc") is not None and champion.metric("test_auc") is not None
    manifest = read_manifest(version_dir(cfg.embeddings_dir, champion.version))
    assert manifest.model_version == champion.version and manifest.items == 120 and manifest.users > 0
    # A served response from the running app, made by the champion.
    recs = out["serve"]["recommend"]
    assert recs["model_version"] == champion.version and len(recs["items"]) == 5
    scores = [it["score"] for it in recs["items"]]
    assert scores == sorted(scores, reverse=True)
    assert isinstance(out["serve"]["summary"]["summary"], str)
    assert "EmbSum pipeline report" in p.stdout and "mlflow ui --backend-store-uri" in p.stdout

    # Twice: no stale-state errors; a second version is registered, the alias follows the gate.
    p2 = embsum("run", "--no-serve", *ov)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    versions = [v.version for v in reg.versions()]
    assert versions == ["1", "2"]
    assert reg.champion().version in versions


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "does-not-exist.yaml"], "config file 'does-not-exist.yaml' not found"),
    (["train", "train.lrr=1"], "train.lrr: unknown key 'lrr'"),
    (["prepare", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at ray.address='127.0.0.1:1'"),
    (["models", "show", "7", "workdir=/tmp/embsum-no-such-workdir"], "no version or alias '7'"),
    # Beyond loopback without a token: refused before Ray or Serve start (nothing binds).
    (["serve", "start", "serve.host=0.0.0.0", "serve.auth_token_env=EMBSUM_TEST_NO_SUCH_TOKEN"],
     "serve.host='0.0.0.0' binds beyond loopback and no API token is set"),
    (["run", "--stages", "evaluate,promote"], "give --version N"),
    (["run", "--stages", "train,deploy"], "unknown stage 'deploy'; stages, in order: prepare,summarize,train,"
                                          "evaluate,embed,promote,serve"),
])
def test_cli_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    p = embsum(*args, timeout=120)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_help_on_every_command() -> None:
    for cmd in ([], ["prepare"], ["summarize"], ["train"], ["evaluate"], ["embed"], ["promote"], ["serve", "start"],
                ["serve", "status"], ["serve", "rollout"], ["serve", "stop"], ["run"], ["data", "synth"],
                ["models", "list"], ["models", "compare"], ["recommend"], ["config"]):
        p = embsum(*cmd, "--help", timeout=60)
        assert p.returncode == 0 and "Usage:" in p.stdout, (cmd, p.stderr)
