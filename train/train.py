"""`embsum train`: Ray Train (TorchTrainer, Train V2) + DeepSpeed over the prepared shards, tracked in
MLflow, ending with the best checkpoint's consolidated model logged and registered.

Thin glue: the model, loss and checkpoint format live in ``embsum``; the per-worker loop in
``train/loop.py``; the DeepSpeed config in ``train/deepspeed_setup.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from embsum import events
from embsum.config import Config
from embsum.data import layout
from embsum.resources import preflight_train
from embsum.runtime import init_ray


def _git_commit() -> str:
    if os.environ.get("EMBSUM_GIT_COMMIT"):
        return os.environ["EMBSUM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_summaries(data_dir: Path) -> dict[str, np.ndarray]:
    """example_id -> summary ids (S,) int32, from the summarize stage's parquet: every example's, in
    this process (the single-process bench loop uses it; the Ray trainer joins them per file instead,
    train/summaries.py)."""
    from .summaries import read_summaries

    d = data_dir / layout.SUMMARIES
    if not d.exists():
        return {}
    ids, arr = read_summaries(d)
    return {str(u): arr[i] for i, u in enumerate(ids.to_pylist())}


def probe_batch(valid_dir: Path, empty: np.ndarray, n: int = 4) -> dict[str, np.ndarray]:
    """A few fixed examples whose scores are recorded at each checkpoint and rechecked after
    registration, so a serialization bug can never ship silently. The first rows of the validation
    examples, read as the workers read their validation rows (train/validation_set.py: straight
    from the parquet files; a Ray Data execution for four rows took 5-14 s of start-up on 2 cores)."""
    from .validation_set import rank_rows, read_batches

    rows = rank_rows(read_batches(valid_dir, n), 0, 1, n)  # the first n rows, in file order
    if not rows:
        raise ValueError(f"{valid_dir} has no validation examples: run `embsum prepare` first")
    return {
        "session_ids": rows["session_ids"].astype(np.int32, copy=False),  # (n, G, L)
        "candidate_ids": rows["candidate_ids"].astype(np.int32, copy=False),  # (n, C, Lc)
        "summary_ids": np.stack([empty] * len(rows["session_ids"])).astype(np.int32),  # (n, S) EOS-only
    }


def run_train(cfg: Config, *, register: bool = True) -> dict[str, Any]:
    """Fit, then log + register the best checkpoint's consolidated model. -> a result summary."""
    from embsum.registry import Registry

    from .deepspeed_setup import build_deepspeed_config

    t0 = time.perf_counter()
    t = cfg.train
    summarized = _check_inputs(cfg)
    ds_config = build_deepspeed_config(cfg, t.num_workers)  # validate before starting anything
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    # Fail in seconds, naming the numbers, where Ray would wait forever: workers that fit nowhere,
    # or no CPU left for the Ray Data tasks that stream the training data.
    preflight_train(t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0)
    if not t.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_name = t.run_name or time.strftime("embsum-%Y%m%d-%H%M%S")
    datasets, probe = _datasets(cfg, summarized)
    registry = Registry(cfg)
    tags = _run_tags(cfg, run_name, ds_config)
    run_id = _find_or_start_run(registry, run_name, tags)
    registry.log_params(run_id, {**cfg.flat(), "deepspeed": ds_config})
    loop_config = {
        "cfg": cfg.to_dict(), "probe": probe, "run_name": run_name,
        "valid_dir": str(cfg.data_dir / layout.VALID_EXAMPLES),  # each worker reads its fixed validation rows
        "mlflow_run_id": run_id, "fail_marker": str(Path(tempfile.gettempdir()) / f"embsum-fail-{run_name}"),
    }
    events.progress(f"starting {t.num_workers} workers", 0, t.max_steps, "steps")
    try:
        result = _trainer(cfg, run_name, datasets, loop_config).fit()
    except Exception:
        registry.end_run(run_id, "FAILED")
        raise
    if result.error is not None:
        registry.end_run(run_id, "FAILED")
        raise RuntimeError(f"training run {run_name!r} failed: {result.error}")
    events.progress("registering the best checkpoint")
    out: dict[str, Any] = {"run_name": run_name, "mlflow_run_id": run_id, "seconds": time.perf_counter() - t0}
    out.update(_register_best(registry, result, run_id, tags, register=register, by_auc=t.eval_batches > 0))
    registry.log_metrics(run_id, {"train_seconds": out["seconds"]})
    registry.end_run(run_id)
    auc = out.get("val_auc")
    events.summary(f"run {run_name}: best step {out.get('step')} val_auc="
                   f"{round(auc, 4) if isinstance(auc, float) else auc}"
                   + (f" -> registered {cfg.mlflow.registered_model} v{out['version']}" if "version" in out else ""))
    return out


def _check_inputs(cfg: Config) -> bool:
    """Fail closed on missing prepared data or summaries -> whether teacher summaries exist."""
    from .summaries import check_partitions, has_summaries

    data_dir = cfg.data_dir
    for need in (layout.TRAIN, layout.VALID_EXAMPLES):
        if not (data_dir / need).exists():
            raise ValueError(f"{data_dir / need} not found: run `embsum prepare` first (same --config/workdir)")
    summarized = has_summaries(data_dir)
    if not summarized and cfg.train.summary_weight > 0:
        raise ValueError(f"no teacher summaries under {data_dir / layout.SUMMARIES}: run `embsum summarize` "
                         f"first, or set train.summary_weight=0")
    if summarized:
        check_partitions(data_dir)
    return summarized


