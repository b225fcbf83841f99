"""A one-factor-at-a-time sweep of the settings that matter most, on Book-Crossing validation AUC.

    python -m bench.sweep                  # 1 seed per point (the default point has the quality study's 3)
    python -m bench.sweep --seeds 0,1      # 2 seeds per point
    python -m bench.sweep --apply          # also write the chosen defaults into ray_config.yaml and
                                           # configs/book-crossing.yaml
    python -m bench.sweep --quick          # 30-step runs of two points: a smoke test

Around the quality study's configuration (bench/quality.py STUDY: M = 8, N = 4, G x P = 4 x 5,
lambda = 0.05, d_model = 64), one factor at a time:

    M (user codes)        1, 4, 8, 16
    N (content codes)     1, 2, 4, 8
    G x P (history)       2 x 5, 4 x 5, 8 x 5   (L = 96 tokens per session throughout)
    lambda                0, 0.05, 0.2, 1.0
    d_model               64, 128                (d_kv, d_ff scaled with it; 4 heads)

Each point is a real run (prepare per history shape, summarize, Ray Train + DeepSpeed, evaluate),
scored by the evaluation job's AUC over whole validation impressions (test is never looked at).
Runs are shared with the quality study through its cache (the default point and lambda = 0 are
runs it already made). Decision rule, per factor: a value replaces the default only when its mean
validation AUC beats the default's mean by more than the noise threshold, max(2 x the default's
std over its seeds, 0.01), and its training time is at most 1.25x the default's (the embedded demo
must stay under 10 minutes on 2 cores; not applied to lambda, which changes no compute, so its
time differences are load noise); otherwise the default stays. For lambda, a larger value
whose AUC is within the threshold is preferred when its generated summaries are clearly closer
to the teacher's (unigram F1 +0.05 or more): the summary is a served by-product.

Writes bench/results/sweep.json and sweep.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.quality import bx_config, train_eval

FACTORS: dict[str, dict[str, Any]] = {
    "M": {"default": 8, "values": [1, 4, 8, 16], "overrides": lambda v: [f"model.user_codes={v}"],
          "yaml": lambda v: {("model", "user_codes"): v}},
    "N": {"default": 4, "values": [1, 2, 4, 8], "overrides": lambda v: [f"model.content_codes={v}"],
          "yaml": lambda v: {("model", "content_codes"): v}},
    "GxP": {"default": 4, "values": [2, 4, 8], "overrides": lambda v: [f"model.num_sessions={v}"],
            "yaml": lambda v: {("model", "num_sessions"): v}, "show": lambda v: f"{v} x 5"},
    "lambda": {"default": 0.05, "values": [0.0, 0.05, 0.2, 1.0], "overrides": lambda v: [f"train.summary_weight={v}"],
               "yaml": lambda v: {("train", "summary_weight"): v},
               # lambda only weights a loss both variants compute: training time differences are load noise.
               "same_cost": True},
    "d_model": {"default": 64, "values": [64, 128],
                "overrides": lambda v: [f"model.d_model={v}", f"model.d_kv={v // 4}", f"model.d_ff={2 * v}"],
                "yaml": lambda v: {("model", "d_model"): v, ("model", "d_kv"): v // 4, ("model", "d_ff"): 2 * v}},
}
QUICK_FACTORS = {"M": [1, 8], "lambda": [0.05, 1.0]}
# Run order: one point per factor first (the lambda question, then the extremes), so a sweep cut
# short by --budget-minutes has looked at every factor; the other side and in-between values last.
PRIORITY = [("lambda", 1.0), ("M", 1), ("N", 1), ("GxP", 2), ("d_model", 128), ("M", 16), ("N", 8), ("lambda", 0.2),
            ("GxP", 8), ("M", 4), ("N", 2)]
YAML_FILES = (harness.REPO / "ray_config.yaml", harness.REPO / "configs" / "book-crossing.yaml")


def _show(factor: str, v: Any) -> str:
    return FACTORS[factor].get("show", str)(v)


def point_config(factor: str, value: Any, seed: int, quick: bool) -> Any:
    return bx_config([*FACTORS[factor]["overrides"](value), f"train.seed={seed}"], quick=quick)


def run_point(factor: str, value: Any, seeds: list[int], quick: bool) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        cfg = point_config(factor, value, seed, quick)
        harness.ensure_prepared(cfg)  # a new history shape needs its own prepared shards
        runs.append(train_eval(cfg, f"sweep-{factor}-{value}-s{seed}"))
    auc = [r["valid"]["auc"] for r in runs]
    summ = [r["summaries"] for r in runs if r.get("summaries")]
    return {"factor": factor, "value": value, "label": f"{factor}={_show(factor, value)}", "seeds": seeds,
            "valid_auc_values": auc, "valid_auc_mean": statistics.fmean(auc),
            "valid_auc_std": statistics.stdev(auc) if len(auc) > 1 else None,
            "test_auc_mean": statistics.fmean(r["test"]["auc"] for r in runs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "summary_unigram_f1": statistics.fmean(s["unigram_f1"] for s in summ) if summ else None,
            "summary_distinct_share": statistics.fmean(s["distinct_share"] for s in summ) if summ else None,
            "summary_empty_slot_share": statistics.fmean(s["empty_slot_share"] for s in summ) if summ else None,
            "summary_examples": summ[0]["examples"] if summ else []}


def cached(factor: str, value: Any, seeds: list[int], quick: bool) -> bool:
    """Every run of this point is in the run cache (no training needed)."""
    from bench.quality import run_key

    cache = harness.bench_root() / "run-cache"
    return all((cache / f"{run_key(point_config(factor, value, s, quick))}.json").is_file() for s in seeds)


def paired(p: dict[str, Any], center: dict[str, Any]) -> tuple[float, float]:
    """(the point's valid AUC, the default's) over the point's seeds: a point run on seed 0 is
    compared with the default's seed-0 run, not with its mean over seeds (seed 0 happened to be the
    default's best seed by 0.05, which made every 1-seed point look worse or better than it was)."""
    at = dict(zip(center.get("seeds", []), center.get("valid_auc_values", []), strict=True))
    both = [(v, at[s]) for s, v in zip(p.get("seeds", []), p.get("valid_auc_values", []), strict=True) if s in at]
    if not both:
        return p["valid_auc_mean"], center["valid_auc_mean"]
    return statistics.fmean(v for v, _ in both), statistics.fmean(c for _, c in both)


