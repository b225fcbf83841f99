"""The summarize stage: one teacher summary per training example, as a Ray Data batch job.

    python -m train.summarize --config ray_config.yaml data.teacher.kind=openai \
        data.teacher.base_url=http://vllm:8000/v1

The teacher summarizes each example's own history, the items its encoder sees: the decoder is
taught to summarize its input, and the global vector it reads from the summary never carries the
example's targets. (A summary of the user's whole history would name them: measured on
Book-Crossing, the model then leans on that shortcut, which inference does not have, and its
validation AUC falls as training goes on; bench/results/recipe_lab.md, runs J and N.) Identical histories cost one
request: the response cache is keyed by the prompt.

Reads WORKDIR/data/train/ (summaries supervise training, never evaluation) and items.parquet, runs
a pool of up to data.teacher.num_workers actors that each hold one teacher (HTTP client and
response cache, or the offline teacher), one items lookup and one tokenizer, and writes (see
embsum/data/layout.py): summaries/ (partitioned like train/: the summaries of the examples in
train/<stem>.parquet under summaries/part=<stem>/, so the trainer joins them file by file, see
train/summaries.py), summaries_failed/ and summarize_report.json.

An example whose request failed after retries gets no summary: it is listed in summaries_failed/
and counted in the report (it trains with an EOS-only summary). The job raises when every example
failed, or when the failed share exceeds data.teacher.max_failure_fraction; summaries/ is then left
as it was (the report and the failure list are still written, and the cache keeps every success, so
a rerun pays only for the failures).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from embsum import events
from embsum.config import Config, replace
from embsum.data import layout
from embsum.data.teachers import load_item_records, load_prompt_template, make_teacher, resolve_cache_dir
from embsum.runtime import init_ray, use_hash_shuffle

SUMMARY_COLUMNS = ["example_id", "user_id", "summary", "teacher", "prompt_version", "summary_ids"]
FIRST_ERRORS = 5  # errors quoted in the report and in the exception


class SummarizeError(RuntimeError):
    """Too many training examples got no summary (the report and failure list say which and why)."""


class SummarizeWorker:
    """Ray Data actor: ``__call__`` turns a batch of examples (example_id, user_id, history) into
    summary rows.

    Everything expensive is built once per actor: the teacher (HTTP settings, cache), the tokenizer
    and the items lookup. The whole catalog is loaded into each actor: items.parquet is small next
    to train/ (MIND: ~65k items, a few MB of text). For a catalog too big for one actor's memory, the
    history -> text join would move into Ray Data instead: explode histories to (example_id,
    item_id) rows, ``join`` them with items.parquet on item_id (hash-partitioned, so no worker holds
    the catalog), regroup by example_id, and hand the teacher ready-made records.
    """

    def __init__(self, cfg: Config, items_path: str, template: str | None, cache_dir: str) -> None:
        from embsum.tokenization import EmbSumTokenizer

        self.teacher = make_teacher(cfg, template=template, cache_dir=cache_dir)
        self.items = load_item_records(items_path, self.teacher.columns)
        self.tokenizer = EmbSumTokenizer.from_config(cfg.model)
        self.summary_tokens = cfg.model.summary_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.summarize(batch)
        if "path" in batch:  # the train/ file (= prepare partition) each example came from
            out[layout.PART_COLUMN] = np.array([os.path.basename(str(p)).removesuffix(".parquet")
                                                for p in batch["path"]], dtype=object)
        return out

    def summarize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(e) for e in batch["example_id"]]
        n = len(keys)
        errors = [""] * n
        skipped = np.zeros(n, dtype=bool)  # nothing to summarize: not a teacher failure
        known: list[int] = []  # positions of examples with at least one item in the catalog
        histories = []
        for k, hist in enumerate(batch["history"]):
            ids = [str(i) for i in (hist if hist is not None else [])]
            recs = [self.items[i] for i in ids if i in self.items]  # oldest first, like the history
            if recs:
                known.append(k)
                histories.append(recs)
            else:
                skipped[k] = True
        results = self.teacher.summarize([keys[k] for k in known], histories)
        summaries = [""] * n
        cached = np.zeros(n, dtype=bool)
        requests = np.zeros(n, dtype=np.int64)
        summary_ids = np.zeros((n, self.summary_tokens), dtype=np.int32)  # (B, S); failed rows stay 0
        for k, r in zip(known, results, strict=True):
            assert r.user_id == keys[k], "teacher returned results out of order"
            summaries[k], errors[k], cached[k], requests[k] = r.summary, r.error, r.cached, r.requests
            if r.ok:
                summary_ids[k] = self.tokenizer.summary(r.summary)  # (S,)
        return {
            "example_id": np.array(keys, dtype=object),
            "user_id": np.array([str(u) for u in batch["user_id"]], dtype=object),
            "summary": np.array(summaries, dtype=object),
            "teacher": np.array([self.teacher.name] * n, dtype=object),
            "prompt_version": np.array([self.teacher.prompt_version] * n, dtype=object),
            "summary_ids": summary_ids,
            "error": np.array(errors, dtype=object),
            "skipped": skipped,
            "cached": cached,
            "requests": requests,
        }


def run_summarize(cfg: Config) -> dict[str, Any]:
    """Run the stage; returns the report (also written to WORKDIR/data/summarize_report.json)."""
    t0 = time.perf_counter()
    cfg = replace(cfg, "workdir", str(cfg.workdir_path))  # absolute: Ray workers run in another cwd
    tcfg = cfg.data.teacher
    data_dir = cfg.data_dir
    train_dir, items_path = layout.path(data_dir, layout.TRAIN), layout.path(data_dir, layout.ITEMS)
    for p in (train_dir, items_path):
        if not p.exists():
            raise ValueError(f"summarize needs {p}, which does not exist: run the prepare stage first")
    # Resolved on the driver and shipped to the actors: a template file or a relative cache path
    # need not exist (or mean the same thing) on a worker. Building one teacher here fails fast
    # on a bad config before any actor starts.
    template = load_prompt_template(tcfg.prompt_template) if tcfg.kind == "openai" else None
    cache_dir = str(resolve_cache_dir(cfg))
    probe = make_teacher(cfg, template=template, cache_dir=cache_dir)
    teacher_name, prompt_version = probe.name, probe.prompt_version
    probe.close()

    out = _summarize_examples(cfg, train_dir, items_path, template, cache_dir, teacher_name)
    counts, failed_ids, failed_users, failed_errors = _tally(out)
    _write_failures(layout.path(data_dir, layout.SUMMARY_FAILURES), failed_ids, failed_users, failed_errors)
    first = [f"{u}: {e}" for u, e in zip(failed_ids[:FIRST_ERRORS], failed_errors[:FIRST_ERRORS], strict=True)]
    n_in, n_failed = counts["examples_in"], counts["failed"]
    fraction = n_failed / n_in if n_in else 0.0
    problem = failure_verdict(n_in, n_failed, tcfg.max_failure_fraction)
    if not problem:
        _write_summaries(out, train_dir, data_dir)

    report = {**counts, "teacher": teacher_name, "prompt_version": prompt_version,
              "seconds": round(time.perf_counter() - t0, 3), "status": "failed" if problem else "ok",
              "failure_fraction": round(fraction, 6), "first_errors": first}
    _write_json(layout.path(data_dir, layout.SUMMARY_REPORT), report)
    events.summary(f"{counts['summarized']:,} of {n_in:,} training examples summarized ({counts['cached_hits']:,} "
                   f"from cache, {n_failed:,} failed, {counts['requests']:,} requests; "
                   f"+{counts['skipped_no_history']:,} with no catalogued history skipped); teacher={teacher_name} "
                   f"prompt_version={prompt_version}" + (f"; FAILED: {problem}" if problem else ""))
    if problem:
        where = layout.path(data_dir, layout.SUMMARY_FAILURES)
        detail = f"; first errors: {first}; all failures in {where}" if first else ""
        raise SummarizeError(f"summarize: {problem}{detail}")
    return report


def _summarize_examples(cfg: Config, train_dir: Path, items_path: Path, template: str | None, cache_dir: str,
                        teacher_name: str) -> Any:
    """The Ray Data job: every training example through the pool of SummarizeWorker actors.
    -> the materialized dataset of summary rows (one per example, failures included)."""
    tcfg = cfg.data.teacher
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    import ray
    from ray.data import ActorPoolStrategy

    use_hash_shuffle(ray.data.DataContext.get_current())

    events.progress(f"summarizing training examples ({teacher_name} teacher)")
    examples = ray.data.read_parquet(str(train_dir), include_paths=True).select_columns(
        ["example_id", "user_id", "history", "path"])
    return examples.map_batches(
        SummarizeWorker,
        fn_constructor_kwargs={"cfg": cfg, "items_path": str(items_path), "template": template,
                               "cache_dir": cache_dir},
        # Several times the per-actor concurrency, so a batch keeps every request slot busy.
        batch_size=max(64, 4 * tcfg.max_concurrency),
        batch_format="numpy",
        # Grows from 1 to num_workers as input queues up: a small job does not start idle actors.
        compute=ActorPoolStrategy(min_size=1, max_size=tcfg.num_workers),
        num_cpus=tcfg.cpus_per_worker,
    ).materialize()  # once: the summaries and failures below must not call the teacher again


def _tally(out: Any) -> tuple[dict[str, int], list[str], list[str], list[str]]:
    """The job's counts and its failures: (counts, failed example ids, their user ids, their errors)."""
    counts = {"examples_in": 0, "summarized": 0, "skipped_no_history": 0, "cached_hits": 0, "failed": 0,
              "requests": 0}
    failed_ids: list[str] = []
    failed_errors: list[str] = []
    failed_users: list[str] = []
    for b in out.select_columns(["example_id", "user_id", "error", "skipped", "cached", "requests"]).iter_batches(
            batch_format="numpy", batch_size=65536):
        bad = np.array([bool(e) for e in b["error"]], dtype=bool)
        skip = np.asarray(b["skipped"], dtype=bool)
        # Examples with no catalogued history item have nothing to summarize; they train with an
        # EOS-only summary and are neither failures nor part of the failure share.
        counts["examples_in"] += int((~skip).sum())
        counts["skipped_no_history"] += int(skip.sum())
        counts["failed"] += int(bad.sum())
        counts["summarized"] += int((~bad & ~skip).sum())
        counts["cached_hits"] += int(b["cached"].sum())
        counts["requests"] += int(b["requests"].sum())
        failed_ids += [str(u) for u in b["example_id"][bad]]
        failed_users += [str(u) for u in b["user_id"][bad]]
        failed_errors += [str(e) for e in b["error"][bad]]
    return counts, failed_ids, failed_users, failed_errors


