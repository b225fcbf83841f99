"""The recipe lab: how training choices move EmbSum's quality, in minutes instead of hours.

    python -m bench.recipe run NAME [key=value ...]   # one experiment (keys: the Recipe fields below)
    python -m bench.recipe table                      # bench/results/recipe.md from recipe/*.json

The same model (embsum.model.EmbSum), tokenizer, ``score``, losses and metrics as the pipeline, in
one process on one thread, so a recipe choice is compared on the same impressions with the same
seed in a fraction of a Ray Train run. Training examples are drawn from the run config's log
(train-split users, the pipeline's ``split_of``) afresh every epoch; evaluation scores the
pipeline's own prepared valid/test impressions (bench/quality.py's data), generating each user's
summary as serving does. What the lab finds is then confirmed by the real pipeline in
bench/quality.py.

Each run appends its learning curve (valid AUC on 500 impressions, NCE and summary loss by step),
final valid/test metrics, a summary probe (unigram F1 vs the teacher on 100 test histories,
degenerate outputs) and its wall time to bench/results/recipe/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from bench import harness
from bench.baselines import Impression, read_impressions

RESULTS = harness.RESULTS / "recipe"  # one JSON per run: parallel runs never write the same file


@dataclass(frozen=True)
class Recipe:
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    user_codes: int = 8
    content_codes: int = 4
    dropout: float = 0.1
    batch: int = 8  # examples (histories) per step
    targets: int = 4  # T: positives per example sharing its history
    negatives: int = 4  # K per target
    in_batch: bool = True
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 1500
    temperature: float = 0.0  # 0 = sqrt(d_model)
    summary_weight: float = 0.2  # the recipe (configs/book-crossing.yaml); the paper uses 0.05
    summaries: str = "history"  # history: the teacher summarizes the example's history | user: all positives | none
    facets: str = ""  # teacher facet fields, comma-separated ('' = the run config's)
    implicit_targets: bool = False  # ignored labels (e.g. rating 0) as extra training targets
    implicit_history: bool = False  # ignored labels may fill histories
    seed: int = 0
    eval_every: int = 500


class Lab:
    def __init__(self, cfg: Any, r: Recipe) -> None:
        import pyarrow.parquet as pq
        import torch

        from embsum.config import ModelConfig, TeacherConfig
        from embsum.data.teachers import OfflineTeacher
        from embsum.data.timeline import split_of
        from embsum.tokenization import EmbSumTokenizer

        torch.set_num_threads(1)
        self.cfg, self.r = cfg, r
        m = cfg.model
        self.mcfg = ModelConfig(**{**asdict(m), "d_model": r.d_model, "d_kv": r.d_model // r.heads,
                                    "d_ff": 2 * r.d_model, "num_layers": r.layers, "num_decoder_layers": r.layers,
                                    "num_heads": r.heads, "user_codes": r.user_codes, "content_codes": r.content_codes,
                                    "dropout": r.dropout})
        self.tok = EmbSumTokenizer.from_config(self.mcfg)
        rows = pq.read_table(cfg.data_dir / "items.parquet").to_pylist()
        self.items = [str(x["item_id"]) for x in rows]
        self.pos_of = {i: k for k, i in enumerate(self.items)}
        self.tokens = [list(x["token_ids"]) for x in rows]
        self.content = self.tok.content_batch(self.tokens)  # (I, Lc)
        self.records = {str(x["item_id"]): {k: "" if v is None else str(v) for k, v in x.items() if k != "token_ids"}
                        for x in rows}
        facets = r.facets.split(",") if r.facets else list(cfg.data.teacher.facet_fields)
        self.teacher = OfflineTeacher(TeacherConfig(**{**asdict(cfg.data.teacher), "facet_fields": facets}))
        self.pos, self.imp, self.touched = _interactions(cfg, self.pos_of)
        d = cfg.data
        self.train_users = sorted(u for u in self.pos if split_of(u, d.seed, d.valid_fraction, d.test_fraction)
                                  == "train" and len(self.pos[u]) >= 2)
        self._summ: dict[tuple[str, ...], np.ndarray] = {}

    def summary_ids(self, hist: list[str]) -> np.ndarray:
        key = tuple(hist)
        if key not in self._summ:
            self._summ[key] = self.tok.summary(self.teacher.summary_text([self.records[i] for i in hist]))
        return self._summ[key]

    def examples(self, epoch: int) -> list[tuple[str, list[str], list[str]]]:
        """(user, targets, history): T targets share a random subset of the user's other positives."""
        from embsum.data.timeline import stable_hash64

        r, h = self.r, self.mcfg.num_sessions * self.mcfg.items_per_session
        out = []
        for u in self.train_users:
            pos = self.pos[u]
            extra = [i for i in self.imp.get(u, []) if i not in pos]
            rng = random.Random(stable_hash64("recipe", r.seed, epoch, u))
            targets = pos + (extra if r.implicit_targets else [])
            rng.shuffle(targets)
            pool = pos + (extra if r.implicit_history else [])
            for g in range(0, len(targets), r.targets):
                group = targets[g:g + r.targets]
                others = [p for p in pool if p not in group]
                if others:
                    out.append((u, group, rng.sample(others, rng.randint(1, len(others)))[:h]))
        random.Random(r.seed * 7 + epoch).shuffle(out)
        return out

    def batch(self, exs: list[tuple[str, list[str], list[str]]], rng: random.Random) -> dict[str, Any]:
        import torch

        r = self.r
        c = 1 + r.negatives
        cands = np.zeros((len(exs), r.targets * c), np.int64)  # (B, T*C) catalog positions
        labels = np.full((len(exs), r.targets * c), -1, np.int64)  # (B, T*C)
        for b, (u, group, _) in enumerate(exs):
            for t in range(r.targets):
                target = group[t] if t < len(group) else group[0]
                negs = []
                while len(negs) < r.negatives:
                    x = rng.randrange(len(self.items))
                    if x not in self.touched[u]:
                        negs.append(x)
                cands[b, t * c:(t + 1) * c] = [self.pos_of[target], *negs]
                if t < len(group):
                    labels[b, t * c:(t + 1) * c] = [1] + [0] * r.negatives
        if r.summaries == "history":
            summ = [self.summary_ids(h) for _, _, h in exs]
        elif r.summaries == "user":
            summ = [self.summary_ids(self.pos[u]) for u, _, _ in exs]
        else:
            summ = [self.tok.summary("") for _ in exs]
        return {"session_ids": torch.as_tensor(np.stack([self.sessions(h) for _, _, h in exs]), dtype=torch.long),
                "candidate_ids": torch.as_tensor(self.content[cands], dtype=torch.long),  # (B, T*C, Lc)
                "labels": torch.as_tensor(labels), "summary_ids": torch.as_tensor(np.stack(summ), dtype=torch.long)}

    def sessions(self, hist: list[str]) -> np.ndarray:
        return self.tok.sessions([self.tokens[self.pos_of[i]] for i in hist])

    def train(self, valid: list[Impression]) -> list[dict[str, float]]:
        """The pipeline's train_step, minus Ray and DeepSpeed: the same forward, losses and schedule."""
        import torch

        from embsum.losses import batch_negative_scores, embsum_loss, grouped_rows
        from embsum.model import EmbSum

        r = self.r
        torch.manual_seed(r.seed)
        self.model = model = EmbSum.from_config(self.mcfg, self.tok.sos_id, seed=r.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "codes" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "codes" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                lr=r.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / r.warmup if s < r.warmup
                                                  else max(0.0, (r.steps - s) / max(1, r.steps - r.warmup)))
        temp = r.temperature or math.sqrt(r.d_model)
        rng = random.Random(r.seed)
        curve, win, step, epoch, t0 = [], defaultdict(float), 0, 0, time.perf_counter()
        while step < r.steps:
            exs = self.examples(epoch)
            epoch += 1
            for i in range(0, len(exs) - r.batch + 1, r.batch):
                b = self.batch(exs[i:i + r.batch], rng)
                model.train()
                out = model(b["session_ids"], b["candidate_ids"], b["summary_ids"])
                extra = batch_negative_scores(out.upe, out.cpe, out.cpe_key, b["candidate_ids"], b["labels"]) \
                    if r.in_batch else None
                rows, extra = grouped_rows(out.scores, b["labels"], 1 + r.negatives, extra)
                parts = embsum_loss(rows, out.summary_nll, r.summary_weight, temp, extra)
                opt.zero_grad()
                parts.total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                win["nce"] += float(parts.nce.detach())
                win["summary"] += float(parts.summary.detach())
                win["n"] += 1
                if step % r.eval_every == 0 or step == r.steps:
                    point = {"step": step, "epoch": round(epoch - 1 + (i + r.batch) / len(exs), 2),
                             "nce_loss": win["nce"] / win["n"], "summary_loss": win["summary"] / win["n"],
                             "seconds": round(time.perf_counter() - t0), "valid_auc": self.evaluate(valid)["auc"]}
                    curve.append(point)
                    win = defaultdict(float)
                    print(json.dumps(point), flush=True)
                if step >= r.steps:
                    break
        return curve

    def evaluate(self, imps: list[Impression], negatives: int | None = None) -> dict[str, float]:
        """Mean metrics of the impressions, users' summaries generated as at serving."""
        import torch

        from bench.quality import metrics_at
        from embsum.predictor import Predictor

        pred = Predictor(self.model, self.tok, batch_size=64)
        items = pred.encode_items(self.content)
        hists = list(dict.fromkeys(tuple(im.history) for im in imps))
        upe = pred.encode_users(np.stack([self.sessions(list(h)) for h in hists]), with_text=False).upe
        row = {h: k for k, h in enumerate(hists)}
        per = []
        with torch.no_grad():
            for im in imps:
                ix = [self.pos_of[c] for c in im.candidates]
                s = Predictor.score(upe[row[tuple(im.history)]][None], items.cpe[ix], items.key[ix])[0]
                per.append(metrics_at(im, s, negatives))
        return {k: float(np.mean([p[k] for p in per if p])) for k in ("auc", "mrr", "ndcg10")}

    def summary_probe(self, imps: list[Impression], n: int = 100) -> dict[str, Any]:
        from embsum.predictor import Predictor
        from embsum.summary_text import degenerate, unigram_f1

        hists = list(dict.fromkeys(tuple(im.history) for im in imps))[:n]
        gen = Predictor(self.model, self.tok).encode_users(np.stack([self.sessions(list(h)) for h in hists])).summaries
        ref = [self.teacher.summary_text([self.records[i] for i in h]) for h in hists]
        bad = [degenerate(g) for g in gen]
        return {"unigram_f1": float(np.mean([unigram_f1(g, t) for g, t in zip(gen, ref, strict=True)])),
                "degenerate": sum(b is not None for b in bad), "examples": list(zip(gen, ref, strict=True))[:3]}


