"""The per-worker training loop run by Ray Train (TorchTrainer) with DeepSpeed.

Ray creates the process group (gloo on CPU, NCCL on GPU); DeepSpeed reuses it, no launcher.
Every rank streams its own shard, steps, and saves + reports collectively (DeepSpeed checkpoints
are collective, and every rank must call ``ray.train.report`` the same number of times).

Named steps: ``setup`` (train/worker.py: model, engine, data shards), ``resume``, ``train_step`` (within ``train_pass``,
one pass over the shard), ``validate`` (the model's own scores on this rank's fixed validation rows,
train/validation_set.py; ``embsum.metrics``' AUC) and
``save_and_report``; ``train_loop_per_worker`` strings them together.

A checkpoint holds: ``ds/`` (DeepSpeed engine: weights, optimizer, scheduler, client state),
``model/`` (rank 0: the consolidated model for serving, ZeRO-3 shards gathered first),
``probe.npz`` (rank 0: a fixed input batch and the scores this model gives it, so the registered
copy can be checked bit-for-bit later) and ``state.json``.

Restored on resume: weights, optimizer, LR schedule, step, RNG seed of the next pass. Not
restored: the exact position inside a pass over the data: a resumed run starts a fresh,
differently shuffled pass, which for step-based training is statistically the same.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .validation_set import collated, fixed_rows
from .worker import Worker, setup

# Ray Train routes worker logging (and re-routes print) to the driver; logging directly avoids
# the doubled lines that print gets when Ray has also wrapped stdout.
log = logging.getLogger("embsum.train")


def resume(w: Worker) -> None:
    """Weights, optimizer, schedule and step from Ray Train's latest checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        w.engine.load_checkpoint(str(Path(d) / "ds"), tag=state["tag"], load_optimizer_states=True,
                                 load_lr_scheduler_states=True)
        w.step = int(state["step"])
    if w.rank == 0:
        log.info(f"[train] resumed from step {w.step} ({ckpt.path})")


def _autocast(w: Worker) -> Any:
    import torch

    return torch.autocast(w.device.type, dtype=w.dtype, enabled=w.dtype != torch.float32)


def train_step(w: Worker, b: dict[str, Any]) -> None:
    """Forward, loss (NCE over the sampled and, optionally, in-batch negatives + lambda * summary), step.
    An example holds T targets sharing one history (data.targets_per_example): the user side is
    encoded once and each target's block [positive, K negatives] is one NCE row."""
    from embsum.losses import batch_negative_scores, embsum_loss, grouped_rows

    t = w.cfg.train
    with _autocast(w):
        out = w.engine(b["session_ids"], b["candidate_ids"], b["summary_ids"])  # scores (B, T*C)
        extra = batch_negative_scores(out.upe, out.cpe, out.cpe_key, b["candidate_ids"], b["labels"]) \
            if t.in_batch_negatives else None
    scores, extra = grouped_rows(out.scores, b["labels"], 1 + w.cfg.data.negatives, extra)  # (R, C), (R, X)
    parts = embsum_loss(scores, out.summary_nll, t.summary_weight, w.temperature, extra)
    w.engine.backward(parts.total)
    w.engine.step()  # DeepSpeed accumulates; it steps optimizer + schedule on the boundary
    w.examples += b["session_ids"].shape[0]
    w.tokens += int((b["session_ids"] != 0).sum() + (b["candidate_ids"] != 0).sum() + (b["summary_ids"] != 0).sum())
    for k, v in (("loss", parts.total), ("nce", parts.nce), ("summary", parts.summary)):
        w.window[k] += float(v.detach())
    w.window["n"] += 1


