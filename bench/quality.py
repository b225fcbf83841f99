"""Quality on real users: EmbSum (and the paper's ablations) against simple baselines on the same
impressions, over seeds, with confidence intervals, learning curves and summary quality.

    python -m bench.quality                      # configs/book-crossing.yaml: 3 seeds x (full, lambda0, single)
    python -m bench.quality --quick              # 1 seed, a few steps: a smoke test of the study, not a result
    python -m bench.quality --config my.yaml     # any `logs`/`mind` run config: the study is config-driven
    python -m bench.quality --cached-only        # the table from the runs finished so far (each row: its seeds)

Everything goes through the real pipeline: ``run_prepare`` + ``run_summarize`` once per data config, then
per variant and seed ``run_train`` (Ray Train + DeepSpeed, the config's recipe; the best in-loop
validation checkpoint is registered) and ``run_evaluate`` (Ray Data batch inference over the valid and
test impressions). Finished runs are cached under the bench workdir by a hash of their config.

Impressions: each valid/test user's ``data.eval_positives`` held-out positives, each against
``data.eval_negatives`` unseen items (49 for Book-Crossing); the figures at 19 negatives score the
positive with the first 19 negatives of the same shuffled candidate list (a uniform subsample).
Baselines (bench/baselines.py) score exactly those impressions. Confidence intervals: 95% bootstrap
over users (an impression's AUC is not independent of its user's other impressions); paired
differences EmbSum - baseline per impression, seed-averaged, bootstrapped over users the same way.
Summaries: the version's generated summary for 100 test histories vs the teacher's summary of the
same history (unigram F1) and the share of degenerate outputs (embsum.summary_text).

Writes bench/results/quality.json, quality.md and quality_curves.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.baselines import Baselines, Impression, read_impressions
from embsum.config import Config, load_config, replace
from embsum.metrics import impression_metrics

BX_CONFIG = harness.REPO / "configs" / "book-crossing.yaml"
QUICK = ["train.max_steps=30", "train.checkpoint_every=30", "train.warmup_steps=5", "train.eval_batches=2"]
VARIANTS: dict[str, list[str]] = {"full": [], "lambda0": ["train.summary_weight=0"],
                                  "single": ["model.user_codes=1", "model.content_codes=1"]}
LABELS = {"full": "EmbSum (paper-faithful)", "lambda0": "EmbSum lambda=0 (no summary loss)",
          "single": "EmbSum single vectors (M=N=1)"}
SEEDS = (0, 1, 2)
METRICS = ("auc", "mrr", "ndcg10")
CURVE_KEYS = ("val_auc", "nce_loss", "summary_loss", "epoch")
SUMMARY_CHECK = 4  # embsum.summary_text's rules (4: doubled words) and the study's decoding (3); older probes rerun
# How summaries are decoded: not part of a run's key. A cached run decoded otherwise than the study config says
# is decoded again (its registered weights, the config's decoding) and scored in process (rescore).
GENERATION = ("summary_num_beams", "summary_no_repeat_ngram")
UNRECORDED = {"summary_num_beams": 1, "summary_no_repeat_ngram": 3}  # runs cached before decoding was recorded
KEYED_GENERATION = {"summary_no_repeat_ngram": 3}


# ---- configs and runs ----------------------------------------------------------------------------------
def study_config(path: Path, extra: list[str] = (), *, quick: bool = False) -> Config:
    shared = harness.SHARED_DATA
    fixes = []
    base = load_config(path)
    for key in ("interactions", "items"):  # the shipped configs point at ../shared/data relative to the repo
        value = getattr(base.data, key)
        if "../shared/data/" in value:
            fixes.append(f"data.{key}={shared / value.split('../shared/data/', 1)[1]}")
    cfg = load_config(path, [*fixes, *(QUICK if quick else []), *extra,
                             *harness.tracking_overrides("bench-quality", "embsum-bench-quality")])
    return replace(cfg, "workdir", str(harness.data_workdir(cfg, "quality")))


def bx_config(extra: list[str] = (), *, quick: bool = False) -> Config:
    """The Book-Crossing study config (configs/book-crossing.yaml's recipe; other benchmarks share its data)."""
    return study_config(BX_CONFIG, list(extra), quick=quick)


def run_key(cfg: Config) -> str:
    """What a run's result depends on: data, model and training settings, with the DeepSpeed file by its
    content (its resolved path differs between checkouts of the same commit)."""
    t = {k: v for k, v in cfg.to_dict()["train"].items()
         if k not in ("run_name", "storage_path", "log_every") and not k.startswith("infer_")}
    t["deepspeed_config"] = hashlib.sha256(Path(cfg.train.deepspeed_config).read_bytes()).hexdigest()[:16]
    # Decoding left the key after runs were cached under keys holding its then-fixed value: keep that value
    # in the key (a constant), so those runs are still found.
    model = {**{k: v for k, v in cfg.to_dict()["model"].items() if k not in GENERATION}, **KEYED_GENERATION}
    blob = {"data": harness.data_key(cfg), "model": model, "train": t}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resumable_run_name(cfg: Config, label: str, key: str) -> str:
    """The Ray Train run name of this study run: the newest earlier attempt that left a checkpoint but no
    result (killed: OOM, a reboot, Ctrl-C), so rerunning the study resumes it from that checkpoint; else
    a fresh name."""
    prefix = f"bench-{label}-{key[:8]}-"
    root = Path(cfg.storage_path)
    tried = sorted((p for p in root.glob(f"{prefix}*") if any(p.glob("checkpoint_*"))),
                   key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if tried:
        print(f"[bench] {label}: resuming the interrupted run {tried[-1].name}", flush=True)
        return tried[-1].name
    return f"{prefix}{int(time.time())}"


def train_eval(cfg: Config, label: str, *, cached_only: bool = False) -> dict[str, Any] | None:
    """run_train -> run_evaluate -> per-impression scores, learning curves, summary probe. Cached.
    cached_only: None instead of training when the run has not finished before."""
    key = run_key(cfg)
    cache = harness.bench_root() / "run-cache" / f"quality-{key}.json"
    if cached_only and not cache.is_file():
        print(f"[bench] {label}: no finished run, left out (--cached-only)", flush=True)
        return None
    if cache.is_file():
        print(f"[bench] {label}: cached run {cache.name}", flush=True)
        out = json.loads(cache.read_text())
        model_dir = cfg.workdir_path / "models" / f"v{out['version']}"
        if out.get("generation", UNRECORDED) != generation(cfg) and model_dir.is_dir():
            print(f"[bench] {label}: decoding {generation(cfg)} (the run decoded {out.get('generation', UNRECORDED)}): "
                  "scored again in process", flush=True)
            out.update(rescore(cfg, model_dir), generation=generation(cfg), summaries=summary_probe(cfg, model_dir))
            cache.write_text(json.dumps(out, default=str))
        elif (out.get("summaries") or {}).get("check") != SUMMARY_CHECK and model_dir.is_dir():
            out["summaries"] = summary_probe(cfg, model_dir)  # the same version, today's summary check
            cache.write_text(json.dumps(out, default=str))
        return {**out, "cached": True}
    from embsum.registry import Registry
    from train.evaluate import run_evaluate
    from train.train import run_train

    cfg = replace(cfg, "train.run_name", resumable_run_name(cfg, label, key))
    t0 = time.perf_counter()
    tr = run_train(cfg, register=True)
    t1 = time.perf_counter()
    ev = run_evaluate(cfg, tr["version"], splits=("valid", "test"))
    registry = Registry(cfg)
    out = {"label": label, "key": key, "version": tr["version"], "best_step": tr.get("step"),
           "inloop_val_auc": tr.get("val_auc"), "train_seconds": round(t1 - t0, 1),
           "eval_seconds": round(time.perf_counter() - t1, 1),
           "valid": ev.get("valid"), "test": ev.get("test"),
           "scores": {s: scored(cfg, tr["version"], s) for s in ("valid", "test")},
           "curves": {k: registry.metric_history(tr["mlflow_run_id"], k) for k in CURVE_KEYS},
           "generation": generation(cfg),
           "summaries": summary_probe(cfg, cfg.workdir_path / "models" / f"v{tr['version']}")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, default=str))
    print(f"[bench] {label}: test auc {out['test']['auc']:.4f} ({out['train_seconds']:.0f}s training)", flush=True)
    return out


def generation(cfg: Config) -> dict[str, Any]:
    return {k: getattr(cfg.model, k) for k in GENERATION}


def study_predictor(cfg: Config, model_dir: Path) -> Any:
    """A registered version, decoding its summaries as the study config says."""
    import dataclasses

    from embsum.predictor import Predictor

    pred = Predictor.from_dir(model_dir, batch_size=64)
    pred.model.cfg = pred.cfg = dataclasses.replace(pred.cfg, **generation(cfg))
    return pred


def rescore(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """valid/test metrics and per-impression scores of a registered version decoded as cfg says, in process
    (the same Predictor, tokenizer, score and metrics as the evaluate job; greedy reproduces its numbers)."""

    import pyarrow.parquet as pq

    from embsum.metrics import mean_metrics
    from embsum.predictor import Predictor

    pred = study_predictor(cfg, model_dir)
    tokens = {str(r["item_id"]): r["token_ids"] for r in pq.read_table(cfg.data_dir / "items.parquet").to_pylist()}
    out: dict[str, Any] = {"scores": {}}
    for split in ("valid", "test"):
        imps = read_impressions(cfg.data_dir, split)
        hists = list(dict.fromkeys(tuple(im.history) for im in imps))
        row = {h: i for i, h in enumerate(hists)}
        cands = sorted({c for im in imps for c in im.candidates})
        col = {c: i for i, c in enumerate(cands)}
        items = pred.encode_item_tokens([tokens[c] for c in cands])
        users = pred.encode_users(pred.tok.sessions_batch([[tokens[i] for i in h] for h in hists]), with_text=False)
        all_pairs = Predictor.score(users.upe, items.cpe, items.key)  # (histories, candidates)
        out["scores"][split] = {im.impression_id: [float(all_pairs[row[tuple(im.history)], col[c]])
                                                   for c in im.candidates] for im in imps}
        out[split] = mean_metrics((im.labels, out["scores"][split][im.impression_id]) for im in imps).as_dict()
    return out


def scored(cfg: Config, version: str, split: str) -> dict[str, list[float]]:
    """impression_id -> the model's scores, in the impression's candidate order."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(cfg.workdir_path / "eval" / f"v{version}" / split), format="parquet").to_table(
        columns=["impression_id", "scores"])
    return {str(i): [float(x) for x in s] for i, s in zip(t.column("impression_id").to_pylist(),
                                                          t.column("scores").to_pylist(), strict=True)}


def summary_probe(cfg: Config, model_dir: Path, n: int = 100, split: str = "test") -> dict[str, Any]:
    """Generated summaries of n histories of a split vs the teacher's summary of the same history."""
    import pyarrow.parquet as pq

    from embsum.data.teachers import make_teacher
    from embsum.summary_text import degenerate, unigram_f1

    imps = read_impressions(cfg.data_dir, split)
    hists = list(dict.fromkeys(tuple(im.history) for im in imps))[:n]
    rows = pq.read_table(cfg.data_dir / "items.parquet").to_pylist()
    records = {str(r["item_id"]): {k: "" if v is None else str(v) for k, v in r.items() if k != "token_ids"}
               for r in rows}
    tokens = {str(r["item_id"]): r["token_ids"] for r in rows}
    teacher = make_teacher(cfg)
    ref = [r.summary for r in teacher.summarize([str(k) for k in range(len(hists))],
                                                [[records[i] for i in h] for h in hists])]
    pred = study_predictor(cfg, model_dir)
    gen = pred.encode_users(pred.tok.sessions_batch([[tokens[i] for i in h] for h in hists])).summaries
    bad = [degenerate(g) for g in gen]
    f1 = [unigram_f1(g, r) for g, r in zip(gen, ref, strict=True)]
    return {"check": SUMMARY_CHECK, "histories": len(hists), "unigram_f1": statistics.fmean(f1) if f1 else None,
            "degenerate": sum(b is not None for b in bad), "degenerate_reasons": [b for b in bad if b][:5],
            "distinct_share": len(set(gen)) / max(1, len(gen)),
            "examples": [{"generated": g, "teacher": r} for g, r in list(zip(gen, ref, strict=True))[:4]]}


# ---- metrics, CIs -------------------------------------------------------------------------------------------
def metrics_at(im: Impression, scores: list[float] | np.ndarray, negatives: int | None) -> dict[str, float] | None:
    """The impression's metrics with all its negatives, or with the first ``negatives`` of them."""
    labels, s = np.asarray(im.labels), np.asarray(scores, np.float64)
    if negatives is not None:
        keep = np.flatnonzero(labels == 1).tolist() + np.flatnonzero(labels == 0)[:negatives].tolist()
        keep.sort()
        labels, s = labels[keep], s[keep]
    return impression_metrics(labels, s)


def per_impression(imps: list[Impression], scores: list[Any], negatives: int | None) -> list[dict[str, float]]:
    return [metrics_at(im, s, negatives) or dict.fromkeys(METRICS, float("nan")) for im, s in zip(imps, scores,
                                                                                                 strict=True)]


def user_bootstrap(users: list[str], values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over impressions, resampling users (their impressions go together)."""
    by: dict[str, list[float]] = defaultdict(list)
    for u, v in zip(users, values, strict=True):
        if v == v:
            by[u].append(float(v))
    keys = list(by)
    sums = np.array([sum(by[k]) for k in keys])
    cnts = np.array([len(by[k]) for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), (n, len(keys)))
    means = sums[idx].sum(1) / cnts[idx].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table_row(imps: list[Impression], runs: list[list[Any]], negatives: int | None) -> dict[str, Any]:
    """Mean over seeds of each metric, seed std, and the user-bootstrap CI of the seed-averaged AUC."""
    per_seed = [per_impression(imps, s, negatives) for s in runs]
    row: dict[str, Any] = {"impressions": len(imps), "seeds": len(runs)}
    for m in METRICS:
        means = [float(np.nanmean([p[m] for p in ps])) for ps in per_seed]
        row[m] = {"mean": statistics.fmean(means), "std": statistics.stdev(means) if len(means) > 1 else 0.0,
                  "values": means}
    avg_auc = np.nanmean([[p["auc"] for p in ps] for ps in per_seed], axis=0)
    row["auc"]["ci95"] = user_bootstrap([im.user_id for im in imps], avg_auc)
    return row


def paired(imps: list[Impression], a: list[list[Any]], b: list[list[Any]], metric: str = "auc",
           negatives: int | None = None) -> dict[str, Any]:
    """a - b per impression (each seed-averaged), mean and user-bootstrap 95% CI."""
    def avg(runs: list[list[Any]]) -> np.ndarray:
        return np.nanmean([[p[metric] for p in per_impression(imps, s, negatives)] for s in runs], axis=0)

    d = avg(a) - avg(b)
    lo, hi = user_bootstrap([im.user_id for im in imps], d)
    return {"mean_diff": float(np.nanmean(d)), "ci95": [lo, hi], "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum())}


# ---- the study -------------------------------------------------------------------------------------------
def run_study(config: Path, seeds: tuple[int, ...], variants: list[str], quick: bool,
              cached_only: bool = False) -> dict[str, Any]:
    cfg0 = study_config(config, quick=quick)
    data = harness.ensure_prepared(cfg0)
    valid, test = read_impressions(cfg0.data_dir, "valid"), read_impressions(cfg0.data_dir, "test")
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # seed-major: a partial study has every variant for the first seeds
        for v in variants:
            cfg = study_config(config, [*VARIANTS[v], f"train.seed={seed}"], quick=quick)
            run = train_eval(cfg, f"{v}-s{seed}", cached_only=cached_only)
            if run is not None:
                runs.setdefault(v, []).append(run)
    facets = [f for f in cfg0.data.teacher.facet_fields if f in cfg0.data.item_text_fields]
    base = Baselines(cfg0, cfg0.data_dir / "items.parquet", valid + test, attribute=facets[0] if facets else None)
    weight = base.tune(valid)
    systems: dict[str, list[list[Any]]] = {k: [v] for k, v in base.scores(test).items()}
    for v, rs in runs.items():
        systems[LABELS[v]] = [[r["scores"]["test"][im.impression_id] for im in test] for r in rs]
    negs = cfg0.data.eval_negatives
    tables = {str(negs): {k: table_row(test, s, None) for k, s in systems.items()}}
    if negs > 19:
        tables["19"] = {k: table_row(test, s, 19) for k, s in systems.items()}
    full = LABELS["full"]
    pairs = {f"{full} - {k}": {m: paired(test, systems[full], s, m) for m in ("auc", "ndcg10")}
             for k, s in systems.items() if k != full and full in systems}
    flat = [r for rs in runs.values() for r in rs]
    gap = knn_gap(test, systems[full], systems["item-kNN"][0]) if full in systems and "item-kNN" in systems else None
    return {"knn_gap": gap, "tables": tables, "paired": pairs, "attribute_weight": weight, "attribute": base.attribute,
            "test_impressions": len(test), "test_users": len({im.user_id for im in test}),
            "eval_negatives": negs, "eval_positives": cfg0.data.eval_positives,
            "runs": {v: [{k: r[k] for k in r if k != "scores"} for r in rs] for v, rs in runs.items()},
            "train_minutes": statistics.median([r["train_seconds"] / 60 for r in flat]) if flat else None,
            "data": data, "claim": claim(tables[str(negs)], pairs)}


HISTORY_BUCKETS = ((1, 3), (3, 6), (6, 11), (11, 10**9))


def _top1(imps: list[Impression], scores: list[Any]) -> np.ndarray:
    """1.0 where the held-out positive is ranked first (ties count against it), per impression."""
    out = []
    for im, s in zip(imps, scores, strict=True):
        y, x = np.asarray(im.labels), np.asarray(s, np.float64)
        out.append(float(x[y == 1].max() > x[y == 0].max()))
    return np.array(out)


def knn_gap(imps: list[Impression], embsum: list[list[Any]], knn: list[Any]) -> dict[str, Any]:
    """Where EmbSum and item-kNN differ: AUC, nDCG@10 and the share ranked first, by history length, and
    a rank-sum fusion of each EmbSum run with kNN and the mean score of the EmbSum runs (diagnostics of
    how complementary the errors are: not systems the platform ships). EmbSum figures are per-run
    metrics averaged over runs, as in the main table."""
    from scipy.stats import rankdata

    def per(scores: list[Any], m: str) -> np.ndarray:
        return np.array([p[m] for p in per_impression(imps, scores, None)])

    def fuse(e: list[Any]) -> list[Any]:
        return [rankdata(np.asarray(a, np.float64)) + rankdata(np.asarray(b, np.float64)) for a, b in zip(
            e, knn, strict=True)]

    ensemble = [np.mean([np.asarray(r[i], np.float64) for r in embsum], 0) for i in range(len(imps))]
    systems = {"EmbSum": embsum, "item-kNN": [knn], "rank fusion": [fuse(e) for e in embsum],
               "seed ensemble": [ensemble]}
    vals = {k: {"auc": np.mean([per(r, "auc") for r in v], 0), "ndcg10": np.mean([per(r, "ndcg10") for r in v], 0),
                "top1": np.mean([_top1(imps, r) for r in v], 0)} for k, v in systems.items()}
    hist = np.array([len(im.history) for im in imps])
    rows = []
    for lo, hi in HISTORY_BUCKETS:
        m = (hist >= lo) & (hist < hi)
        if m.any():
            rows.append({"history": f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+", "impressions": int(m.sum()),
                         **{f"{k} {n}": float(np.nanmean(v[n][m])) for k, v in vals.items() for n in v}})
    total = {f"{k} {n}": float(np.nanmean(v[n])) for k, v in vals.items() for n in v}
    return {"buckets": rows, "all": {"history": "all", "impressions": len(imps), **total}}


def claim(table: dict[str, Any], pairs: dict[str, Any]) -> str:
    full = LABELS["full"]
    if full not in table:
        return "n/a"
    parts = []
    for name in (LABELS["lambda0"], LABELS["single"]):
        p = pairs.get(f"{full} - {name}")
        if p:
            lo, hi = p["auc"]["ci95"]
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "within noise"
            parts.append(f"vs {name}: {p['auc']['mean_diff']:+.4f} AUC [{lo:+.4f}, {hi:+.4f}] ({verdict})")
    return "; ".join(parts) or "n/a"


def plot_curves(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for rs in res["runs"].values():
        for r in rs:
            c = r.get("curves") or {}
            for ax, key in zip(axes, ("val_auc", "nce_loss", "summary_loss"), strict=True):
                pts = c.get(key) or []
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{r['label']}", alpha=0.8)
    for ax, key in zip(axes, ("in-loop valid AUC", "NCE loss", "summary loss"), strict=True):
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ci(row: dict[str, Any]) -> str:
    lo, hi = row["auc"]["ci95"]
    return f"[{lo:.3f}, {hi:.3f}]"


def _m(row: dict[str, Any], m: str) -> str:
    x = row[m]
    return f"{x['mean']:.4f} ± {x['std']:.4f}" if x.get("std") and row["seeds"] > 1 else f"{x['mean']:.4f}"


def _gap_lines(gap: dict[str, Any] | None) -> list[str]:
    if not gap:
        return []
    lines = ["Where EmbSum and item-kNN differ (EmbSum: mean over seeds, as above; top-1 = share of impressions whose "
             "positive is ranked first; rank fusion = EmbSum rank + kNN rank; ensemble = the "
             "mean score of the seeds' models; the last two are diagnostics of how complementary the errors are, "
             "not shipped systems):", "",
             "| history items | impressions | AUC EmbSum / kNN / fusion / ensemble | nDCG@10 (same order) | "
             "top-1 (same order) |", "| --- | --- | --- | --- | --- |"]
    for r in [*gap["buckets"], gap["all"]]:
        cell = {n: " / ".join(f"{r[f'{k} {n}']:.3f}" for k in ("EmbSum", "item-kNN", "rank fusion",
                                                                               "seed ensemble"))
                for n in ("auc", "ndcg10", "top1")}
        lines.append(f"| {r['history']} | {r['impressions']} | {cell['auc']} | {cell['ndcg10']} | {cell['top1']} |")
    return [*lines, ""]


def markdown(res: dict[str, Any]) -> str:
    s = res["study"]
    lines = [f"### Quality on {res['dataset']} ({s['test_impressions']} test impressions from {s['test_users']} "
             f"users: {s['eval_positives']} held-out positives per user, each vs {s['eval_negatives']} unseen items)",
             "", f"EmbSum rows: mean ± std over seeds {res['seeds']} (best in-loop validation checkpoint of each run). "
             "CI: 95% bootstrap over users of the seed-averaged mean AUC.", ""]
    labels = set(LABELS.values())
    for negs, table in s["tables"].items():
        lines += [f"**{negs} negatives per impression**", "",
                  "| system | AUC | AUC 95% CI | MRR | nDCG@10 |", "| --- | --- | --- | --- | --- |"]
        for name, row in sorted(table.items(), key=lambda kv: -kv[1]["auc"]["mean"]):
            name += f" ({row['seeds']} of {len(res['seeds'])} seeds)" if name in labels and row["seeds"] < len(
                res["seeds"]) else ""
            lines.append(f"| {name} | {_m(row, 'auc')} | {_ci(row)} | {_m(row, 'mrr')} | {_m(row, 'ndcg10')} |")
        lines.append("")
    lines += [f"Paired differences, {s['eval_negatives']} negatives (per impression, seed-averaged; 95% bootstrap "
              "over users):", "", "| comparison | AUC diff | 95% CI | nDCG@10 diff | 95% CI |",
              "| --- | --- | --- | --- | --- |"]
    for name, p in s["paired"].items():
        a, n = p["auc"], p["ndcg10"]
        lines.append(f"| {name} | {a['mean_diff']:+.4f} | [{a['ci95'][0]:+.4f}, {a['ci95'][1]:+.4f}] | "
                     f"{n['mean_diff']:+.4f} | [{n['ci95'][0]:+.4f}, {n['ci95'][1]:+.4f}] |")
    lines += ["", f"**The paper's ablations**: {s['claim']}", ""]
    lines += _gap_lines(s.get("knn_gap"))
    decoding = sorted({json.dumps(r.get("generation", UNRECORDED), sort_keys=True) for rs in s["runs"].values()
                       for r in rs})
    lines += ["Generated summaries of 100 test histories vs the teacher's summary of the same history "
              f"(decoding: {'; '.join(decoding)}; distinct share = distinct summaries / histories):", "",
              "| model | unigram F1 | degenerate (of 100) | distinct share | example |",
              "| --- | --- | --- | --- | --- |"]
    for v, rs in s["runs"].items():
        sm = [r["summaries"] for r in rs if r.get("summaries")]
        if sm:
            ex = sm[0]["examples"][0]["generated"].replace("|", "/") if sm[0]["examples"] else ""
            lines.append(f"| {LABELS[v]} ({len(sm)} runs) | {statistics.fmean(x['unigram_f1'] for x in sm):.3f} | "
                         f"{statistics.fmean(x['degenerate'] for x in sm):.1f} | "
                         f"{statistics.fmean(x['distinct_share'] for x in sm):.2f} | {ex} |")
    lines += ["", f"Attribute baseline: `{s['attribute']}` match weight {s['attribute_weight']} (chosen on valid). "
              + (f"Training: median {s['train_minutes']:.1f} min per run on this machine " if s["train_minutes"]
               else "No EmbSum run has finished yet on this machine ") +
              f"({res['machine'].get('cpus')} CPUs, {res['machine'].get('cpu_model', '?')}); "
              f"learning curves: quality_curves.png.", "", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(BX_CONFIG), help="run config of the study (default: Book-Crossing)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 30 steps: a smoke test")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cached-only", action="store_true",
                    help="render from finished (cached) runs only: an interrupted study's table, each EmbSum row "
                         "with its number of seeds")
    args = ap.parse_args(argv)
    harness.setup()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    variants = [v for v in args.variants.split(",") if v]
    t0 = time.perf_counter()
    import ray

    try:
        study = run_study(Path(args.config), seeds, variants, args.quick, args.cached_only)
    finally:
        ray.shutdown()
    cmd = "python -m bench.quality" + (" --quick" if args.quick else "") + \
        ("" if Path(args.config) == BX_CONFIG else f" --config {args.config}") + \
        ("" if variants == list(VARIANTS) else f" --variants {','.join(variants)}") + \
        ("" if args.seeds is None else f" --seeds {args.seeds}") + (" --cached-only" if args.cached_only else "")
    res = {"name": "quality", "quick": args.quick, "seeds": list(seeds), "variants": variants,
           "dataset": Path(args.config).stem, "study": study, "machine": harness.machine(),
           "wall_seconds": time.perf_counter() - t0, "command": cmd}
    path = harness.write_result("quality", res, args.out, quick=args.quick)
    plot_curves(study, path.with_name("quality_curves.png"))
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md, flush=True)
    print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
