"""The prepared GPU check: the CUDA path of the platform end to end on one GPU, in minutes.

    bash bench/gpu_check.sh                # a GPU machine: venv with a CUDA torch, then every stage
    bash bench/gpu_check.sh --cpu          # the same entry points on CPU with tiny sizes (a dry run)
    python -m bench.gpu_check --device cpu --stages device,train,embed,serve   # the Python part alone

Stages (``--stages``, in this order):

- device: the accelerator (name, memory, the peak bf16 FLOP/s its name implies), one EmbSum forward
  on it against the same model on the CPU in fp32 (max |diff| of the scores), and a bf16 autocast
  forward + backward that must give finite gradients.
- unit: the unit suite (``pytest tests/unit``) with the GPU visible: ``Predictor`` puts its model
  on CUDA when there is one, so the predictor, serving-engine and scoring tests run on the GPU.
- train: a synthetic MIND-format set, prepare + summarize, then the real trainer
  (``train.train.run_train``: TorchTrainer, 1 worker, DeepSpeed ZeRO-2, bf16) of a t5-small-shaped
  EmbSum (random init) for ``--steps`` steps. Throughput comes from the loop's own MLflow metrics
  after the warmup windows: examples/s, tokens/s (non-pad tokens, as the loop counts them) and
  positions/s (what the GPU computes, padding included). FLOPs per example =
  6 x (encoder matmul parameters x encoder positions + decoder matmul parameters x decoder
  positions), the usual 6N-per-token rule (forward 2N, backward 4N) with attention scores and
  the small poly-attention heads left out; encoder positions = G x L session tokens + C x Lc
  candidate tokens, decoder positions = S summary tokens; the decoder's parameters include the
  vocabulary projection (V x D, tied to the embedding but still a matmul per token). MFU =
  FLOPs/s over the device's peak dense bf16 FLOP/s, taken from its name (``PEAK_BF16_TFLOPS``) or
  ``--peak-tflops``.
- embed: ``train.embed.run_embed`` for the trained version with one GPU actor.
- serve: ``serve.control.deploy`` with one GPU replica: known-user scores equal the offline ``score``
  on the stored embeddings, a cold user (history given as texts) is encoded by the replica's
  model, /v1/recommend answers the true top k, and the p50 of sequential /v1/score requests.

``--device cpu`` runs every stage on the CPU with a tiny model and a few steps (fp32, DeepSpeed on
its CPU accelerator): the dry run that keeps this script working where no GPU is lent. Writes
bench/results/gpu_check.json (``--out``); the figures are printed as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("device", "unit", "train", "embed", "serve")
# Peak dense bf16 tensor FLOP/s (TFLOP/s, no sparsity) by a substring of torch's device name; the
# first match wins, so longer names come before their prefixes. None: not known, pass --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", None), ("A10", 125.0),
)
# The t5-small shape is the model config's default; only these differ in the CPU dry run.
TINY_MODEL = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_sessions=2,
                  items_per_session=2, session_tokens=24, content_tokens=12, summary_tokens=8, user_codes=4,
                  content_codes=2)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def check_config(work: Path, device: str, steps: int, batch: int, port: int) -> Any:
    """The run config of the check: the t5-small shape with random weights on GPU (bf16, ZeRO-2,
    1 worker, GPU embed actor and Serve replica); a tiny model, fp32 and CPU actors with ``cpu``."""
    from embsum.config import config_from_dict

    gpu = device == "cuda"
    model: dict[str, Any] = {"random_init": True, "tokenizer": "bundled", "dropout": 0.0,
                             **({} if gpu else TINY_MODEL)}
    return config_from_dict({
        "workdir": str(work),
        "data": {"format": "synthetic", "synth_users": 400, "synth_items": 600, "synth_impressions": 2000},
        "model": model,
        "train": {"use_gpu": gpu, "num_workers": 1, "cpus_per_worker": 1.0, "zero_stage": 2,
                  "deepspeed_config": str(REPO / "train" / "deepspeed" / "zero2.json"),  # absolute for the workers
                  "precision": "bf16" if gpu else "fp32", "batch_size": batch, "max_steps": steps,
                  "warmup_steps": min(10, steps), "log_every": max(1, steps // 10), "checkpoint_every": steps,
                  "eval_batches": 2, "max_failures": 0, "summary_weight": 0.05},
        "infer": {"actors": 1, "cpus": 1.0, "gpus": 1.0 if gpu else 0.0, "batch_size": 256 if gpu else 32},
        "serve": {"port": port, "min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0, "num_gpus": 1.0 if gpu else 0.0},
    })


# ---- FLOPs and MFU ----------------------------------------------------------------------------------------
def matmul_params(model: Any) -> dict[str, int]:
    """Parameters that take part in a matmul per position: the T5 encoder and decoder without the
    embedding lookup, plus the decoder's vocabulary projection (V x D, tied or not)."""
    t5 = model.t5

    def body(m: Any) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)

    vocab, d = t5.get_output_embeddings().weight.shape
    return {"encoder": body(t5.encoder), "decoder": body(t5.decoder) + vocab * d}


