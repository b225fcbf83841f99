"""Quality on real data: Book-Crossing test AUC / MRR / nDCG@5 / nDCG@10 of EmbSum and its ablations
against random and popularity, over seeds; plus a MIND smoke figure.

    python -m bench.quality            # 3 seeds x (full, lambda=0, M=N=1) + baselines + MIND smoke
    python -m bench.quality --quick    # 1 seed, 30 steps: a smoke test of the study, not a result

Everything goes through the real pipeline: ``run_prepare`` and ``run_summarize`` (offline
teacher) once per data config, then per variant and seed ``run_train`` (Ray Train + DeepSpeed
ZeRO-2, 2 CPU workers; the checkpoint with the best in-loop validation AUC is kept and registered)
and ``run_evaluate`` (Ray Data batch inference over whole valid/test impressions). Each finished
run is cached under the bench workdir by a hash of its config, so a rerun (or the sweep, which
shares the default point) never trains the same thing twice.

Baselines score exactly the same test impressions: random (seeded uniform scores) and popularity
(number of positive interactions of each item among train-split users; ties keep the impression's
shuffled candidate order, and AUC counts ties one half).

Writes bench/results/quality.json and bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from embsum.config import Config, load_config, replace
from embsum.metrics import METRIC_NAMES, summarize

BX_CONFIG = harness.REPO / "configs" / "book-crossing.yaml"
MIND_CONFIG = harness.REPO / "configs" / "mind.yaml"

# The study's model and training, pinned here (not read from the YAML defaults, which the sweep
# may change) so the table stays reproducible. A random-init T5 of 2+2 layers, d_model 64, about
# 2.2M parameters (the 32k-token embedding is most of it); 300 steps of 2 workers x 16 examples
# = 9,600 examples, about half an epoch of Book-Crossing's 19k training examples. About 6-8
# minutes per run (training ~5, evaluation ~1) on 2 shared cores.
STUDY = [
    "model.random_init=true", "model.tokenizer=bundled", "model.d_model=64", "model.d_kv=16", "model.d_ff=128",
    "model.num_layers=2", "model.num_decoder_layers=2", "model.num_heads=4", "model.num_sessions=4",
    "model.items_per_session=5", "model.session_tokens=96", "model.content_tokens=32", "model.summary_tokens=32",
    "model.user_codes=8", "model.content_codes=4", "model.dropout=0.1",
    "train.num_workers=2", "train.cpus_per_worker=1", "train.batch_size=16", "train.lr=0.001",
    "train.warmup_steps=30", "train.max_steps=300", "train.checkpoint_every=100", "train.eval_batches=10",
    "train.summary_weight=0.05", "train.zero_stage=2", "train.log_every=10", "train.keep_checkpoints=1",
    # Evaluation: one model replica per actor pool (fewer start-ups on 2 shared cores; metrics unchanged).
    "train.infer_actors=1", "train.infer_batch_size=64",
]
QUICK = ["train.max_steps=30", "train.checkpoint_every=30", "train.warmup_steps=5", "train.eval_batches=2"]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "lambda0": ["train.summary_weight=0"],
    "single": ["model.user_codes=1", "model.content_codes=1"],
}
VARIANT_LABELS = {"random": "random", "popularity": "popularity", "full": "EmbSum full (lambda=0.05, M=8, N=4)",
                  "lambda0": "EmbSum lambda=0 (no summary loss)", "single": "EmbSum single vectors (M=N=1)"}
SEEDS = (0, 1, 2)


# ---- configs --------------------------------------------------------------------------------------------
def bx_config(extra: list[str] = (), *, quick: bool = False) -> Config:
    bx = harness.SHARED_DATA / "book-crossing"
    base = load_config(BX_CONFIG, [f"data.interactions={bx / 'ratings.tsv'}", f"data.items={bx / 'books.tsv'}",
                                   *STUDY, *(QUICK if quick else []), *extra,
                                   *harness.tracking_overrides("bench-quality", "embsum-bench-quality")])
    return replace(base, "workdir", str(harness.data_workdir(base, "quality")))


def mind_config(*, quick: bool = False) -> Config:
    mind = harness.SHARED_DATA / "mind"
    # 119 impressions: a quarter of the users each for valid and test, so both have some impressions.
    base = load_config(MIND_CONFIG, [
        f"data.interactions={mind / 'derived' / 'behaviors_news_covered.tsv'}",
        f"data.items={mind / 'MINDsmall_train_sample' / 'news.tsv'}", "data.valid_fraction=0.25",
        "data.test_fraction=0.25", *STUDY, "train.max_steps=60", "train.checkpoint_every=20", "train.warmup_steps=6",
        "train.eval_batches=2", "train.batch_size=8", *(QUICK if quick else []),
        *harness.tracking_overrides("bench-quality", "embsum-bench-quality")])
    return replace(base, "workdir", str(harness.data_workdir(base, "quality-mind")))


def run_key(cfg: Config) -> str:
    """A finished run is reusable when data, model and training (minus names/paths) are equal."""
    t = {k: v for k, v in cfg.to_dict()["train"].items()
         if k not in ("run_name", "storage_path", "log_every") and not k.startswith("infer_")}
    blob = {"data": harness.data_key(cfg), "model": cfg.to_dict()["model"], "train": t}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- one trained + evaluated run ------------------------------------------------------------------------
def train_eval(cfg: Config, label: str, *, summaries: int = 64) -> dict[str, Any]:
    """run_train (registered) -> run_evaluate on valid and test -> metrics, per-impression test AUC and a
    look at the generated summaries. Cached by ``run_key``."""
    cache = harness.bench_root() / "run-cache" / f"{run_key(cfg)}.json"
    if cache.is_file():
        out = json.loads(cache.read_text())
        print(f"[bench] {label}: cached run {cache.name} (test auc {out['test']['auc']:.4f})", flush=True)
        return {**out, "cached": True}
    from train.evaluate import run_evaluate
    from train.train import run_train

    key = run_key(cfg)
    cfg = replace(cfg, "train.run_name", f"bench-{label}-{key[:8]}-{int(time.time())}")
    t0 = time.perf_counter()
    tr = run_train(cfg, register=True)
    t1 = time.perf_counter()
    ev = run_evaluate(cfg, tr["version"], splits=("valid", "test"))
    t2 = time.perf_counter()
    model_dir = cfg.workdir_path / "models" / f"v{tr['version']}"
    out = {
        "label": label, "key": key, "version": tr["version"], "best_step": tr.get("step"),
        "inloop_val_auc": tr.get("val_auc"), "valid": ev.get("valid"), "test": ev.get("test"),
        "test_impression_auc": per_impression(cfg, tr["version"], "test"),
        "train_seconds": round(t1 - t0, 1), "eval_seconds": round(t2 - t1, 1),
        "examples_per_s": (tr.get("metrics") or {}).get("examples_per_s"),
        "summaries": summary_probe(cfg, model_dir, summaries) if summaries else None,
        "overrides": {k: v for k, v in cfg.flat().items() if k.startswith(("model.", "train."))},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2, default=str))
    print(f"[bench] {label}: test auc {out['test']['auc']:.4f} mrr {out['test']['mrr']:.4f} "
          f"(train {out['train_seconds']:.0f}s, eval {out['eval_seconds']:.0f}s)", flush=True)
    return out


def per_impression(cfg: Config, version: str, split: str) -> dict[str, float]:
    """impression_id -> AUC, from the evaluation job's per-impression parquet (for paired comparisons)."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(cfg.workdir_path / "eval" / f"v{version}" / split), format="parquet").to_table(
        columns=["impression_id", "auc"])
    return {str(i): float(a) for i, a in zip(t.column("impression_id").to_pylist(), t.column("auc").to_pylist(),
                                            strict=True) if a == a}