def delta(p: dict[str, Any], center: dict[str, Any]) -> float:
    mine, ref = paired(p, center)
    return mine - ref


def decide(factor: str, points: list[dict[str, Any]], center: dict[str, Any]) -> dict[str, Any]:
    default = FACTORS[factor]["default"]
    std = center["valid_auc_std"] or 0.0
    threshold = max(2 * std, 0.01)
    base_t = center["train_seconds"] or 1.0
    others = [p for p in points if p["value"] != default] or points
    best = max(others, key=lambda p: delta(p, center))
    cheap = [p for p in points if FACTORS[factor].get("same_cost") or p["train_seconds"] <= 1.25 * base_t]
    gain = [p for p in cheap if delta(p, center) > threshold]
    if gain:
        pick = max(gain, key=lambda p: delta(p, center))
        mine, ref = paired(pick, center)
        return {"chosen": pick["value"], "changed": pick["value"] != default, "threshold": threshold,
                "reason": f"{pick['label']} valid AUC {mine:.4f} beats the default's {ref:.4f} on the same seeds "
                          f"by {mine - ref:+.4f} (> threshold {threshold:.4f}) at "
                          f"{pick['train_seconds'] / base_t:.2f}x its training time"}
    if factor == "lambda" and center.get("summary_unigram_f1") is not None:
        readable = [p for p in points if p["value"] > default and p["summary_unigram_f1"] is not None
                    and abs(delta(p, center)) <= threshold
                    and p["summary_unigram_f1"] - center["summary_unigram_f1"] >= 0.05]
        if readable:
            pick = max(readable, key=lambda p: p["summary_unigram_f1"])
            mine, ref = paired(pick, center)
            return {"chosen": pick["value"], "changed": True, "threshold": threshold,
                    "reason": f"{pick['label']}: valid AUC {mine:.4f} within the threshold {threshold:.4f} of the "
                              f"default's {ref:.4f} on the same seeds, and its summaries are closer to the "
                              f"teacher's (unigram F1 {pick['summary_unigram_f1']:.3f} vs "
                              f"{center['summary_unigram_f1']:.3f})"}
    why = (f"no value beats the default's valid AUC on the same seeds by more than the threshold {threshold:.4f} "
           f"(2 x the default's std over seeds) within 1.25x its training time (best: {best['label']} "
           f"{delta(best, center):+.4f} at {best['train_seconds'] / base_t:.2f}x time)")
    return {"chosen": default, "changed": False, "threshold": threshold, "reason": why}


