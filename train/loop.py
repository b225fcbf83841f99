"""The per-worker training loop run by Ray Train (TorchTrainer) with DeepSpeed.

Ray creates the process group (gloo on CPU, NCCL on GPU); DeepSpeed reuses it, no launcher.
Every rank streams its own shard, steps, and saves + reports collectively (DeepSpeed checkpoints
are collective, and every rank must call ``ray.train.report`` the same number of times).

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
import math
import os
import signal
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

# Ray Train routes worker logging (and re-routes print) to the driver; logging directly avoids
# the doubled lines that print gets when Ray has also wrapped stdout.
log = logging.getLogger("embsum.train")


def _collate(empty_summary: np.ndarray, device: Any):
    """Numpy batch -> tensors. Training batches carry each user's teacher summary ids (joined in the
    dataset, train/summaries.py); others (validation, no summaries) get EOS-only ones."""
    import torch

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["session_ids"])
        summ = np.asarray(batch["summary_ids"]) if "summary_ids" in batch else \
            np.broadcast_to(empty_summary, (n, len(empty_summary)))  # (B, S)
        return {
            "session_ids": torch.as_tensor(np.asarray(batch["session_ids"]), dtype=torch.long, device=device),
            "candidate_ids": torch.as_tensor(np.asarray(batch["candidate_ids"]), dtype=torch.long, device=device),
            "summary_ids": torch.as_tensor(summ, dtype=torch.long, device=device),
            "has_summary": int(np.sum(batch["has_summary"])) if "has_summary" in batch else 0,
        }

    return collate


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def example_auc(scores: np.ndarray) -> np.ndarray:
    """Per example (positive first): share of negatives ranked below the positive, ties 1/2."""
    pos = scores[:, :1]  # (B, 1)
    neg = scores[:, 1:]  # (B, K)
    return ((pos > neg).sum(1) + 0.5 * (pos == neg).sum(1)) / neg.shape[1]  # (B,)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from embsum.checkpoint import save_model
    from embsum.config import config_from_dict
    from embsum.losses import embsum_loss
    from embsum.model import EmbSum, count_parameters
    from embsum.scoring import score
    from embsum.tokenization import EmbSumTokenizer
    from train.deepspeed_setup import build_deepspeed_config, resolve_precision, zero_stage

    cfg = config_from_dict(loop_config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if t.use_gpu else "cpu")
    if t.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(t.seed)

    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, seed=t.seed)
    ds_config = build_deepspeed_config(cfg, world)
    stage = zero_stage(ds_config)
    model.synced_generation = stage == 3 and world > 1  # all ranks step generate() together under ZeRO-3
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "codes" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "codes" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, t.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config, dist_init_required=False)
    dtype = torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32
    temperature = t.nce_temperature or math.sqrt(model.d_model)

    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            engine.load_checkpoint(str(Path(d) / "ds"), tag=state["tag"], load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            step = int(state["step"])
        if rank == 0:
            log.info(f"[train] resumed from step {step} ({ckpt.path})")

    empty = np.zeros((cfg.model.summary_tokens,), np.int32)
    empty[0] = tok.eos_id
    collate = _collate(empty, device)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid") if t.eval_batches > 0 else None
    tracker = _Tracker(cfg, loop_config.get("mlflow_run_id")) if rank == 0 else None
    if tracker and step == 0:
        tracker.log({"params_total": count_parameters(model)}, 0)

    def validate() -> dict[str, float]:
        if valid_shard is None:
            return {}
        engine.eval()
        aucs: list[np.ndarray] = []
        with torch.no_grad():
            for i, b in enumerate(valid_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate,
                                                                 drop_last=False)):
                if i >= t.eval_batches:
                    break
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    bsz, c, lc = b["candidate_ids"].shape
                    upe = engine.module.encode_user(b["session_ids"])  # generating mode, as at inference
                    cpe, key = engine.module.encode_content(b["candidate_ids"].reshape(bsz * c, lc))
                    s = score(upe, cpe.view(bsz, c, *cpe.shape[1:]), key.view(bsz, c, *key.shape[1:]))
                aucs.append(example_auc(s.float().cpu().numpy()))
        engine.train()
        local = np.concatenate(aucs) if aucs else np.zeros((0,))
        tot = torch.tensor([float(local.sum()), float(len(local))], dtype=torch.float64)
        dist.all_reduce(tot)  # every rank contributes its shard; all ranks see the mean
        return {"val_auc": float(tot[0] / tot[1])} if tot[1] > 0 else {}

    def save_and_report(metrics: dict[str, Any]) -> None:
        tag = f"step_{step:08d}"
        # Every rank runs the probe forward: under ZeRO-3 each module's forward gathers its
        # parameters collectively, so a forward on rank 0 alone would hang.
        probe_scores = _probe_scores(engine.module, probe)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(str(Path(tmp) / "ds"), tag=tag, client_state={"step": step})
            params = list(engine.module.parameters())
            # ZeRO-3 holds a shard of each parameter per rank: gather (collectively) before writing.
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage == 3 else nullcontext():
                if rank == 0:
                    save_model(engine.module, tok, Path(tmp) / "model",
                               metadata={"step": step, "run_name": loop_config["run_name"],
                                         "model_fingerprint": cfg.fingerprint("model"), **metrics})
            if rank == 0:
                np.savez(Path(tmp) / "probe.npz", **probe, scores=probe_scores)
                (Path(tmp) / "state.json").write_text(json.dumps({"step": step, "tag": tag, **metrics}))
            ray.train.report({**metrics, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{tag}")

    probe = loop_config["probe"]
    fail_marker = Path(loop_config["fail_marker"]) if t.fail_at_step else None
    engine.train()
    epoch, micro = 0, 0
    t_last, ex_since, tok_since = time.perf_counter(), 0, 0
    window: dict[str, float] = {"loss": 0.0, "nce": 0.0, "summary": 0.0, "n": 0}
    done = resumed_complete = step >= t.max_steps
    while not done:
        epoch += 1
        for b in train_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate, drop_last=True,
                                                local_shuffle_buffer_size=max(256, 4 * t.batch_size),
                                                local_shuffle_seed=t.seed * 100003 + step + epoch):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = engine(b["session_ids"], b["candidate_ids"], b["summary_ids"])
            parts = embsum_loss(out.scores, out.summary_logits, b["summary_ids"], t.summary_weight, tok.pad_id,
                                temperature)
            engine.backward(parts.total)
            engine.step()  # DeepSpeed accumulates; it steps optimizer + schedule on the boundary
            ex_since += b["session_ids"].shape[0]
            tok_since += int((b["session_ids"] != 0).sum() + (b["candidate_ids"] != 0).sum()
                             + (b["summary_ids"] != 0).sum())
            for k, v in (("loss", parts.total), ("nce", parts.nce), ("summary", parts.summary)):
                window[k] += float(v.detach())
            window["n"] += 1
            micro += 1
            if micro % t.grad_accum:
                continue
            step += 1
            if fail_marker is not None and step == t.fail_at_step and rank == min(1, world - 1) \
                    and not fail_marker.exists():
                fail_marker.parent.mkdir(parents=True, exist_ok=True)
                fail_marker.write_text(str(os.getpid()))
                log.warning(f"[train] fail_at_step={step}: rank {rank} kills itself (pid {os.getpid()})")
                os.kill(os.getpid(), signal.SIGKILL)
            last = step >= t.max_steps
            if step % t.log_every == 0 or last or step % t.checkpoint_every == 0:
                dt = time.perf_counter() - t_last
                n = max(1, window["n"])
                metrics = {"loss": window["loss"] / n, "nce_loss": window["nce"] / n,
                           "summary_loss": window["summary"] / n, "lr": scheduler.get_last_lr()[0],
                           "examples_per_s": ex_since * world / dt, "tokens_per_s": tok_since * world / dt,
                           "epoch": epoch}
                window = {"loss": 0.0, "nce": 0.0, "summary": 0.0, "n": 0}
                t_last, ex_since, tok_since = time.perf_counter(), 0, 0
                if step % t.checkpoint_every == 0 or last:
                    metrics.update(validate())
                    if tracker:
                        tracker.log(metrics, step)
                        log.info(f"[train] step {step}/{t.max_steps} " + " ".join(
                            f"{k}={v:.4g}" for k, v in metrics.items()))
                    save_and_report(metrics)
                else:
                    if tracker:
                        tracker.log(metrics, step)
                        log.info(f"[train] step {step}/{t.max_steps} loss={metrics['loss']:.4f} "
                                 f"nce={metrics['nce_loss']:.4f} sum={metrics['summary_loss']:.4f} "
                                 f"ex/s={metrics['examples_per_s']:.1f}")
                    ray.train.report({**metrics, "step": step})
            if last:
                done = True
                break
        if epoch > 10_000:
            raise RuntimeError("training shard is empty: no batch of train.batch_size examples per worker")
    if resumed_complete:
        # Resumed a finished run: nothing to train; report once so the driver gets metrics.
        ray.train.report({"step": step, "resumed_complete": 1})


def _probe_scores(model: Any, probe: dict[str, np.ndarray]) -> np.ndarray:
    """Scores of the fixed probe batch under this exact model (eval mode, teacher-forced)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*(torch.as_tensor(probe[k], dtype=torch.long, device=next(model.parameters()).device)
                      for k in ("session_ids", "candidate_ids", "summary_ids")))
    model.train(was_training)
    return out.scores.float().cpu().numpy()


class _Tracker:
    """Rank-0 MLflow logging (Ray's MLflowLoggerCallback is Tune-only)."""

    def __init__(self, cfg: Any, run_id: str | None) -> None:
        self.run_id = run_id
        self.registry = None
        if run_id:
            from embsum.registry import Registry

            self.registry = Registry(cfg)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.registry and self.run_id:
            clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.registry.log_metrics(self.run_id, clean, step)
