"""Benchmark: precompute items/s and users/s of the Ray Data actor-pool job
(``train.embed.run_embed``) vs a single-process forward over the same items and users with the
same batch size.

    python -m bench.embed_bench            # 200k items (Book-Crossing's catalog tiled), 20k users, 3 repeats
    python -m bench.embed_bench --quick    # 2k items, 200 users, 1 repeat

Model: the quality study's config (random-init T5, d_model 64, 2+2 layers), registered once in the
bench MLflow store; throughput does not depend on the weights' values (user summaries are
generated greedily up to summary_tokens either way). Items: Book-Crossing's prepared catalog
(2,030 books, their token ids from the prepare job) repeated under new ids up to the item count;
users: the prepared users (G x L session ids) likewise (user encoding generates a summary of up to
32 tokens per user, so users cost far more than items).

- Ray: ``run_embed`` on a local cluster that is already up: ONE actor pool of
  ``infer.actors`` = 2 model replicas (1 CPU and 1 torch thread each) runs every call, items
  first, then users; each call reads its rows of items.parquet / users/, encodes them in batches
  of ``infer.batch_size`` = 64 and writes a parquet part. Its items figure is items over the
  time from the job start to the last item call's end (the pool's start-up included: process
  start, torch/transformers imports, model load); the users figure is users over the span of the
  user calls (the pool is running by then: one start-up serves both). Steady figures: rows over
  the kind's own call span.
- Single process: a fresh interpreter (``--single-process``), torch threads = 2: imports torch and
  transformers, loads the model, reads items.parquet, the same ``Predictor.encode_item_tokens``
  per batch of 64, writes the same columns with the same writer; then the users likewise with the
  same model (``Predictor.encode_users``). Figures: items as a job (spawn -> items file written:
  what the Ray job's item figure pays too), items with imports done (from the model load), items
  steady (first batch -> file written), users (items written -> users written), and the whole job
  (spawn -> users written).

Ratios = Ray / single process, medians over repeats, alternating single-process and Ray runs
(targets: items as a job >= 0.9, users >= 0.9); the whole job's ratio (single-process seconds /
Ray seconds, both from their start to the last file) beside them. The Ray job's driver is this
already-running process (connected, imports done), as a pipeline's is. Peak memory of each
side's process tree. Writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness

os.environ.setdefault("OMP_NUM_THREADS", "1")  # Ray workers inherit it: 1 torch thread per 1-CPU actor
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray workers at the baseline's priority


def bench_config(quick: bool) -> Any:
    from bench.quality import bx_config
    from embsum.config import replace

    src = bx_config()
    cfg = replace(src, "workdir", str(harness.bench_root() / ("embed-quick" if quick else "embed")))
    for k, v in {"mlflow.experiment": "bench-embed", "mlflow.registered_model": "embsum-bench-embed",
                 "infer.actors": 2, "infer.cpus": 1.0, "infer.batch_size": 64}.items():
        cfg = replace(cfg, k, v)
    return src, cfg


def build_inputs(src: Any, cfg: Any, n_items: int, n_users: int) -> dict[str, int]:
    """items.parquet and users/ in cfg.data_dir: the source catalog and users repeated under new ids."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from embsum.data import layout

    out = cfg.data_dir
    marker = out / "bench_inputs.txt"
    want = f"{harness.data_key(src)} {n_items} {n_users}"
    if marker.is_file() and marker.read_text() == want:
        return {"items": n_items, "users": n_users}
    out.mkdir(parents=True, exist_ok=True)
    items = pq.read_table(src.data_dir / layout.ITEMS, columns=["item_id", "text", "token_ids"])
    pq.write_table(_tiled(items, n_items), out / layout.ITEMS)
    users = _tiled(pads.dataset(str(src.data_dir / layout.USERS), format="parquet").to_table(
        columns=["user_id", "history", "session_ids"]), n_users)
    (out / layout.USERS).mkdir(exist_ok=True)
    for old in (out / layout.USERS).glob("*.parquet"):
        old.unlink()
    pq.write_table(users, out / layout.USERS / "part-0.parquet")
    marker.write_text(want)
    return {"items": n_items, "users": users.num_rows}