_WORDS = re.compile(r"[\w'&-]+")


def _unigram_f1(pred: str, ref: str) -> float:
    p, r = Counter(_WORDS.findall(pred.lower())), Counter(_WORDS.findall(ref.lower()))
    common = sum((p & r).values())
    if not common:
        return 0.0
    prec, rec = common / sum(p.values()), common / sum(r.values())
    return 2 * prec * rec / (prec + rec)


def summary_probe(cfg: Config, model_dir: Path, n: int) -> dict[str, Any]:
    """Generated summaries of ``n`` training users vs their teacher summaries: unigram F1 (ROUGE-1
    F1 without stemming), share of distinct summaries, share of summaries containing an empty
    '()' slot (the degenerate form seen in the demo), and three examples."""
    import pyarrow.dataset as pads

    from embsum.arrow_tensors import table_tensor
    from embsum.data import layout
    from embsum.predictor import Predictor

    summ = pads.dataset(str(cfg.data_dir / layout.SUMMARIES), format="parquet").to_table(
        columns=["user_id", "summary"])
    teacher = dict(zip(summ.column("user_id").to_pylist(), summ.column("summary").to_pylist(), strict=True))
    users = pads.dataset(str(cfg.data_dir / layout.USERS), format="parquet").to_table(
        columns=["user_id", "split", "session_ids"])
    rows = [i for i, (u, s) in enumerate(zip(users.column("user_id").to_pylist(), users.column("split").to_pylist(),
                                              strict=True)) if s == "train" and u in teacher][:n]
    ids = [users.column("user_id")[i].as_py() for i in rows]
    sessions = table_tensor(users.take(rows), "session_ids")
    gen = Predictor.from_dir(model_dir, batch_size=32).encode_users(sessions).summaries
    f1 = [_unigram_f1(g, teacher[u]) for g, u in zip(gen, ids, strict=True)]
    return {"users": len(ids), "unigram_f1": statistics.fmean(f1) if f1 else None,
            "distinct_share": len(set(gen)) / max(1, len(gen)),
            "empty_slot_share": sum("()" in g for g in gen) / max(1, len(gen)),
            "mean_words": statistics.fmean(len(g.split()) for g in gen) if gen else None,
            "examples": [{"generated": g, "teacher": teacher[u]} for g, u in list(zip(gen, ids, strict=True))[:3]]}


