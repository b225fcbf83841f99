"""Benchmark: where the memory of a training process tree goes, per kind of process.

    python -m bench.train_memory                  # ray_config.yaml (the tiny demo config), 2 workers, 40 steps
    python -m bench.train_memory --steps 20 --label before

Runs the pipeline's ``train`` stage as `embsum` does (``python -m embsum.train.train --config
ray_config.yaml``, its own Ray driver starting a local cluster) on the demo's synthetic data
(prepared and summarized once, not measured), and samples that driver's whole process tree every
0.5 s (``bench.harness.TreeMemory``): the summed RSS and PSS, and at the sample with the largest
summed RSS the processes grouped by what they are (GCS, raylet, dashboard and its agents, the
driver, ``ray::RayTrainWorker``, Train's controller, Ray Data's coordinators and read tasks, idle
workers ...) with their count, RSS and PSS. PSS splits shared pages (the object store's shared
memory, the libraries every worker maps) between the processes that map them, so the summed PSS is
what the tree really holds; the summed RSS counts shared pages once per process.

Memory does not depend on the machine's load (unlike the timings of the other benchmarks), so a
before/after comparison can come from two runs. Writes bench/results/train_memory[-LABEL].json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness

CONFIG = "ray_config.yaml"


def stage(module: str, workdir: Path, overrides: list[str], *, measure: bool = False,
          tries: int = 3) -> dict[str, Any] | None:
    """``python -m MODULE --config ray_config.yaml workdir=... OVERRIDES`` -> its tree's memory report
    when ``measure``. Its output goes to WORKDIR/logs/bench-<stage>.log. Tried again on a failure
    (on a machine at load average 50, Ray's node start times out after its fixed 30 s)."""
    for attempt in range(tries):
        try:
            return _stage_once(module, workdir, overrides, measure)
        except RuntimeError as e:
            if attempt == tries - 1:
                raise
            print(f"[train memory] {e}: trying again", flush=True)
    return None


def _stage_once(module: str, workdir: Path, overrides: list[str], measure: bool) -> dict[str, Any] | None:
    log = workdir / "logs" / f"bench-{module.split('.')[-1]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(harness.REPO), "PYTHONUNBUFFERED": "1", "RAY_TQDM": "0"}
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, "--config", CONFIG, f"workdir={workdir}", *overrides],
                                cwd=harness.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        mem = harness.TreeMemory(proc.pid).start() if measure else None
        code = proc.wait()
        report = mem.stop() if mem else None
    if code != 0:
        raise RuntimeError(f"{module} failed ({code}); log: {log}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps (train.max_steps)")
    ap.add_argument("--label", default="", help="suffix of the result file (e.g. before / after)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="more KEY=VALUE overrides for the train stage")
    args = ap.parse_args(argv)
    harness.setup()
    workdir = harness.bench_root() / "train_memory"
    marker = workdir / "prepared.ok"
    if not marker.exists():  # the demo's data, once
        for module in ("embsum.train.prepare", "embsum.train.summarize"):
            stage(module, workdir, [])
        marker.write_text("ok")
    t0 = time.perf_counter()
    train = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", *args.overrides]
    mem = stage("embsum.train.train", workdir, train, measure=True)
    assert mem is not None
    res = {"machine": harness.machine(), "config": CONFIG, "overrides": train, "seconds": time.perf_counter() - t0,
           "memory": mem}
    path = harness.write_result("train_memory" + (f"-{args.label}" if args.label else ""), res, args.out)
    print(f"train memory ({CONFIG}, {args.steps} steps): peak RSS {mem['peak_rss_mb']:.0f} MB, PSS "
          f"{mem['peak_pss_mb']:.0f} MB, {mem['max_processes']} processes at most")
    for k, v in mem["breakdown_at_peak"].items():
        print(f"  {k:40s} x{v['n']:<3d} RSS {v['rss_mb']:7.0f} MB  PSS {v['pss_mb']:7.0f} MB")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
