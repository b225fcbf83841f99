"""Benchmark: training examples/s of Ray Train + DeepSpeed vs a plain single-process PyTorch loop.

    python -m bench.train_bench            # 3 repeats each, 10 warmup + 40 timed steps
    python -m bench.train_bench --quick    # 1 repeat each, 3 warmup + 10 timed steps

Same model (``EmbSum.from_config`` with the quality study's config: random-init T5, d_model 64,
2+2 layers), same data (the Book-Crossing training shards written by the prepare job, with the
offline teacher's summaries), same global batch per optimizer step (2 x 4 histories of 4 targets: 32 targets), same
loss (``embsum.losses.embsum_loss``, lambda 0.05, NCE temperature sqrt(d_model)), same AdamW
(parameter groups, lr schedule, gradient clipping 1.0), same total threads:

- Ray: the real trainer, ``train.train.run_train(register=False)``: TorchTrainer, 2 CPU workers
  (1 CPU and OMP/torch threads = 1 each), DeepSpeed ZeRO-2 over gloo, data streamed by Ray Data.
  Its figure is the ``examples_per_s`` the training loop itself reports (rank 0 times each window
  of ``log_every`` steps, x world size) for the windows after warmup, read back from MLflow: it
  excludes cluster start-up, DeepSpeed initialization and the final checkpoint (reported apart as
  the fit's wall time).
- Plain: one process, torch threads = 2, the shards read into memory once (not timed), a shuffled
  pass sliced into batches, forward + ``embsum_loss`` + backward + clip + AdamW step. Timed over the
  same windows after the same warmup.

Per repeat, throughput over the timed windows = timed examples / timed seconds. Medians over
repeats; runs alternate plain, Ray, plain, Ray ... so drifting load on a shared machine hits both.
Ray workers run at the driver's priority (``RAY_worker_niceness=0``; Ray's default is 15).
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from train.deepspeed_setup import build_deepspeed_config, zero_stage

# Before torch or Ray start: Ray workers inherit the driver's environment, so each Train worker's
# torch uses one intra-op thread (1 CPU each); the plain loop sets its own 2 threads explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")


def bench_config(quick: bool, steps: int, warmup: int, window: int) -> Any:
    from bench.quality import bx_config
    from embsum.config import replace

    cfg = bx_config(quick=False)  # the quality study's model and data (shared prepared shards)
    for k, v in {"train.max_steps": warmup + steps, "train.log_every": window, "train.checkpoint_every": warmup + steps,
                 "train.eval_batches": 0, "train.warmup_steps": 0 if quick else 5, "train.max_failures": 0,
                 "mlflow.experiment": "bench-train", "mlflow.registered_model": "embsum-bench-train"}.items():
        cfg = replace(cfg, k, v)
    return cfg


# ---- the plain loop ----------------------------------------------------------------------------------------
def load_train_arrays(cfg: Any) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pads

    from embsum.arrow_tensors import table_tensor
    from embsum.data import layout

    t = pads.dataset(str(cfg.data_dir / layout.TRAIN), format="parquet").to_table(
        columns=["example_id", "session_ids", "candidate_ids", "labels"])
    return {"example_id": np.asarray(t.column("example_id").to_pylist(), dtype=object),
            "session_ids": table_tensor(t, "session_ids", np.int32),
            "candidate_ids": table_tensor(t, "candidate_ids", np.int32),
            "labels": np.stack([np.asarray(x, np.int64) for x in t.column("labels").to_pylist()])}


def plain_loop(cfg: Any, arrays: dict[str, np.ndarray], summaries: dict[str, np.ndarray], warmup: int,
               steps: int, window: int, threads: int = 2) -> dict[str, Any]:
    import torch

    from embsum.losses import batch_negative_scores, embsum_loss, grouped_rows
    from embsum.model import EmbSum
    from embsum.tokenization import EmbSumTokenizer
    from train.worker import _lr_lambda

    torch.set_num_threads(threads)
    t = cfg.train
    torch.manual_seed(t.seed)
    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, seed=t.seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "codes" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "codes" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps, t.max_steps))
    temperature = t.nce_temperature or math.sqrt(model.d_model)
    empty = tok.empty_summary()  # (S,)
    batch = t.batch_size * t.num_workers  # the global batch of one optimizer step
    order = np.random.default_rng(t.seed).permutation(len(arrays["example_id"]))
    marks: list[float] = []
    losses: list[float] = []
    for step in range(warmup + steps):
        if step == warmup:
            marks.append(time.perf_counter())
        idx = order[(step * batch) % (len(order) - batch + 1):][:batch]
        sess = torch.as_tensor(arrays["session_ids"][idx], dtype=torch.long)
        cand = torch.as_tensor(arrays["candidate_ids"][idx], dtype=torch.long)
        labels = torch.as_tensor(arrays["labels"][idx])
        summ = torch.as_tensor(np.stack([summaries.get(str(e), empty) for e in arrays["example_id"][idx]]),
                               dtype=torch.long)
        out = model(sess, cand, summ)  # the same step as train/loop.py's train_step
        extra = batch_negative_scores(out.upe, out.cpe, out.cpe_key, cand, labels) if t.in_batch_negatives else None
        rows, extra = grouped_rows(out.scores, labels, 1 + cfg.data.negatives, extra)
        parts = embsum_loss(rows, out.summary_nll, t.summary_weight, temperature, extra)
        parts.total.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(parts.total.detach()))
        if step >= warmup and (step + 1 - warmup) % window == 0:
            marks.append(time.perf_counter())
    dts = np.diff(marks)
    return {"examples_per_s": steps * batch / float(sum(dts)),
            "window_examples_per_s": [window * batch / float(d) for d in dts],
            "first_loss": losses[0], "last_loss": float(np.mean(losses[-window:])), "threads": threads}


# ---- the Ray Train side ------------------------------------------------------------------------------------
def ray_fit(cfg: Any, repeat: int, warmup: int, window: int) -> dict[str, Any]:
    from embsum.config import replace
    from embsum.registry import Registry
    from train.train import run_train

    cfg = replace(cfg, "train.run_name", f"bench-train-{os.getpid()}-{repeat}-{int(time.time())}")
    t0 = time.perf_counter()
    out = run_train(cfg, register=False)
    wall = time.perf_counter() - t0
    hist = Registry(cfg).client.get_metric_history(out["mlflow_run_id"], "examples_per_s")
    wins = sorted((m.step, m.value) for m in hist if m.step - window >= warmup)
    batch = cfg.train.batch_size * cfg.train.num_workers
    secs = sum(window * batch / v for _, v in wins)  # each window's seconds, from its rate
    loss = sorted((m.step, m.value) for m in Registry(cfg).client.get_metric_history(out["mlflow_run_id"], "loss"))
    return {"examples_per_s": len(wins) * window * batch / secs, "window_examples_per_s": [v for _, v in wins],
            "window_steps": [s for s, _ in wins], "fit_wall_seconds": round(wall, 1),
            "first_loss": loss[0][1] if loss else None, "last_loss": loss[-1][1] if loss else None}


def ray_job(cfg: Any, repeat: int, warmup: int, window: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ray_fit`` in a fresh driver process (``--ray-fit``), as `embsum train` runs: its local Ray
    cluster and workers descend from it, so the memory sampled is the training process tree alone
    (this process has run the plain loop: its model, arrays and allocator caches are not part of
    what training on Ray costs). -> (the fit's figures, that tree's memory report)."""
    import json
    import subprocess
    import tempfile as tf

    with tf.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "fit.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        proc = subprocess.Popen([sys.executable, "-m", "bench.train_bench", "--ray-fit", str(cfg_path), str(repeat),
                                 str(warmup), str(window), str(out_path)], cwd=harness.REPO,
                                env={**os.environ, "PYTHONPATH": str(harness.REPO)})
        mem = harness.TreeMemory(proc.pid).start()
        code = proc.wait()
        report = mem.stop()
        if code != 0:
            raise RuntimeError(f"the Ray Train fit (repeat {repeat}) failed with exit code {code}")
        return json.loads(out_path.read_text()), report