# ---- YAML defaults, edited in place (comments and layout kept) ----------------------------------------------
def set_yaml_defaults(path: Path, changes: dict[tuple[str, str], Any]) -> list[str]:
    """Set ``section.key: value`` lines of a top-level section; add the key at the section's end
    when absent. -> the changes made, as text."""
    lines = path.read_text().splitlines(keepends=True)
    done = []
    for (section, key), value in changes.items():
        start = next((i for i, ln in enumerate(lines) if re.match(rf"^{section}:\s*(#.*)?$", ln)), None)
        if start is None:
            raise ValueError(f"{path}: no top-level section '{section}:'")
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\S", lines[i])), len(lines))
        text = _yaml_scalar(value)
        for i in range(start + 1, end):
            m = re.match(rf"^(\s+){key}:(\s*)([^#\n]*?)(\s*#.*)?$", lines[i].rstrip("\n"))
            if m:
                old = m.group(3).strip()
                if old != text:
                    lines[i] = f"{m.group(1)}{key}:{m.group(2) or ' '}{text}{m.group(4) or ''}\n"
                    done.append(f"{path.name}: {section}.{key} {old} -> {text}")
                break
        else:
            last = max(i for i in range(start + 1, end) if lines[i].strip()) if end > start + 1 else start
            indent = re.match(r"^(\s*)", lines[last]).group(1) if last > start else "  "
            lines.insert(last + 1, f"{indent}{key}: {text}\n")
            done.append(f"{path.name}: {section}.{key} (unset) -> {text}")
    path.write_text("".join(lines))
    return done


