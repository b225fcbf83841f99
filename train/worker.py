"""What one training rank holds (``Worker``) and ``setup``, which builds it: the model, optimizer
and DeepSpeed engine, the batch collation, this rank's data shards and rank 0's MLflow tracker.
The steps that run on it are in train/loop.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def _collate(empty_summary: np.ndarray, device: Any):
    """Numpy batch -> tensors. Training batches carry each example's teacher summary ids (joined in
    the dataset, file by file: train/summaries.py); others (validation, or a run without summaries)
    get EOS-only ones."""
    import torch

    from embsum.arrow_tensors import writable

    def long_tensor(a: Any) -> Any:  # Ray Data's numpy batches can be read-only Arrow memory
        return torch.from_numpy(writable(a, np.int64)).to(device)

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["session_ids"])
        summ = batch["summary_ids"] if "summary_ids" in batch else np.tile(empty_summary, (n, 1))  # (B, S)
        cands = long_tensor(batch["candidate_ids"])  # (B, T*C, Lc)
        labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
        return {
            "session_ids": long_tensor(batch["session_ids"]),  # (B, G, L)
            "candidate_ids": cands,
            "labels": torch.as_tensor(np.stack(labels), dtype=torch.long, device=device),  # (B, T*C)
            "summary_ids": long_tensor(summ),  # (B, S)
        }

    return collate


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@dataclass
class Worker:
    """Everything one rank holds while training."""

    cfg: Any
    loop_config: dict[str, Any]
    rank: int
    world: int
    device: Any
    dtype: Any
    engine: Any
    scheduler: Any
    tok: Any
    stage: int
    temperature: float
    collate: Any
    train_shard: Any
    valid_dir: Path | None  # the validation examples (None: no validation), read by train/validation_set.py
    tracker: _Tracker | None
    valid_rows: dict[str, np.ndarray] | None = None  # this rank's validation rows, read at the first validation
    step: int = 0  # optimizer steps
    micro: int = 0  # micro-batches (grad_accum of them make a step)
    epoch: int = 0
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "nce": 0.0, "summary": 0.0, "n": 0})
    last_report: float = field(default_factory=time.perf_counter)
    last_event: float = 0.0
    val_auc: float | None = None
    examples: int = 0
    tokens: int = 0


def setup(loop_config: dict[str, Any]) -> Worker:
    """Model, optimizer and DeepSpeed engine; this rank's data shards; rank 0's MLflow tracker."""
    import deepspeed
    import ray.train
    import torch

    from embsum.config import config_from_dict
    from embsum.model import EmbSum, count_parameters
    from embsum.tokenization import EmbSumTokenizer

    from .deepspeed_setup import build_deepspeed_config, resolve_precision, skip_shm_comm_build, zero_stage

    cfg = config_from_dict(loop_config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if t.use_gpu else "cpu")
    if t.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(t.seed)
    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, pad_id=tok.pad_id, eos_id=tok.eos_id, seed=t.seed)
    if (model.pad_id, model.eos_id) != (tok.pad_id, tok.eos_id):  # a pretrained backbone's own ids
        raise ValueError(f"model.backbone={cfg.model.backbone!r} has pad/eos ids {model.pad_id}/{model.eos_id}, "
                         f"the tokenizer ({cfg.model.tokenizer!r}) {tok.pad_id}/{tok.eos_id}: use the backbone's "
                         f"own tokenizer")
    ds_config = build_deepspeed_config(cfg, world)
    stage = zero_stage(ds_config)
    model.synced_generation = stage == 3 and world > 1  # all ranks step generate() together under ZeRO-3
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "codes" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "codes" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.warmup_steps, t.max_steps))
    # DeepSpeed's ZeRO-1/2 step gathers the updated partitions with torch.distributed.all_gather_into_tensor,
    # which torch 2.13 deprecates (FutureWarning, once per worker, in logs/train.log): DeepSpeed's call,
    # not ours (embsum/console.py lists what the logs hold and why).
    if not t.use_gpu:
        skip_shm_comm_build()
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, dist_init_required=False)
    tracker = _Tracker(cfg, loop_config.get("mlflow_run_id")) if rank == 0 else None
    w = Worker(cfg=cfg, loop_config=loop_config, rank=rank, world=world, device=device,
               dtype=torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32,
               engine=engine, scheduler=scheduler, tok=tok, stage=stage,
               temperature=t.nce_temperature or math.sqrt(model.d_model),
               collate=_collate(tok.empty_summary(), device),
               train_shard=ray.train.get_dataset_shard("train"),
               valid_dir=Path(loop_config["valid_dir"]) if t.eval_batches > 0 else None, tracker=tracker)
    if tracker:
        tracker.log({"params_total": count_parameters(model)}, 0)
    return w


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