def validation_scores(model: Any, batches: Iterable[dict[str, Any]], autocast: Any = nullcontext
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels (B, C), scores (B, C)) of each validation batch, scored as evaluation and serving score
    them: the model's forward in generating mode (no teacher summary), i.e. ``score(encode_user,
    encode_content)``."""
    import torch

    for b in batches:
        with torch.no_grad(), autocast():
            scores = model(b["session_ids"], b["candidate_ids"]).scores  # (B, C)
        yield b["labels"].cpu().numpy(), scores.float().cpu().numpy()


def auc_total(scored: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """(sum of the examples' AUCs, examples with a positive and a negative), by ``embsum.metrics``:
    what each rank contributes to the mean over all ranks."""
    from embsum.metrics import mean_metrics

    s = mean_metrics((y, x) for labels, scores in scored for y, x in zip(labels, scores, strict=True))
    return (s.auc * s.impressions, s.impressions) if s.impressions else (0.0, 0)


def validate(w: Worker) -> dict[str, float]:
    """Mean AUC over all ranks of this rank's fixed validation batches (``validation_scores``, ``auc_total``)."""
    import torch
    import torch.distributed as dist

    if w.valid_dir is None:
        return {}
    t = w.cfg.train
    bs = t.eval_batch_size or t.batch_size
    if w.valid_rows is None:  # read once: the same rows at every validation (train/validation_set.py)
        w.valid_rows = fixed_rows(w.valid_dir, w.rank, w.world, t.eval_batches, bs)
    w.engine.eval()
    total, n = auc_total(validation_scores(w.engine.module, collated(w.valid_rows, bs, w.collate),
                                           lambda: _autocast(w)))
    w.engine.train()
    tot = torch.tensor([total, float(n)], dtype=torch.float64)
    dist.all_reduce(tot)  # every rank contributes its rows; all ranks see the mean
    return {"val_auc": float(tot[0] / tot[1])} if tot[1] > 0 else {}


def save_and_report(w: Worker, metrics: dict[str, Any]) -> None:
    """Collective checkpoint (DeepSpeed state + rank 0's consolidated model and probe) and report."""
    import deepspeed
    import ray.train

    from embsum.checkpoint import save_model

    tag = f"step_{w.step:08d}"
    probe = w.loop_config["probe"]
    # Every rank runs the probe forward: under ZeRO-3 each module's forward gathers its
    # parameters collectively, so a forward on rank 0 alone would hang.
    probe_scores = _probe_scores(w.engine.module, probe)
    with tempfile.TemporaryDirectory() as tmp:
        w.engine.save_checkpoint(str(Path(tmp) / "ds"), tag=tag, client_state={"step": w.step})
        params = list(w.engine.module.parameters())
        # ZeRO-3 holds a shard of each parameter per rank: gather (collectively) before writing.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if w.stage == 3 else nullcontext():
            if w.rank == 0:
                save_model(w.engine.module, w.tok, Path(tmp) / "model",
                           metadata={"step": w.step, "run_name": w.loop_config["run_name"],
                                     "model_fingerprint": w.cfg.fingerprint("model"),
                                     # how item text was formatted: new data is evaluated the same way
                                     "item_text_fields": list(w.cfg.data.item_text_fields),
                                     "item_text_max_chars": w.cfg.data.item_text_max_chars, **metrics})
        if w.rank == 0:
            np.savez(Path(tmp) / "probe.npz", **probe, scores=probe_scores)
            (Path(tmp) / "state.json").write_text(json.dumps({"step": w.step, "tag": tag, **metrics}))
        ray.train.report({**metrics, "step": w.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{tag}")


def _window_metrics(w: Worker) -> dict[str, float]:
    dt = time.perf_counter() - w.last_report
    n = max(1, w.window["n"])
    m = {"loss": w.window["loss"] / n, "nce_loss": w.window["nce"] / n, "summary_loss": w.window["summary"] / n,
         "lr": w.scheduler.get_last_lr()[0], "examples_per_s": w.examples * w.world / dt,
         "tokens_per_s": w.tokens * w.world / dt, "epoch": w.epoch}
    w.window = {"loss": 0.0, "nce": 0.0, "summary": 0.0, "n": 0}
    w.last_report, w.examples, w.tokens = time.perf_counter(), 0, 0
    return m


def _maybe_fail(w: Worker) -> None:
    """Testing only (train.fail_at_step): one rank kills itself once, to exercise recovery."""
    t = w.cfg.train
    marker = Path(w.loop_config["fail_marker"]) if t.fail_at_step else None
    if marker is None or w.step != t.fail_at_step or w.rank != min(1, w.world - 1) or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log.warning(f"[train] fail_at_step={w.step}: rank {w.rank} kills itself (pid {os.getpid()})")
    os.kill(os.getpid(), signal.SIGKILL)


def _after_step(w: Worker) -> None:
    """Log every log_every steps; validate, checkpoint and report every checkpoint_every and at the end."""
    import ray.train

    t = w.cfg.train
    last = w.step >= t.max_steps
    ckpt = w.step % t.checkpoint_every == 0 or last
    if not (ckpt or w.step % t.log_every == 0):
        return
    metrics = _window_metrics(w)
    if ckpt:
        metrics.update(validate(w))
        w.val_auc = metrics.get("val_auc", w.val_auc)
    if w.tracker:
        w.tracker.log(metrics, w.step)
        log.info(f"[train] step {w.step}/{t.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if ckpt:
        save_and_report(w, metrics)
    else:
        ray.train.report({**metrics, "step": w.step})


def _progress_event(w: Worker) -> None:
    """Rank 0's step count and loss for the console (embsum/events.py), at most once a second: Ray
    forwards the line to the driver, which `embsum` reads. The loss is the mean since the last logged
    window (before _after_step resets it)."""
    from embsum import events

    now = time.perf_counter()
    if w.rank != 0 or (now - w.last_event < 1.0 and w.step < w.cfg.train.max_steps):
        return
    w.last_event = now
    loss = w.window["loss"] / w.window["n"] if w.window["n"] else None
    events.progress("training", w.step, w.cfg.train.max_steps, "steps", out=log.info, loss=loss, val_auc=w.val_auc)


def train_pass(w: Worker) -> None:
    """One pass over this rank's shard (freshly shuffled), stepping until it ends or max_steps."""
    t = w.cfg.train
    w.epoch += 1
    batches = 0
    for b in w.train_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=w.collate, drop_last=True,
                                              local_shuffle_buffer_size=max(256, 4 * t.batch_size),
                                              local_shuffle_seed=t.seed * 100003 + w.step + w.epoch):
        batches += 1
        train_step(w, b)
        w.micro += 1
        if w.micro % t.grad_accum:
            continue
        w.step += 1
        _maybe_fail(w)
        _progress_event(w)
        _after_step(w)
        if w.step >= t.max_steps:
            return
    if batches == 0:
        raise RuntimeError("training shard is empty: no batch of train.batch_size examples on this worker")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """setup -> resume -> passes of train_step (validate and save_and_report every checkpoint_every)."""
    import ray.train

    w = setup(loop_config)
    resume(w)
    if w.step >= w.cfg.train.max_steps:
        # Resumed a finished run: nothing to train; report once so the driver gets metrics.
        ray.train.report({"step": w.step, "resumed_complete": 1})
        return
    w.engine.train()
    while w.step < w.cfg.train.max_steps:
        train_pass(w)


def _probe_scores(model: Any, probe: dict[str, np.ndarray]) -> np.ndarray:
    """Scores of the fixed probe batch under this exact model (eval mode, teacher-forced)."""
    import torch

    from embsum.arrow_tensors import writable

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():  # the probe came through Ray's object store: read-only arrays
        out = model(*(torch.from_numpy(writable(probe[k], np.int64)).to(device)
                      for k in ("session_ids", "candidate_ids", "summary_ids")))
    model.train(was_training)
    return out.scores.float().cpu().numpy()
