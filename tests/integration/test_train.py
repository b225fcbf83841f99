"""Training on a local Ray cluster with DeepSpeed over the real Book-Crossing data, tracked in a
real MLflow store: fit (ZeRO 0/2/3), resume, a killed worker, the registered model's identity,
and evaluation against embsum.metrics computed directly."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from embsum.config import Config, load_config
from tests.conftest import REPO, assert_f32_close, shared_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TINY_TRAIN = [
    "model.d_model=32", "model.d_kv=8", "model.d_ff=64", "model.num_heads=4", "model.num_layers=1",
    "model.num_decoder_layers=1", "model.session_tokens=48", "model.content_tokens=20", "model.summary_tokens=16",
    "model.num_sessions=2", "model.items_per_session=4",
    "data.max_examples_per_user=4", "data.eval_negatives=19",
    "train.num_workers=2", "train.cpus_per_worker=1", "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=3",
    "train.log_every=5", "train.eval_batches=2", "infer.actors=1", "infer.batch_size=64",
    "train.summary_weight=0.05",  # pinned: these tests check the mechanics, not the YAML's tuned lambda
]


def bx_config(workdir: Path, *extra: str) -> Config:
    shared_data("book-crossing", "ratings.tsv")
    return load_config(REPO / "configs" / "book-crossing.yaml", [f"workdir={workdir}", *TINY_TRAIN, *extra])


@pytest.fixture(scope="module")
def bx_workdir(tmp_path_factory, ray_cluster) -> Path:
    """Book-Crossing prepared and summarized (offline teacher) once for the module."""
    from train.prepare import run_prepare
    from train.summarize import run_summarize

    workdir = tmp_path_factory.mktemp("bx")
    cfg = bx_config(workdir)
    run_prepare(cfg)
    run_summarize(cfg)
    return workdir


def _history(cfg: Config, run_id: str, key: str) -> list[tuple[int, float]]:
    from embsum.registry import Registry

    hist = Registry(cfg).client.get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


@pytest.fixture(scope="module")
def zero2_run(bx_workdir: Path) -> tuple[Config, dict]:
    """One 2-worker ZeRO-2 fit shared by the tests below (a fit is the expensive part)."""
    from train.train import run_train

    name = f"bx-zero2-{uuid.uuid4().hex[:6]}"
    cfg = bx_config(bx_workdir, f"train.run_name={name}", "train.max_steps=30", "train.checkpoint_every=15")
    return cfg, run_train(cfg)


def test_fit_zero2_tracks_and_registers(zero2_run: tuple[Config, dict]) -> None:
    from embsum.registry import Registry

    cfg, out = zero2_run
    assert out["step"] in (15, 30) and out["version"]
    # The loss goes down: the first logged windows vs the last.
    losses = _history(cfg, out["mlflow_run_id"], "loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    vals = [v for _, v in losses]
    assert np.mean(vals[-2:]) < np.mean(vals[:2]), losses
    # Checkpoints exist in Ray storage; MLflow has params, tags, metrics and the model artifact.
    ckpts = sorted(p.name for p in (Path(cfg.storage_path) / cfg.train.run_name).glob("checkpoint_*"))
    assert "checkpoint_step_00000030" in ckpts
    reg = Registry(cfg)
    run = reg.client.get_run(out["mlflow_run_id"])
    assert run.data.params["train.max_steps"] == "30" and run.data.params["model.d_model"] == "32"
    assert run.data.tags["deepspeed_stage"] == "2" and run.data.tags["teacher"].startswith("offline")
    assert run.data.tags["data_fingerprint"] not in ("", "unknown")
    assert {"loss", "nce_loss", "summary_loss", "lr", "examples_per_s", "tokens_per_s", "val_auc"} <= set(
        run.data.metrics)
    arts = {a.path for a in reg.client.list_artifacts(out["mlflow_run_id"], "model")}
    assert {"model/model.safetensors", "model/embsum.json"} <= arts

    # The registered version, loaded by alias, scores exactly like the model at the end of training.
    reg.promote(out["version"])
    _assert_champion_matches_probe(cfg, Path(out["checkpoint"]) / "probe.npz")


def test_resume_continues_from_the_saved_step(zero2_run: tuple[Config, dict], bx_workdir: Path) -> None:
    from train.train import run_train

    cfg, out = zero2_run
    cfg2 = bx_config(bx_workdir, f"train.run_name={cfg.train.run_name}", "train.max_steps=40",
                     "train.checkpoint_every=10")
    out2 = run_train(cfg2, register=False)
    assert out2["mlflow_run_id"] == out["mlflow_run_id"]
    steps = [s for s, _ in _history(cfg2, out2["mlflow_run_id"], "loss")]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40], steps  # each step once: no restart from 0
    assert (Path(cfg.storage_path) / cfg.train.run_name / "checkpoint_step_00000040").is_dir()


def _assert_champion_matches_probe(cfg: Config, probe_path: Path) -> None:
    import mlflow
    import torch

    from embsum.checkpoint import load_model

    mlflow.set_tracking_uri(cfg.tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias}")
    model, _ = load_model(local)
    probe = np.load(probe_path, allow_pickle=False)
    with torch.no_grad():
        scores = model(*(torch.as_tensor(probe[k], dtype=torch.long)
                         for k in ("session_ids", "candidate_ids", "summary_ids"))).scores.numpy()
    assert_f32_close(scores, probe["scores"])


def test_fit_zero3_gathers_the_served_model(bx_workdir: Path) -> None:
    from embsum.registry import Registry
    from train.train import run_train

    cfg = bx_config(bx_workdir, "train.zero_stage=3", f"train.run_name=bx-zero3-{uuid.uuid4().hex[:6]}",
                    "train.max_steps=20", "train.checkpoint_every=20")
    out = run_train(cfg)
    # The summary loss shows 20 steps of learning (the teacher-forced decoder leaves ln(vocab) within a few
    # steps); the NCE loss over ~160 in-batch candidates is still at chance after 20 steps.
    losses = [v for _, v in _history(cfg, out["mlflow_run_id"], "summary_loss")]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert Registry(cfg).client.get_run(out["mlflow_run_id"]).data.tags["deepspeed_stage"] == "3"
    assert out["probe_max_abs_diff"] <= 1e-5  # ZeRO-3 shards were gathered into the served model


def test_zero0_run_survives_a_killed_worker(bx_workdir: Path) -> None:
    """ZeRO stage 0 (plain data parallel), fault tolerance and no validation in one run: rank 1
    SIGKILLs itself at step 15; Ray Train restarts the group from the step-10 checkpoint and the run
    completes. With ``train.eval_batches=0`` nothing is validated, so the last checkpoint is the
    one reported (no val_auc to choose by)."""
    from embsum.registry import Registry
    from train.train import run_train

    name = f"bx-fail-{uuid.uuid4().hex[:6]}"
    cfg = bx_config(bx_workdir, "train.zero_stage=0", f"train.run_name={name}", "train.max_steps=20",
                    "train.checkpoint_every=10", "train.fail_at_step=15", "train.max_failures=1",
                    "train.eval_batches=0")
    out = run_train(cfg, register=False)
    assert out["step"] == 20 and out["val_auc"] is None
    assert Path(out["checkpoint"]).name == "checkpoint_step_00000020"
    marker = Path(__import__("tempfile").gettempdir()) / f"embsum-fail-{name}"
    assert marker.is_file(), "the worker was never killed: the test proved nothing"
    steps = [s for s, _ in _history(cfg, out["mlflow_run_id"], "loss")]
    assert steps[-1] == 20 and 15 in steps
    run = Registry(cfg).client.get_run(out["mlflow_run_id"])
    assert run.data.tags["deepspeed_stage"] == "0" and "val_auc" not in run.data.metrics


def test_evaluation_matches_direct_metrics(zero2_run: tuple[Config, dict]) -> None:
    """The Ray Data evaluation job equals scoring the same impressions directly with embsum."""
    import pyarrow.dataset as pads

    from embsum.arrow_tensors import table_tensor
    from embsum.metrics import mean_metrics
    from embsum.predictor import Predictor
    from embsum.registry import Registry
    from train.evaluate import run_evaluate
    cfg, out = zero2_run
    version = out["version"]
    res = run_evaluate(cfg, version, splits=("valid",))
    reg = Registry(cfg)
    assert reg.version(version).metric("valid_auc") == pytest.approx(res["valid"]["auc"])

    pred = Predictor.from_dir(reg.download(version))
    items = pads.dataset(str(cfg.data_dir / "items.parquet")).to_table(columns=["item_id", "token_ids"])
    tokens = dict(zip(items.column("item_id").to_pylist(), items.column("token_ids").to_pylist(), strict=True))
    valid = pads.dataset(str(cfg.data_dir / "valid")).to_table()
    upe = pred.encode_users(table_tensor(valid, "session_ids"), with_text=False).upe
    candidates = valid.column("candidate_item_ids").to_pylist()
    distinct = sorted({c for cands in candidates for c in cands})  # each candidate encoded once, in batches
    emb = pred.encode_item_tokens([tokens[c] for c in distinct])
    row = {c: k for k, c in enumerate(distinct)}
    pairs = []
    for i, (cands, labels) in enumerate(zip(candidates, valid.column("labels").to_pylist(), strict=True)):
        k = [row[c] for c in cands]
        pairs.append((labels, pred.score(upe[i:i + 1], emb.cpe[k], emb.key[k])[0]))
    direct = mean_metrics(pairs)
    assert direct.impressions == res["valid"]["impressions"] > 0
    for m in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert res["valid"][m] == pytest.approx(getattr(direct, m), abs=1e-5), m


def test_evaluate_new_impressions_file_quarantines_bad_rows(zero2_run: tuple[Config, dict], tmp_path: Path) -> None:
    """`embsum evaluate --impressions --items`: a MIND-format file the pipeline never saw, with bad
    rows, scored by the version with its own tokenizer/formatting; metrics equal direct scoring."""
    import pyarrow.dataset as pads

    from embsum.metrics import mean_metrics
    from embsum.predictor import Predictor
    from embsum.registry import Registry
    from embsum.tokenization import format_item_text
    from train.evaluate import run_evaluate_new

    cfg, out = zero2_run
    books = shared_data("book-crossing", "books.tsv").read_text().splitlines()
    header, rows = books[0], books[1:41]
    ids = [r.split("\t")[0] for r in rows]
    (tmp_path / "books.tsv").write_text("\n".join([header, *rows, "only-two\tcolumns", rows[0]]) + "\n")
    good = [f"I{k}\tU{k}\t11/15/2019 8:00:00 AM\t{' '.join(ids[k:k + 3])}\t{ids[10 + k]}-1 {ids[20 + k]}-0 "
            f"{ids[30 + k]}-0 UNKNOWN-0" for k in range(6)]
    bad = ["I90\tU90\tnot a time\t\tX-1 Y-0", "I91\tU91", "I92\tU92\t11/15/2019 8:00:00 AM\t\tX-7",
           f"I93\tU93\t11/15/2019 8:00:00 AM\t{ids[0]}\t{ids[1]}-1 {ids[2]}-1"]  # last: no unclicked candidate
    (tmp_path / "behaviors.tsv").write_text("\n".join([*good[:3], *bad, *good[3:]]) + "\n")

    res = run_evaluate_new(cfg, out["version"], str(tmp_path / "behaviors.tsv"), str(tmp_path / "books.tsv"))
    data = res["data"]
    assert res["new"]["impressions"] == 6 and data["impressions"] == 6 and data["rows"] == 10
    assert data["skipped_without_both_labels"] == 1 and data["dropped_unknown_candidates"] == 6
    assert sum(data["quarantined"].values()) == 5  # 3 behaviors rows, a short catalog row, a duplicate id
    root = next((cfg.workdir_path / "eval" / f"v{out['version']}").glob("new-behaviors-*"))
    q = pads.dataset(str(root / "data" / "quarantine")).to_table().to_pylist()
    lines = {(Path(r["source"]).name, r["line"]) for r in q}
    assert {("behaviors.tsv", 4), ("behaviors.tsv", 5), ("behaviors.tsv", 6), ("books.tsv", 42),
            ("books.tsv", 43)} == lines
    assert Registry(cfg).version(out["version"]).metric("new_auc") == pytest.approx(res["new"]["auc"])

    # Direct scoring with the version's predictor and the config's text formatting gives the same metrics.
    pred = Predictor.from_dir(Registry(cfg).download(out["version"]))
    fields = dict(zip(header.split("\t"), zip(*(r.split("\t") for r in rows), strict=True), strict=True))
    text = {ids[k]: format_item_text({f: v[k] for f, v in fields.items()}, cfg.data.item_text_fields,
                                     cfg.data.item_text_max_chars) for k in range(len(ids))}
    pairs = []
    for line in good:
        _, _, _, hist, imps = line.split("\t")
        cands = [(c.rsplit("-", 1)[0], int(c.rsplit("-", 1)[1])) for c in imps.split() if not c.startswith("UNK")]
        upe = pred.encode_user_texts([[text[h] for h in hist.split()]]).upe
        emb = pred.encode_item_texts([text[c] for c, _ in cands])
        pairs.append(([y for _, y in cands], pred.score(upe, emb.cpe, emb.key)[0]))
    direct = mean_metrics(pairs)
    for m in ("auc", "mrr", "ndcg10"):
        assert res["new"][m] == pytest.approx(getattr(direct, m), abs=1e-5), m