def _ray_fit_main(cfg_json: str, repeat: str, warmup: str, window: str, out: str) -> int:
    import json

    import ray

    from embsum.config import config_from_dict
    from embsum.runtime import init_ray

    harness.setup()
    cfg = config_from_dict(json.loads(Path(cfg_json).read_text()))
    init_ray(cfg.ray)
    try:
        threads = worker_threads()  # first: its worker exits before the fit, out of the tree's peak
        fit = {**ray_fit(cfg, int(repeat), int(warmup), int(window)), "worker_torch_threads": threads}
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps(fit))
    return 0


def worker_threads() -> int:
    """torch's intra-op threads in a 1-CPU Ray task: what each Train worker gets. Run before the fit,
    in a worker that exits after it (``max_calls=1``), so a worker with torch imported for the probe
    cannot be part of the training tree's peak."""
    import ray

    @ray.remote(num_cpus=1, max_calls=1)
    def probe() -> int:
        import torch

        return torch.get_num_threads()

    return int(ray.get(probe.remote()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 warmup + 10 timed steps")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ray-fit", nargs=5, metavar=("CONFIG_JSON", "REPEAT", "WARMUP", "WINDOW", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ray_fit:
        return _ray_fit_main(*args.ray_fit)
    harness.setup()
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (10 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    window = 5 if args.quick else 10
    if steps % window:
        raise SystemExit(f"--steps must be a multiple of {window}")
    cfg = bench_config(args.quick, steps, warmup, window)

    import ray

    from embsum.runtime import init_ray
    from train.train import load_summaries

    t_start = time.perf_counter()
    init_ray(cfg.ray)
    try:
        data = harness.ensure_prepared(cfg)
        ray.shutdown()  # the plain loop's memory is measured without a Ray cluster in this process tree
        summaries = load_summaries(cfg.data_dir)
        arrays = load_train_arrays(cfg)
        plain: list[dict[str, Any]] = []
        fits: list[dict[str, Any]] = []
        mem_plain = harness.TreeMemory()
        mem_rays: list[dict[str, Any]] = []
        threads = None
        for r in range(repeats):
            with mem_plain:
                plain.append(plain_loop(cfg, arrays, summaries, warmup, steps, window))
            print(f"[train bench] plain loop repeat {r}: {plain[-1]['examples_per_s']:.1f} ex/s", flush=True)
            fit, mem = ray_job(cfg, r, warmup, window)  # a fresh driver and cluster per repeat
            threads = threads or fit.pop("worker_torch_threads")
            fits.append(fit)
            mem_rays.append(mem)
            print(f"[train bench] Ray tree peak RSS {mem['peak_rss_mb']:.0f} MB (PSS {mem['peak_pss_mb']:.0f}): "
                  + ", ".join(f"{k} x{v['n']} {v['rss_mb']:.0f}/{v['pss_mb']:.0f}"
                              for k, v in mem["breakdown_at_peak"].items()), flush=True)
            print(f"[train bench] Ray Train + DeepSpeed repeat {r}: {fits[-1]['examples_per_s']:.1f} ex/s "
                  f"(fit {fits[-1]['fit_wall_seconds']:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    # The stage the run trained with: train.zero_stage, else the DeepSpeed config file's (None in the config).
    stage = zero_stage(build_deepspeed_config(cfg, cfg.train.num_workers))
    p = harness.spread([x["examples_per_s"] for x in plain])
    q = harness.spread([x["examples_per_s"] for x in fits])
    ratio = harness.spread([f["examples_per_s"] / x["examples_per_s"] for f, x in zip(fits, plain, strict=True)])
    res = {
        "name": "train", "quick": args.quick, "repeats": repeats, "timed_steps": steps, "warmup_steps": warmup,
        "window_steps": window, "global_batch": cfg.train.batch_size * cfg.train.num_workers,
        "ray_examples_per_s": q, "plain_examples_per_s": p,
        "ratio": q["median"] / p["median"], "ratio_per_repeat": ratio, "target": 0.95,
        "ray": fits, "plain": plain, "ray_worker_torch_threads": threads, "plain_torch_threads": 2,
        "ray_workers": cfg.train.num_workers, "zero_stage": stage,
        "memory": {"ray": max(mem_rays, key=lambda m: m["peak_rss_mb"]), "plain": mem_plain.report(),
                   "ray_per_repeat": [m["peak_rss_mb"] for m in mem_rays]},
        "data": {"train_examples": (data["prepare"].get("examples") or {}).get("train"), "reused": data["reused"]},
        "model": {k: getattr(cfg.model, k) for k in ("d_model", "num_layers", "num_decoder_layers", "user_codes",
                                                      "content_codes", "num_sessions", "items_per_session")},
        "machine": harness.machine(), "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    path = harness.write_result("train", res, args.out, quick=args.quick)
    print(f"train bench: Ray Train + DeepSpeed ZeRO-{stage} ({cfg.train.num_workers} workers x "
          f"{threads} thread) {q['median']:.1f} ex/s vs plain PyTorch (1 process x 2 threads) {p['median']:.1f} ex/s | "
          f"ratio {res['ratio']:.3f} (target >= 0.95) | spread ray ±{(q['rel_spread'] or 0):.1%} plain "
          f"±{(p['rel_spread'] or 0):.1%} | peak RSS ray tree {res['memory']['ray']['peak_rss_mb']:.0f} MB "
          f"(PSS {res['memory']['ray']['peak_pss_mb']:.0f}), plain {mem_plain.report()['peak_rss_mb']:.0f} MB "
          f"-> {path}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