def positions_per_example(cfg: Any) -> dict[str, int]:
    """What one training example feeds the model: G x L session tokens and C x Lc candidate tokens
    through the encoder, S summary tokens through the decoder."""
    m, candidates = cfg.model, 1 + cfg.data.negatives
    return {"encoder": m.num_sessions * m.session_tokens + candidates * m.content_tokens,
            "decoder": m.summary_tokens}


def flops_per_example(params: dict[str, int], positions: dict[str, int]) -> float:
    """Training FLOPs of one example: 6 x parameters x positions (forward 2, backward 4)."""
    return 6.0 * (params["encoder"] * positions["encoder"] + params["decoder"] * positions["decoder"])


def throughput(history: dict[str, list[tuple[int, float]]], window: int, warmup: int, batch: int) -> dict[str, float]:
    """examples/s and tokens/s over the loop's logged windows that start after ``warmup`` steps
    (each window's seconds recovered from its rate: window x batch / examples_per_s)."""
    ex = sorted((s, v) for s, v in history.get("examples_per_s", []) if s - window >= warmup and v > 0)
    if not ex:
        raise ValueError(f"no logged window after {warmup} warmup steps (log_every={window}): run more --steps")
    tok = dict(history.get("tokens_per_s", []))
    secs = [window * batch / v for _, v in ex]
    total = sum(secs)
    return {"examples_per_s": len(ex) * window * batch / total,
            "tokens_per_s": sum(tok.get(s, 0.0) * dt for (s, _), dt in zip(ex, secs, strict=True)) / total,
            "windows": len(ex), "timed_seconds": total}