def _write_summaries(out: Any, train_dir: Path, data_dir: Path) -> None:
    """Publish the successful summaries as summaries/, replacing the previous ones whole."""
    from ray.data.expressions import col

    summaries_dir = layout.path(data_dir, layout.SUMMARIES)
    staging = data_dir / f".{layout.SUMMARIES}.tmp-{uuid.uuid4().hex[:8]}"
    events.progress("writing summaries")
    ok = (col("error") == "") & ~col("skipped")
    # Partitioned like the training data (part=<train file stem>), one file per partition: the
    # trainer joins each train/ file with its partition's summaries only (train/summaries.py).
    parts = max(1, len(list(train_dir.glob("*.parquet"))))
    out.filter(expr=ok).select_columns([*SUMMARY_COLUMNS, layout.PART_COLUMN]) \
        .repartition(parts, keys=[layout.PART_COLUMN]) \
        .write_parquet(str(staging), partition_cols=[layout.PART_COLUMN])
    _publish(staging, summaries_dir)


def failure_verdict(examples_in: int, failed: int, max_failure_fraction: float) -> str:
    """'' when the run may publish its summaries, else what is wrong (for the report and error)."""
    if examples_in == 0:
        return "no training examples in train/"
    if failed == examples_in:
        return f"every one of the {examples_in} training examples failed"
    if failed / examples_in > max_failure_fraction:
        return (f"{failed} of {examples_in} training examples ({failed / examples_in:.1%}) failed, more than "
                f"data.teacher.max_failure_fraction={max_failure_fraction:g}")
    return ""


def _write_failures(path: Path, example_ids: list[str], user_ids: list[str], errors: list[str]) -> None:
    """summaries_failed/ as a one-file parquet dataset, written even when empty (readers need no
    'does it exist' case). Written from the driver: by construction it is small or the job fails."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    table = pa.table({"example_id": pa.array(example_ids, pa.string()), "user_id": pa.array(user_ids, pa.string()),
                      "error": pa.array(errors, pa.string())})
    pq.write_table(table, staging / "part-00000.parquet")
    _publish(staging, path)


def _publish(staging: Path, final: Path) -> None:
    """Replace directory ``final`` by ``staging``: readers see the old dataset or the new one,
    never a half-written mix (only a moment with neither)."""
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    return stage_main("python -m train.summarize", __doc__, lambda cfg, a: run_summarize(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())