def _tiled(table: Any, n: int) -> Any:
    """The first ``n`` rows of ``table`` repeated as often as needed, ids (column 0) made unique
    from the second copy on ('U1#1')."""
    import pyarrow as pa

    reps = -(-n // max(table.num_rows, 1))
    ids = table.column(0).to_pylist()
    new_ids = [i if k == 0 else f"{i}#{k}" for k in range(reps) for i in ids][:n]
    tiled = pa.concat_tables([table] * reps).slice(0, n)
    return tiled.set_column(0, table.schema.names[0], pa.array(new_ids, pa.string()))


def register_random_model(cfg: Any) -> tuple[str, Path]:
    from embsum.checkpoint import save_model
    from embsum.model import EmbSum
    from embsum.registry import Registry
    from embsum.tokenization import EmbSumTokenizer

    tok = EmbSumTokenizer.from_config(cfg.model)
    model = EmbSum.from_config(cfg.model, tok.sos_id, seed=0).eval()
    path = save_model(model, tok, Path(tempfile.mkdtemp(prefix="embsum-embed-bench-")) / "model",
                      metadata={"model_fingerprint": cfg.fingerprint("model")})
    reg = Registry(cfg)
    run_id = reg.start_run(f"embed-bench-{os.getpid()}")
    version = reg.log_and_register(run_id, path)
    reg.end_run(run_id)
    return version, reg.download(version, cfg.workdir_path / "models" / f"v{version}")


def single_process(cfg: Any, model_dir: Path, out_dir: Path, threads: int = 2) -> dict[str, Any]:
    """The items and users of cfg.data_dir through one Predictor in this process. Times: from the
    model load (``items_seconds``) and from the first encoded batch to the written file
    (``items_steady_per_s``, what Ray's steady rate measures); users from the items file written to
    the users file written (the same model: one load per job, as the Ray job's one pool)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch

    from embsum.arrow_tensors import table_tensor
    from embsum.data import layout
    from embsum.embeddings import embedding_table, write_shard
    from embsum.predictor import Predictor

    torch.set_num_threads(threads)
    bs = cfg.infer.batch_size
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pred = Predictor.from_dir(model_dir, batch_size=bs)  # timed: a precompute job loads its model every run
    items = pq.read_table(cfg.data_dir / layout.ITEMS, columns=["item_id", "text", "token_ids"])
    tokens = items.column("token_ids").to_pylist()
    t_steady = time.perf_counter()
    cpe, key = [], []
    for i in range(0, len(tokens), bs):  # the actor's call per batch, same batch size
        emb = pred.encode_item_tokens(tokens[i:i + bs])
        cpe.append(emb.cpe)
        key.append(emb.key)
    write_shard(embedding_table({"item_id": items.column("item_id"), "text": items.column("text"),
                                 "cpe": np.concatenate(cpe), "cpe_key": np.concatenate(key)}),
                str(out_dir / "items.parquet"))
    t_items_end = time.perf_counter()
    items_end_wall = time.time()
    users = pads.dataset(str(cfg.data_dir / layout.USERS), format="parquet").to_table(
        columns=["user_id", "history", "session_ids"])
    sess = table_tensor(users, "session_ids")
    t_users_steady = time.perf_counter()
    upe, summ = [], []
    for i in range(0, len(sess), bs):
        emb = pred.encode_users(sess[i:i + bs])
        upe.append(emb.upe)
        summ += emb.summaries
    write_shard(embedding_table({"user_id": users.column("user_id"), "history": users.column("history"),
                                 "upe": np.concatenate(upe), "summary": summ}), str(out_dir / "users.parquet"))
    t_end = time.perf_counter()
    n_i, n_u = items.num_rows, users.num_rows
    return {"items": n_i, "users": n_u, "threads": threads, "items_end_wall": items_end_wall, "end_wall": time.time(),
            "items_seconds": t_items_end - t0, "items_per_s": n_i / (t_items_end - t0),
            "items_steady_per_s": n_i / (t_items_end - t_steady),
            "users_seconds": t_end - t_items_end, "users_per_s": n_u / (t_end - t_items_end),
            "users_steady_per_s": n_u / (t_end - t_users_steady)}


def single_job(cfg: Any, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """``single_process`` as a job of its own: a fresh interpreter that imports torch and
    transformers, as the Ray job's actors do. ``cold_items_per_s``: items over the time from
    spawning it to its items file being written."""
    import json
    import subprocess

    cfg_path = out_dir / "config.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    spawned = time.time()
    done = subprocess.run([sys.executable, "-m", "bench.embed_bench", "--single-process", str(cfg_path),
                           str(model_dir), str(out_dir / "out")], capture_output=True, text=True,
                          cwd=harness.REPO, env={**os.environ, "PYTHONPATH": str(harness.REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"single-process job failed ({done.returncode}): {done.stderr[-2000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return {**res, "cold_items_seconds": res["items_end_wall"] - spawned,
            "cold_items_per_s": res["items"] / (res["items_end_wall"] - spawned),
            "job_seconds": res["end_wall"] - spawned}


def _single_process_main(cfg_json: str, model_dir: str, out_dir: str) -> int:
    import json

    import transformers.models.t5.modeling_t5  # noqa: F401 - imported here, so the warm figure excludes it

    import embsum.model  # noqa: F401
    from embsum.config import config_from_dict

    cfg = config_from_dict(json.loads(Path(cfg_json).read_text()))
    print(json.dumps(single_process(cfg, Path(model_dir), Path(out_dir))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.embed_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k items, 200 users, 1 repeat")
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--single-process", nargs=3, metavar=("CONFIG_JSON", "MODEL_DIR", "OUT_DIR"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.single_process:
        return _single_process_main(*args.single_process)
    harness.setup()
    n_items = args.items or (2000 if args.quick else 200_000)
    n_users = args.users or (200 if args.quick else 20_000)
    repeats = args.repeats or (1 if args.quick else 3)
    src, cfg = bench_config(args.quick)
    t_start = time.perf_counter()

    import ray

    from embsum.runtime import init_ray
    from train.embed import run_embed

    init_ray(cfg.ray)
    try:
        harness.ensure_prepared(src)
        counts = build_inputs(src, cfg, n_items, n_users)
        version, model_dir = register_random_model(cfg)
        ray.shutdown()
        mem_ray, mem_single = harness.TreeMemory(), harness.TreeMemory()
        rays: list[dict[str, Any]] = []
        singles: list[dict[str, Any]] = []
        for r in range(repeats):
            with mem_single, tempfile.TemporaryDirectory() as tmp:
                singles.append(single_job(cfg, model_dir, Path(tmp)))
            x = singles[-1]
            print(f"[embed bench] single process repeat {r}: items {x['cold_items_per_s']:.0f}/s as a job, "
                  f"{x['items_per_s']:.0f}/s imports done, {x['items_steady_per_s']:.0f}/s steady; "
                  f"{x['users_per_s']:.1f} users/s; job {x['job_seconds']:.1f}s", flush=True)
            with mem_ray:  # a fresh cluster per repeat, shut down after: the single process runs without one
                init_ray(cfg.ray)
                rep = run_embed(cfg, version)
                ray.shutdown()
            rays.append({k: v for k, v in rep.items() if k not in ("version", "path")})
            print(f"[embed bench] Ray Data repeat {r}: items {rep['items_per_s']:.0f}/s as a job, "
                  f"{rep['items_steady_per_s']:.0f}/s steady (pool start-up {rep['startup_s']:.1f}s); "
                  f"{rep['users_per_s']:.1f} users/s; job {rep['seconds']:.1f}s", flush=True)
    finally:
        ray.shutdown()

    def med(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
        return harness.spread([x[key] for x in rows])

    ri, si = med(rays, "items_per_s"), med(singles, "cold_items_per_s")
    ri_s, si_s, si_w = med(rays, "items_steady_per_s"), med(singles, "items_steady_per_s"), med(singles, "items_per_s")
    ru, su = med(rays, "users_per_s"), med(singles, "users_per_s")
    res = {
        "name": "embed", "quick": args.quick, "repeats": repeats, **counts,
        # headline: job vs job, each paying its own start-up (the Ray job its actors' process start,
        # imports and model load; the single process its imports and model load)
        "ray_items_per_s": ri, "single_items_per_s": si, "items_ratio": ri["median"] / si["median"], "target": 0.9,
        # once started: the actor pool (per-call writes included) vs the single process's encode loop + write
        "ray_items_steady_per_s": ri_s, "single_items_steady_per_s": si_s,
        "items_ratio_steady": ri_s["median"] / si_s["median"],
        # the Ray job vs a single process that had imported torch and transformers already
        "single_items_warm_per_s": si_w, "items_ratio_vs_warm": ri["median"] / si_w["median"],
        "ray_startup_s": med(rays, "startup_s"),
        "ray_users_per_s": ru, "single_users_per_s": su, "users_ratio": ru["median"] / su["median"],
        "users_target": 0.9,
        # the whole job, start to last file: single-process seconds / Ray seconds (> 1: Ray faster)
        "ray_job_seconds": med(rays, "seconds"), "single_job_seconds": med(singles, "job_seconds"),
        "job_ratio": harness.spread([x["job_seconds"] / y["seconds"] for x, y in zip(singles, rays, strict=True)]),
        "ray": rays, "single": singles, "actors": cfg.infer.actors, "batch_size": cfg.infer.batch_size,
        "memory": {"ray": mem_ray.report(), "single": mem_single.report()},
        "model": {k: getattr(cfg.model, k) for k in ("d_model", "num_layers", "num_decoder_layers", "user_codes",
                                                      "content_codes", "content_tokens", "summary_tokens")},
        "machine": harness.machine(), "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    path = harness.write_result("embed", res, args.out, quick=args.quick)
    print(f"embed bench: {counts['items']:,} items | Ray Data ({cfg.infer.actors} actors x 1 thread) "
          f"{ri['median']:.0f} items/s vs one process (2 threads) {si['median']:.0f} items/s as jobs: ratio "
          f"{res['items_ratio']:.3f} (target >= 0.9) | steady {ri_s['median']:.0f} vs {si_s['median']:.0f}/s: "
          f"{res['items_ratio_steady']:.3f} | vs a process with imports done {si_w['median']:.0f}/s: "
          f"{res['items_ratio_vs_warm']:.3f} | pool start-up {res['ray_startup_s']['median']:.1f}s | "
          f"{counts['users']:,} users {ru['median']:.1f} vs {su['median']:.1f}/s (ratio {res['users_ratio']:.3f}, "
          f"target >= 0.9) | whole job {res['ray_job_seconds']['median']:.0f}s vs "
          f"{res['single_job_seconds']['median']:.0f}s (ratio {res['job_ratio']['median']:.3f}) | peak RSS Ray tree "
          f"{mem_ray.report()['peak_rss_mb']:.0f} MB, single {mem_single.report()['peak_rss_mb']:.0f} MB -> {path}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