# ---- stages ----------------------------------------------------------------------------------------------
def stage_device(device: str) -> dict[str, Any]:
    """The accelerator, and one EmbSum forward on it vs the CPU; bf16 forward + backward."""
    import torch

    from embsum.config import ModelConfig
    from embsum.model import EmbSum
    from embsum.tokenization import EmbSumTokenizer

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (torch.cuda.is_available() is False); use --device cpu "
                               f"for the dry run (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        props = torch.cuda.get_device_properties(0)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", peak_bf16_tflops=peak_tflops(props.name))
    else:
        out.update(name="cpu", peak_bf16_tflops=None)
    cfg = ModelConfig(random_init=True, tokenizer="bundled", dropout=0.0, **TINY_MODEL)
    tok = EmbSumTokenizer.from_config(cfg)
    model = EmbSum.from_config(cfg, tok.sos_id, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    sess = torch.randint(2, 1000, (4, cfg.num_sessions, cfg.session_tokens), generator=g)  # (B, G, L)
    sess[:, :, 0] = tok.sos_id
    cand = torch.randint(2, 1000, (4, 3, cfg.content_tokens), generator=g)  # (B, C, Lc)
    summ = torch.randint(2, 1000, (4, cfg.summary_tokens), generator=g)  # (B, S)
    with torch.no_grad():
        ref = model(sess, cand, summ).scores  # (B, C) on the CPU, fp32
        dev = model.to(device)(sess.to(device), cand.to(device), summ.to(device)).scores.float().cpu()
    out["fp32_scores_max_abs_diff_vs_cpu"] = float((dev - ref).abs().max())
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(sess.to(device), cand.to(device), summ.to(device)).scores.float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    out["bf16_backward_finite"] = bool(grads) and all(bool(torch.isfinite(x).all()) for x in grads)
    if out["fp32_scores_max_abs_diff_vs_cpu"] > 1e-3 or not out["bf16_backward_finite"]:
        raise RuntimeError(f"device check failed: {out}")
    return out


def stage_unit(device: str) -> dict[str, Any]:
    """The unit suite with the GPU visible (on the CPU it is `make test-unit`: not repeated here)."""
    if device != "cuda":
        return {"skipped": "CPU dry run: the unit suite is `make test-unit`"}
    t0 = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", flush=True)
    return {"returncode": done.returncode, "summary": tail, "seconds": round(time.perf_counter() - t0, 1)}


def stage_train(cfg: Any) -> dict[str, Any]:
    """prepare + summarize + the real trainer; -> throughput, FLOPs, MFU, the registered version."""
    from embsum.model import EmbSum
    from embsum.registry import Registry
    from embsum.tokenization import EmbSumTokenizer
    from train.prepare import run_prepare
    from train.summarize import run_summarize
    from train.train import run_train

    t0 = time.perf_counter()
    run_prepare(cfg)
    run_summarize(cfg)
    t_data = time.perf_counter() - t0
    out = run_train(cfg)
    t = cfg.train
    client = Registry(cfg).client
    history = {k: [(m.step, m.value) for m in client.get_metric_history(out["mlflow_run_id"], k)]
               for k in ("examples_per_s", "tokens_per_s")}
    # Windows after the LR warmup (compilation, allocator growth) count; a short run keeps its second half.
    rates = throughput(history, t.log_every, min(t.warmup_steps, t.max_steps // 2), t.batch_size * t.num_workers)
    tok = EmbSumTokenizer.from_config(cfg.model)
    params = matmul_params(EmbSum.from_config(cfg.model, tok.sos_id, seed=0))
    positions = positions_per_example(cfg)
    flops = flops_per_example(params, positions)
    achieved = flops * rates["examples_per_s"]
    import torch

    name = torch.cuda.get_device_name(0) if t.use_gpu else "cpu"
    peak = peak_tflops(name) if t.use_gpu else None
    peak = float(os.environ.get("EMBSUM_PEAK_TFLOPS", 0)) or peak
    return {"version": out["version"], "steps": t.max_steps, "batch": t.batch_size, "precision": "bf16" if t.use_gpu
            else "fp32", "zero_stage": t.zero_stage, "data_seconds": round(t_data, 1),
            "fit_seconds": round(out["seconds"], 1), **rates,
            "positions_per_s": rates["examples_per_s"] * (positions["encoder"] + positions["decoder"]),
            "matmul_params": params, "positions_per_example": positions, "flops_per_step": flops * t.batch_size,
            "achieved_tflops": achieved / 1e12, "peak_bf16_tflops": peak,
            "mfu": achieved / (peak * 1e12) if peak else None}


def stage_embed(cfg: Any, version: str) -> dict[str, Any]:
    from train.embed import run_embed

    rep = run_embed(cfg, version)
    return {k: v for k, v in rep.items() if k != "path"}


def stage_serve(cfg: Any, version: str, device: str, requests: int = 200) -> dict[str, Any]:
    """One replica (with a GPU on cuda) behind Serve's HTTP ingress: correctness first, then p50."""
    import httpx
    import numpy as np

    from embsum.predictor import Predictor
    from serve import control as serve_app
    from serve.store import EmbeddingStore

    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    store = EmbeddingStore.load(cfg.embeddings_dir, model_name=cfg.mlflow.registered_model, model_version=version)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    serve_app.deploy(cfg, version=version)  # pinned: the version this check trained, no alias
    try:
        http = httpx.Client(base_url=url, timeout=60)
        user, items = store.user_ids[0], store.item_ids[:20]
        body = {"user_id": user, "candidates": [{"item_id": i} for i in items]}
        got = http.post("/v1/score", json=body)
        got.raise_for_status()
        u, rows = store.user_index[user], [store.item_index[i] for i in items]
        want = Predictor.score(store.upe[u:u + 1], store.cpe[rows], store.cpe_key[rows])[0]
        diff = float(np.abs(np.asarray([s["score"] for s in got.json()["scores"]]) - want).max())
        cold = http.post("/v1/score", json={"history": [{"text": t} for t in store.item_texts[:5]],
                                            "candidates": [{"item_id": i} for i in items[:5]]})
        cold.raise_for_status()
        rec = http.post("/v1/recommend", json={"user_id": user, "k": 5, "exclude_history": False})
        rec.raise_for_status()
        best = [x["item_id"] for x in rec.json()["items"]]
        full = Predictor.score(store.upe[u:u + 1], store.cpe, store.cpe_key)[0]
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            http.post("/v1/score", json=body).raise_for_status()
            lat.append(time.perf_counter() - t0)
        out = {"known_user_max_abs_diff": diff, "cold_user_encoded": cold.json()["user_encoded"],
               "recommend_top5_is_true_top5": best == [store.item_ids[i] for i in np.argsort(-full, kind="stable")[:5]],
               "score_p50_ms": float(np.percentile(np.asarray(lat) * 1e3, 50)), "requests": requests,
               "replica_gpus": cfg.serve.num_gpus, "gpu_processes": _gpu_processes() if device == "cuda" else None}
    finally:
        serve_app.shutdown()
    if diff > 1e-3 or not out["cold_user_encoded"] or not out["recommend_top5_is_true_top5"]:
        raise RuntimeError(f"serve check failed: {out}")
    return out


def _gpu_processes() -> str:
    """nvidia-smi's compute processes (the replica and the embed actor show up here with their memory)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi not available: {e}"


# ---- main -------------------------------------------------------------------------------------------------
def _print(stage: str, result: dict[str, Any]) -> None:
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    print(f"[gpu-check] {stage}: {json.dumps(brief, default=str)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200 on cuda, 6 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 64 on cuda, 4 on cpu)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s when the name is not known")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/gpu_check.json; the CPU dry "
                    "run: bench/results/quick/gpu_check_cpu.json)")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    if a.peak_tflops:
        os.environ["EMBSUM_PEAK_TFLOPS"] = str(a.peak_tflops)
    gpu = a.device == "cuda"
    out = Path(a.out or REPO / "bench" / "results" / ("gpu_check.json" if gpu else "quick/gpu_check_cpu.json"))
    from embsum.runtime import setup_env
    from serve.ingress import _free_port

    setup_env()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("PYTHONPATH", str(REPO))  # Ray workers import train/ and serve/ from the checkout
    work = Path(a.workdir or tempfile.mkdtemp(prefix="embsum-gpu-check-")).resolve()
    cfg = check_config(work, a.device, a.steps or (200 if gpu else 6), a.batch or (64 if gpu else 4), _free_port())
    results: dict[str, Any] = {"device": a.device, "stages": stages, "workdir": str(work)}
    t_all = time.perf_counter()
    import ray

    try:
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "device":
                res = stage_device(a.device)
            elif stage == "unit":
                res = stage_unit(a.device)
            elif stage == "train":
                res = stage_train(cfg)
            else:
                version = (results.get("train") or {}).get("version")
                if version is None:
                    raise SystemExit(f"stage {stage!r} needs the train stage's version: add 'train' to --stages")
                res = stage_embed(cfg, version) if stage == "embed" else stage_serve(cfg, version, a.device)
            res["stage_seconds"] = round(time.perf_counter() - t0, 1)
            results[stage] = res
            _print(stage, res)
    finally:
        ray.shutdown()
        results["seconds"] = round(time.perf_counter() - t_all, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    tr = results.get("train") or {}
    if tr:
        mfu = f"{tr['mfu']:.1%}" if tr.get("mfu") is not None else "n/a (unknown peak: --peak-tflops)"
        print(f"[gpu-check] training: {tr['examples_per_s']:.1f} examples/s, {tr['tokens_per_s']:.0f} tokens/s "
              f"({tr['positions_per_s']:.0f} positions/s), {tr['flops_per_step'] / 1e12:.3f} TFLOP per step, "
              f"{tr['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}", flush=True)
    failed = (results.get("unit") or {}).get("returncode", 0)
    print(f"[gpu-check] {'FAILED (unit tests)' if failed else 'done'} in {results['seconds']:.0f}s -> {out}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