def _datasets(cfg: Config, summarized: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The train Ray Dataset, and the probe batch."""
    import ray.data

    from embsum.tokenization import EmbSumTokenizer

    from .summaries import with_summaries

    ray.data.DataContext.get_current().enable_progress_bars = True
    data_dir = cfg.data_dir
    empty = EmbSumTokenizer.from_config(cfg.model).empty_summary()  # (S,)
    # Each example carries its own summary_ids, joined file by file (train/summaries.py): no worker
    # is handed every example's summary.
    train_ds = ray.data.read_parquet(str(data_dir / layout.TRAIN), include_paths=summarized)
    if summarized:
        train_ds = with_summaries(train_ds, data_dir, empty)
    # Validation is not a Ray dataset: each worker reads its fixed rows itself (train/validation_set.py).
    return {"train": train_ds}, probe_batch(data_dir / layout.VALID_EXAMPLES, empty)


def _run_tags(cfg: Config, run_name: str, ds_config: dict[str, Any]) -> dict[str, str]:
    """The MLflow run's tags: what data, teacher, code and parallelism made it."""
    from .deepspeed_setup import resolve_precision, zero_stage

    t = cfg.train
    prep, summ = _read_json(cfg.data_dir / layout.REPORT), _read_json(cfg.data_dir / layout.SUMMARY_REPORT)
    return {
        "ray_run_name": run_name, "git_commit": _git_commit(),
        "data_fingerprint": str(prep.get("fingerprint", "unknown")),
        "teacher": str(summ.get("teacher", "none")), "prompt_version": str(summ.get("prompt_version", "none")),
        "deepspeed_stage": str(zero_stage(ds_config)), "precision": resolve_precision(cfg),
        "num_workers": str(t.num_workers), "use_gpu": str(t.use_gpu),
    }


def _trainer(cfg: Config, run_name: str, datasets: dict[str, Any], loop_config: dict[str, Any]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    t = cfg.train
    storage = cfg.storage_path
    Path(storage).mkdir(parents=True, exist_ok=True) if "://" not in storage else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker,
                                                           **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute="val_auc" if t.eval_batches > 0 else None,
                checkpoint_score_order="max"),
        ),
        datasets=datasets,
    )


def _register_best(registry: Any, result: Any, run_id: str, tags: dict[str, str], *, register: bool,
                   by_auc: bool) -> dict[str, Any]:
    """The best checkpoint's step and val_auc; with ``register``, its model logged, registered and the
    registered copy checked against the probe."""
    best = _best_checkpoint(result, by_auc)
    out: dict[str, Any] = {"checkpoint": best.path, "metrics": dict(result.metrics or {})}
    with best.as_directory() as d:
        state = _read_json(Path(d) / "state.json")
        out.update({"step": state.get("step"), "val_auc": state.get("val_auc")})
        if register:
            version = registry.log_and_register(run_id, Path(d) / "model", tags={
                "ray_run_name": tags["ray_run_name"], "step": str(state.get("step")),
                "val_auc": str(state.get("val_auc")), "data_fingerprint": tags["data_fingerprint"],
                "teacher": tags["teacher"]})
            diff = verify_registered(registry, version, Path(d) / "probe.npz")
            registry.log_metrics(run_id, {"registered_probe_max_abs_diff": diff})
            out.update({"version": version, "probe_max_abs_diff": diff})
    return out


def _find_or_start_run(registry: Any, run_name: str, tags: dict[str, str]) -> str:
    """Resuming a Ray run name resumes its MLflow run too, so metrics continue on one timeline."""
    exp = registry.experiment_id()
    found = registry.client.search_runs([exp], f"tags.ray_run_name = '{run_name}'", max_results=1)
    if found:
        registry.client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return registry.start_run(run_name, tags)


def _best_checkpoint(result: Any, by_auc: bool) -> Any:
    if by_auc and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if m.get("val_auc") is not None]
        if scored:
            return max(scored, key=lambda cm: (cm[1]["val_auc"], cm[1].get("step", 0)))[0]
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint


def verify_registered(registry: Any, version: str, probe_path: Path) -> float:
    """Load the registered version back from MLflow and rescore the probe: -> max |diff|."""
    import torch

    from embsum.checkpoint import load_model

    probe = np.load(probe_path, allow_pickle=False)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model(registry.download(version, tmp))
        with torch.no_grad():
            out = model(*(torch.as_tensor(probe[k], dtype=torch.long)
                          for k in ("session_ids", "candidate_ids", "summary_ids")))
    diff = float(np.abs(out.scores.numpy() - probe["scores"]).max())
    if diff > 1e-4:
        raise RuntimeError(f"registered version {version} scores differ from the trained model by {diff:.3g}")
    return diff


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    return stage_main("python -m train.train", __doc__, lambda cfg, a: run_train(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