def _interactions(cfg: Any, known: dict[str, int]) -> tuple[dict, dict, dict]:
    """user -> positives, ignored-label items and every catalogued item touched, from the log."""
    import pandas as pd

    d = cfg.data
    df = pd.read_csv(d.interactions, sep="\t" if d.interactions.endswith(".tsv") else ",", dtype=str,
                     keep_default_na=False, usecols=[d.user_col, d.item_col, d.label_col])
    pos: dict[str, list[str]] = defaultdict(list)
    imp: dict[str, list[str]] = defaultdict(list)
    touched: dict[str, set[int]] = defaultdict(set)
    ignore = {float(x) for x in d.ignore_labels}
    for u, i, lab in zip(df[d.user_col], df[d.item_col], df[d.label_col].astype(float), strict=True):
        if i not in known:
            continue
        touched[u].add(known[i])
        if lab in ignore:
            imp[u].append(i)
        elif lab >= d.positive_threshold:
            pos[u].append(i)
    return ({u: list(dict.fromkeys(v)) for u, v in pos.items()}, {u: list(dict.fromkeys(v)) for u, v in imp.items()},
            dict(touched))


def run(name: str, overrides: list[str]) -> dict[str, Any]:
    from bench.quality import bx_config

    harness.setup()
    r = Recipe()
    types = {f.name: f.type for f in fields(Recipe)}
    for kv in overrides:
        k, v = kv.split("=", 1)
        if k not in types:
            raise SystemExit(f"unknown recipe key {k!r}; known: {sorted(types)}")
        cur = getattr(r, k)
        r = replace(r, **{k: (v.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(v)})
    cfg = bx_config()
    harness.ensure_prepared(cfg)
    valid, test = read_impressions(cfg.data_dir, "valid"), read_impressions(cfg.data_dir, "test")
    lab = Lab(cfg, r)
    t0 = time.perf_counter()
    curve = lab.train(random.Random(1).sample(valid, min(500, len(valid))))
    res = {"name": name, "recipe": asdict(r), "curve": curve, "train_seconds": round(time.perf_counter() - t0),
           "valid": lab.evaluate(valid), "test": lab.evaluate(test), "test_19": lab.evaluate(test, 19),
           "summaries": lab.summary_probe(test), "machine": harness.machine()}
    print(json.dumps({k: res[k] for k in ("valid", "test", "test_19", "summaries")}, default=str), flush=True)
    harness.write_result("recipe", res, RESULTS / f"{name}.json")
    return res


def table() -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)}
    lines = ["| run | changed from the lab default | valid AUC | test AUC | test nDCG@10 | test AUC@19 | summary F1 | "
             "degenerate | train min |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = asdict(Recipe())
    for name, x in runs.items():
        diff = ", ".join(f"{k}={v}" for k, v in x["recipe"].items() if base.get(k) != v) or "(default)"
        s = x.get("summaries") or {}
        f1 = s.get("unigram_f1", float("nan"))
        lines.append(f"| {name} | {diff} | {x['valid']['auc']:.4f} | {x['test']['auc']:.4f} | "
                     f"{x['test']['ndcg10']:.4f} | {x['test_19']['auc']:.4f} | {f1:.3f} | "
                     f"{s.get('degenerate', '-')} | {x['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    sub.add_parser("table")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a.name, a.overrides)
    else:
        md = table()
        (harness.RESULTS / "recipe.md").write_text("# Recipe experiments (python -m bench.recipe)\n\n" + md + "\n")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