# ---- baselines --------------------------------------------------------------------------------------------
def _impressions(cfg: Config, split: str) -> list[tuple[str, list[str], list[int]]]:
    import pyarrow.dataset as pads

    t = pads.dataset(str(cfg.data_dir / split), format="parquet").to_table(
        columns=["impression_id", "candidate_item_ids", "labels"])
    return list(zip(t.column("impression_id").to_pylist(), t.column("candidate_item_ids").to_pylist(),
                    t.column("labels").to_pylist(), strict=True))


def train_popularity(cfg: Config) -> Counter:
    """Item -> number of positive interactions among train-split users (their full histories)."""
    import pyarrow.dataset as pads

    from embsum.data import layout

    users = pads.dataset(str(cfg.data_dir / layout.USERS), format="parquet").to_table(columns=["split", "history"])
    pop: Counter = Counter()
    for split, hist in zip(users.column("split").to_pylist(), users.column("history").to_pylist(), strict=True):
        if split == "train":
            pop.update(hist)
    return pop


def baselines(cfg: Config, seeds: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pop = train_popularity(cfg)
    for split in ("valid", "test"):
        imps = _impressions(cfg, split)
        rand = []
        for seed in seeds:
            rng = np.random.default_rng(1000 + seed)
            rand.append(summarize((labels, rng.random(len(labels))) for _, _, labels in imps).as_dict())
        popm = summarize((labels, [float(pop.get(c, 0)) for c in cands]) for _, cands, labels in imps).as_dict()
        out[split] = {"random": rand, "popularity": [popm]}
        if split == "test":
            out["test_impression_auc"] = {
                "popularity": {i: m for i, m in ((i, _auc(labels, [float(pop.get(c, 0)) for c in cands]))
                                                 for i, cands, labels in imps) if m is not None}}
    return out


def _auc(labels: list[int], scores: list[float]) -> float | None:
    from embsum.metrics import impression_metrics

    m = impression_metrics(labels, scores)
    return None if m is None else m["auc"]


# ---- aggregation -----------------------------------------------------------------------------------------
def aggregate(runs: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    return {m: harness.mean_std([r[split][m] for r in runs]) for m in METRIC_NAMES} | {
        "impressions": runs[0][split]["impressions"] if runs else 0}


def paired(a: list[dict[str, float]], b: list[dict[str, float]], seed: int = 0) -> dict[str, Any]:
    """Paired test-AUC difference a - b over the impressions both scored, seed-averaged per
    impression, with a 95% bootstrap interval over impressions."""
    ma = _seed_mean(a)
    mb = _seed_mean(b)
    common = sorted(set(ma) & set(mb))
    if not common:
        return {"impressions": 0}
    d = np.array([ma[i] - mb[i] for i in common])
    rng = np.random.default_rng(seed)
    boots = [float(d[rng.integers(0, len(d), len(d))].mean()) for _ in range(2000)]
    return {"impressions": len(common), "mean_diff": float(d.mean()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}


def _seed_mean(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(r) for r in runs)) if runs else set()
    return {k: statistics.fmean(r[k] for r in runs) for k in keys}


def _fmt(ms: dict[str, Any]) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}" if ms["n"] > 1 else f"{ms['mean']:.4f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"### Quality on Book-Crossing (test split, {res['bx']['test_impressions']} leave-last-out impressions: "
             f"1 held-out positive vs {res['bx']['eval_negatives']} unseen books)", "",
             f"Mean ± std over seeds {list(res['seeds'])}; each EmbSum run keeps the checkpoint with the best "
             f"in-loop validation AUC (valid users, selected on valid), then is scored on test.", "",
             "| model | AUC | MRR | nDCG@5 | nDCG@10 | valid AUC |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in res["bx"]["table"].items():
        lines.append(f"| {VARIANT_LABELS.get(name, name)} | " + " | ".join(_fmt(row["test"][m]) for m in METRIC_NAMES)
                     + f" | {_fmt(row['valid']['auc'])} |")
    lines += ["", "Paired test-AUC differences (per impression, seed-averaged; 95% bootstrap CI over impressions):", "",
              "| comparison | mean diff | 95% CI | impressions won / lost |", "| --- | --- | --- | --- |"]
    for name, p in res["bx"]["paired"].items():
        if p.get("impressions"):
            lines.append(f"| {name} | {p['mean_diff']:+.4f} | [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] | "
                         f"{p['wins']} / {p['losses']} |")
    lines += ["", f"**Claim check** (the paper: the full model beats both ablations): {res['claim']}", ""]
    s = res["bx"].get("summaries")
    if s:
        lines += ["Generated summaries of 64 training users vs the offline teacher's (seed-averaged):", "",
                  "| model | unigram F1 vs teacher | distinct share | '()' share |", "| --- | --- | --- | --- |"]
        for name, v in s.items():
            lines.append(f"| {VARIANT_LABELS.get(name, name)} | {v['unigram_f1']:.3f} | {v['distinct_share']:.2f} | "
                         f"{v['empty_slot_share']:.2f} |")
        lines.append("")
    mind = res.get("mind")
    if mind:
        lines += [f"### MIND smoke figure (NOT a quality result): {mind['note']}", "",
                  "| model | AUC | MRR | nDCG@5 | nDCG@10 | test impressions |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in mind["table"].items():
            lines.append(f"| {VARIANT_LABELS.get(name, name)} | " + " | ".join(
                f"{row[m]:.4f}" for m in METRIC_NAMES) + f" | {row['impressions']} |")
        lines.append("")
    cfg = res["config"]
    lines += ["### Study configuration", "",
              f"- model: random-init T5, d_model {cfg['model.d_model']}, {cfg['model.num_layers']}+"
              f"{cfg['model.num_decoder_layers']} layers, {cfg['model.num_heads']} heads, d_ff {cfg['model.d_ff']}; "
              f"G x P = {cfg['model.num_sessions']} x {cfg['model.items_per_session']} history items, "
              f"L = {cfg['model.session_tokens']} session tokens, M = {cfg['model.user_codes']}, "
              f"N = {cfg['model.content_codes']}; {res['bx'].get('params', '?')} parameters",
              f"- training: Ray Train + DeepSpeed ZeRO-{cfg['train.zero_stage']}, {cfg['train.num_workers']} CPU "
              f"workers x batch {cfg['train.batch_size']}, AdamW lr {cfg['train.lr']}, {cfg['train.warmup_steps']} "
              f"warmup + linear decay, {cfg['train.max_steps']} steps, lambda {cfg['train.summary_weight']}, "
              f"checkpoint + in-loop validation every {cfg['train.checkpoint_every']} steps",
              f"- data: Book-Crossing ratings >= 8 are positives (0 = implicit, ignored), user-level 80/10/10 "
              f"split, {res['bx']['train_examples']} training examples (1 positive + 4 sampled negatives), "
              f"offline teacher summaries",
              f"- wall time: {res['wall_seconds'] / 60:.0f} min for the study on this machine "
              f"({res['machine'].get('cpus')} CPUs, shared); median run {res['bx']['median_run_minutes']:.1f} min",
              f"- command: `{res['command']}`", ""]
    return "\n".join(lines)


def claim_text(table: dict[str, Any], paired_: dict[str, Any]) -> str:
    full = table["full"]["test"]
    parts = []
    for abl in ("lambda0", "single"):
        if abl not in table:
            continue
        a = table[abl]["test"]
        beats = [m for m in METRIC_NAMES if full[m]["mean"] > a[m]["mean"]]
        p = paired_.get(f"full - {abl}", {})
        sig = ""
        if p.get("impressions"):
            lo, hi = p["ci95"]
            sig = (" (significant: the paired 95% CI excludes 0)" if lo > 0 or hi < 0
                   else " (within noise: the paired 95% CI includes 0)")
        parts.append(f"vs {VARIANT_LABELS[abl]}: test AUC {full['auc']['mean']:.4f} vs {a['auc']['mean']:.4f} "
                     f"({full['auc']['mean'] - a['auc']['mean']:+.4f}){sig}; full is higher on "
                     f"{len(beats)}/4 metrics ({', '.join(beats) or 'none'})")
    holds = all(table["full"]["test"]["auc"]["mean"] > table[a]["test"]["auc"]["mean"]
                for a in ("lambda0", "single") if a in table)
    return ("HOLDS on mean test AUC" if holds else "DOES NOT HOLD on mean test AUC") + " here: " + "; ".join(parts)


# ---- main ------------------------------------------------------------------------------------------------
def run_bx(seeds: tuple[int, ...], variants: list[str], quick: bool) -> dict[str, Any]:
    cfg0 = bx_config(quick=quick)
    data = harness.ensure_prepared(cfg0)
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # seed-major: a partial study already has every variant for the first seeds
        for v in variants:
            cfg = bx_config([*VARIANTS[v], f"train.seed={seed}"], quick=quick)
            runs.setdefault(v, []).append(train_eval(cfg, f"bx-{v}-s{seed}"))
    base = baselines(cfg0, seeds)
    table: dict[str, Any] = {}
    for name in ("random", "popularity"):
        table[name] = {s: {m: harness.mean_std([r[m] for r in base[s][name]]) for m in METRIC_NAMES}
                       for s in ("valid", "test")}
    for v, rs in runs.items():
        table[v] = {"valid": aggregate(rs, "valid"), "test": aggregate(rs, "test")}
    imp = {v: [r["test_impression_auc"] for r in rs] for v, rs in runs.items()}
    imp["popularity"] = [base["test_impression_auc"]["popularity"]]
    pairs = {f"full - {o}": paired(imp["full"], imp[o]) for o in ("lambda0", "single", "popularity")
             if "full" in imp and o in imp}
    summaries = {v: {k: statistics.fmean(r["summaries"][k] for r in rs)
                     for k in ("unigram_f1", "distinct_share", "empty_slot_share")}
                 for v, rs in runs.items() if all(r.get("summaries") for r in rs)}
    examples = {v: rs[0]["summaries"]["examples"] for v, rs in runs.items() if rs[0].get("summaries")}
    minutes = [(r["train_seconds"] + r["eval_seconds"]) / 60 for rs in runs.values() for r in rs if not r.get("cached")]
    prep = data["prepare"]
    return {"table": table, "paired": pairs, "runs": runs, "summaries": summaries, "summary_examples": examples,
            "test_impressions": base["test"]["random"][0]["impressions"],
            "eval_negatives": cfg0.data.eval_negatives, "train_examples": (prep.get("examples") or {}).get("train"),
            "data": data, "median_run_minutes": statistics.median(minutes) if minutes else 0.0,
            "params": _param_count(cfg0)}


def _param_count(cfg: Config) -> int:
    from embsum.model import EmbSum, count_parameters
    from embsum.tokenization import EmbSumTokenizer

    return count_parameters(EmbSum.from_config(cfg.model, EmbSumTokenizer.from_config(cfg.model).sos_id, seed=0))


def run_mind(quick: bool) -> dict[str, Any]:
    cfg = mind_config(quick=quick)
    data = harness.ensure_prepared(cfg)
    run = train_eval(cfg, "mind-full-s0", summaries=0)
    base = baselines(cfg, (0,))
    table = {"random": base["test"]["random"][0], "popularity": base["test"]["popularity"][0], "full": run["test"]}
    ex = (data["prepare"].get("examples") or {})
    imps = data["prepare"].get("eval_impressions") or {}
    note = (f"MIND covered impressions (119 impressions whose candidates all have text): user-level split 50/25/25 "
            f"-> {ex.get('train')} training examples, {imps.get('valid')} valid and {imps.get('test')} test "
            f"impressions; EmbSum trained {cfg.train.max_steps} steps (batch 2 x {cfg.train.batch_size}) on that. "
            f"Far too little data to train or to compare models: this only shows the MIND path runs end to end")
    return {"table": table, "run": run, "data": data, "note": note}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 30 steps: a smoke test")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-mind", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    harness.setup()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    variants = [v for v in args.variants.split(",") if v]
    t0 = time.perf_counter()
    import ray

    try:
        bx = run_bx(seeds, variants, args.quick)
        mind = None if args.no_mind else run_mind(args.quick)
    finally:
        ray.shutdown()
    cfg = bx_config(quick=args.quick)
    res = {"name": "quality", "quick": args.quick, "seeds": list(seeds), "variants": variants, "bx": bx,
           "mind": mind, "claim": claim_text(bx["table"], bx["paired"]) if "full" in bx["table"] else "n/a",
           "config": {k: v for k, v in cfg.flat().items() if k.startswith(("model.", "train.", "data."))},
           "machine": harness.machine(), "wall_seconds": time.perf_counter() - t0,
           "command": "python -m bench.quality" + (" --quick" if args.quick else "")}
    path = harness.write_result("quality", res, args.out, quick=args.quick)
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md, flush=True)
    print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