def _yaml_scalar(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(res: dict[str, Any]) -> str:
    c = res["center"]
    lines = ["### Sweep (Book-Crossing, validation AUC over whole valid impressions; one factor at a time)", "",
             f"Default point (the quality study's config): valid AUC {c['valid_auc_mean']:.4f}"
             + (f" ± {c['valid_auc_std']:.4f} over seeds {c['seeds']}" if c.get("valid_auc_std") else "")
             + f" (per seed: {', '.join(f'{v:.4f}' for v in c['valid_auc_values'])}); other points: seeds "
             f"{res['seeds']}, each compared with the default's run on the same seeds.", "",
             "| factor | value | valid AUC (mean) | vs default (same seeds) | test AUC | train time vs default | "
             "summary F1 vs teacher | distinct summaries | '()' share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in res["points"]:
        f1 = "" if p["summary_unigram_f1"] is None else f"{p['summary_unigram_f1']:.3f}"
        dist = "" if p["summary_distinct_share"] is None else f"{p['summary_distinct_share']:.2f}"
        empty = "" if p["summary_empty_slot_share"] is None else f"{p['summary_empty_slot_share']:.2f}"
        mark = " (default)" if p["value"] == FACTORS[p["factor"]]["default"] else ""
        lines.append(f"| {p['factor']} | {_show(p['factor'], p['value'])}{mark} | {p['valid_auc_mean']:.4f} | "
                     f"{delta(p, c):+.4f} | {p['test_auc_mean']:.4f} | "
                     f"{p['train_seconds'] / c['train_seconds']:.2f}x | {f1} | {dist} | {empty} |")
    if res.get("not_run"):
        lines += ["", f"Not run (time budget; decided without them): {', '.join(res['not_run'])}."]
    lines += ["", "Decisions:", ""]
    for f, d in res["decisions"].items():
        verdict = ("CHANGE to " if d["changed"] else "keep ") + _show(f, d["chosen"])
        lines.append(f"- {f}: {verdict} — {d['reason']}")
    lines += ["", "Generated summaries by lambda (first training users; teacher in brackets):", ""]
    for p in res["points"]:
        if p["factor"] == "lambda":
            for ex in p["summary_examples"][:2]:
                lines.append(f"- lambda {p['value']:g}: \"{ex['generated']}\" [teacher: \"{ex['teacher']}\"]")
    lines += ["", "Applied to the YAML defaults: " + ("; ".join(res["applied"]) if res["applied"] else
                                                    ("nothing changed" if res["apply"] else "not applied (--apply)")),
              "", f"Wall time {res['wall_seconds'] / 60:.0f} min. Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two points, 30 steps: a smoke test")
    ap.add_argument("--seeds", default="0", help="seeds per non-default point (default: 0)")
    ap.add_argument("--factors", default=",".join(FACTORS))
    ap.add_argument("--apply", action="store_true", help="write the chosen defaults into the YAML files")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="start no new point after this many minutes (the rest are listed as not run)")
    ap.add_argument("--cached-only", action="store_true",
                    help="decide from the points already run (the run cache); list the others as not run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    harness.setup()
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = {f: (QUICK_FACTORS.get(f) if args.quick else FACTORS[f]["values"])
               for f in args.factors.split(",") if f and (not args.quick or f in QUICK_FACTORS)}
    center_seeds = seeds if args.quick else sorted(set(seeds) | {0, 1, 2})  # the quality study's seeds
    t0 = time.perf_counter()
    import ray

    points: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        center = run_point("M", FACTORS["M"]["default"], center_seeds, args.quick)  # the default point
        center["label"] = "default"
        for f, values in factors.items():
            if FACTORS[f]["default"] in values:
                points.append({**center, "factor": f, "value": FACTORS[f]["default"],
                               "label": f"{f}={_show(f, FACTORS[f]['default'])}"})
        todo = [(f, v) for f, v in PRIORITY if v in factors.get(f, [])]
        todo += [(f, v) for f, vs in factors.items() for v in vs if (f, v) not in todo and v != FACTORS[f]["default"]]
        for f, v in todo:
            over = args.budget_minutes and (time.perf_counter() - t0) / 60 > args.budget_minutes
            if over or (args.cached_only and not cached(f, v, seeds, args.quick)):
                skipped.append(f"{f}={_show(f, v)}")
                continue
            p = run_point(f, v, seeds, args.quick)
            points.append(p)
            print(f"[sweep] {p['label']}: valid AUC {p['valid_auc_mean']:.4f} "
                  f"({delta(p, center):+.4f} vs the default on the same seeds)", flush=True)
    finally:
        ray.shutdown()
    order = {f: i for i, f in enumerate(FACTORS)}
    points.sort(key=lambda p: (order[p["factor"]], p["value"]))
    decisions = {f: decide(f, [p for p in points if p["factor"] == f], center) for f in factors
                 if any(p["factor"] == f for p in points)}
    applied: list[str] = []
    if args.apply and not args.quick:
        changes: dict[tuple[str, str], Any] = {}
        for f, d in decisions.items():
            if d["changed"]:
                changes.update(FACTORS[f]["yaml"](d["chosen"]))
        for path in YAML_FILES:
            applied += set_yaml_defaults(path, changes) if changes else []
    others = [p for p in points if p["value"] != FACTORS[p["factor"]]["default"]]
    best = max(others, key=lambda p: delta(p, center)) if others else center
    res = {"name": "sweep", "quick": args.quick, "seeds": seeds, "center": center, "points": points,
           "decisions": decisions, "best": best, "default": center, "not_run": skipped, "apply": args.apply,
           "applied": applied,
           "machine": harness.machine(), "wall_seconds": time.perf_counter() - t0,
           "command": "python -m bench.sweep" + (" --quick" if args.quick else "") + (" --apply" if args.apply else "")
           + (f" --seeds {args.seeds}" if args.seeds != "0" else "") + (" --cached-only" if args.cached_only else "")}
    path = harness.write_result("sweep", res, args.out, quick=args.quick)
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md, flush=True)
    mine, ref = paired(best, center)
    print(f"sweep bench: best point {best['label']} valid AUC {mine:.4f} vs the default's {ref:.4f} on the same "
          f"seeds; changed: {[f for f, d in decisions.items() if d['changed']] or 'nothing'} "
          f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
