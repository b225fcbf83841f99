"""`embsum evaluate`: Ray Data batch inference over whole evaluation impressions for one registered
version: each item's CPE once, each user's UPE once, scores with the one ``score()``, MIND metrics.

Writes EVAL_ROOT/v<VERSION>/<split>/ (per-impression scores and metrics, parquet) and logs the
means (``valid_auc``, ``test_mrr``, ...) to the version's MLflow run, where the promotion gate reads
them. Works from the registry alone: no training run needs to be alive. ``--impressions PATH
--items PATH`` scores new logs instead (train/newdata.py): next week's impressions, say.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from embsum import events
from embsum.config import Config
from embsum.data import layout
from embsum.metrics import METRIC_NAMES, impression_metrics, mean_metrics
from embsum.runtime import init_ray

from .batch_inference import ItemEncoder, ModelActor, in_calls, parquet_rows, pool_options


class ImpressionScorer(ModelActor):
    """Actor: one model replica + a reference to the precomputed item bank."""

    def __init__(self, bank_ref: list[Any], split_dirs: dict[str, str], **model: Any) -> None:
        import ray

        super().__init__(**model)
        ids, self.cpe, self.key = ray.get(bank_ref[0])
        self.index = {k: i for i, k in enumerate(ids)}
        # Both splits stream through one pool; a row's file path says which split it belongs to.
        self.split_dirs = sorted(((d.rstrip("/") + "/", s) for s, d in split_dirs.items()), key=lambda x: -len(x[0]))

    def _split(self, path: str) -> str:
        return next(s for d, s in self.split_dirs if path.startswith(d) or ("/" + path).startswith(d))

    def _rows(self, impression: Any, cands: Any) -> np.ndarray:
        try:
            return np.fromiter((self.index[str(c)] for c in cands), dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"impression {impression}: candidate item {e.args[0]!r} is not in the catalog "
                             f"({layout.ITEMS}); re-run `embsum prepare`") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        sessions = np.asarray(batch["session_ids"])  # (B, G, L)
        # Each distinct (user, history) is encoded once, however many impressions share it.
        keys = [f"{u}\x00{hash(s.tobytes())}" for u, s in zip(batch["user_id"], sessions, strict=True)]
        uniq = {k: i for i, k in reversed(list(enumerate(keys)))}
        order = list(uniq.values())
        upe = self.predictor.encode_users(sessions[order], with_text=False).upe  # (U, M, D)
        row_of = {k: j for j, k in enumerate(uniq)}
        scores, metrics = [], {m: [] for m in METRIC_NAMES}  # type: list[np.ndarray], dict[str, list[float]]
        for imp, k, cands, labels in zip(batch["impression_id"], keys, batch["candidate_item_ids"], batch["labels"],
                                         strict=True):
            idx = self._rows(imp, cands)
            s = self.predictor.score(upe[row_of[k]][None], self.cpe[idx], self.key[idx])[0]  # (C,)
            scores.append(s.astype(np.float32))
            m = impression_metrics(np.asarray(labels), s) or dict.fromkeys(METRIC_NAMES, float("nan"))
            for name in METRIC_NAMES:
                metrics[name].append(m[name])
        return {"split": np.asarray([self._split(str(p)) for p in batch["path"]]),
                "impression_id": batch["impression_id"], "user_id": batch["user_id"],
                "candidate_item_ids": batch["candidate_item_ids"], "labels": batch["labels"],
                "scores": np.array(scores, dtype=object), **{n: np.asarray(v) for n, v in metrics.items()}}


def _item_bank(cfg: Config, model: dict[str, Any], items_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """CPE + key for every catalog item, encoded once (Ray Data actor pool). The whole catalog rather
    than only the items the impressions mention: finding those would cost a pass over the splits,
    and an item's CPE is a fraction of a user's encoding."""
    import ray.data

    items = ray.data.read_parquet(str(items_path)).select_columns(["item_id", "text", "token_ids"])
    items, rows = in_calls(items, parquet_rows(items_path), cfg.infer)
    enc = items.map_batches(ItemEncoder, batch_size=rows, batch_format="numpy", fn_constructor_kwargs=model,
                            **pool_options(cfg.infer))
    ids: list[str] = []
    cpes, keys = [], []
    for b in enc.select_columns(["item_id", "cpe", "cpe_key"]).iter_batches(batch_size=4096, batch_format="numpy"):
        ids.extend(str(x) for x in b["item_id"])
        cpes.append(np.asarray(b["cpe"], np.float32))
        keys.append(np.asarray(b["cpe_key"], np.float32))
    if not ids:
        raise ValueError(f"{items_path} has no items: run `embsum prepare` first")
    return ids, np.concatenate(cpes), np.concatenate(keys)


def run_evaluate(cfg: Config, version: str | None = None, splits: tuple[str, ...] = ("valid", "test"),
                 *, log: bool = True) -> dict[str, Any]:
    """The prepared valid/test impressions. Two Ray Data executions whatever the number of splits:
    the item bank, then every split's impressions through one scorer pool (each actor start loads a
    model: on a small cluster that, not the scoring, is most of an evaluation's time)."""
    from embsum.registry import Registry

    t0 = time.perf_counter()
    registry = Registry(cfg)
    version = registry.resolve(version, default="newest").version
    splits = tuple(s for s in splits if (cfg.data_dir / s).exists())
    if not splits:
        raise ValueError(f"no evaluation splits under {cfg.data_dir}: run `embsum prepare` first")
    events.progress("connecting to Ray")
    init_ray(cfg.ray)
    events.progress(f"downloading v{version}")
    model_dir = registry.download(version, cfg.workdir_path / "models" / f"v{version}")
    results = score_splits(cfg, version, model_dir, cfg.data_dir / layout.ITEMS,
                           {s: cfg.data_dir / s for s in splits}, cfg.workdir_path / "eval" / f"v{version}")
    results = {"version": version, **results}
    if log:
        run_id = registry.version(version).run_id
        for split in splits:
            registry.log_metrics(run_id, {f"{split}_{k}": v for k, v in results[split].items()
                                          if isinstance(v, (int, float))})
    results["seconds"] = time.perf_counter() - t0
    print(format_table(results), flush=True)
    if log:
        registry.log_dict(registry.version(version).run_id, results, f"eval/v{version}.json")
    events.summary(summary_line(results))
    return results


def run_evaluate_new(cfg: Config, version: str | None, impressions: str, items: str,
                     *, log: bool = True) -> dict[str, Any]:
    """A version on a MIND-format impressions file + catalog that prepare never saw (train/newdata.py):
    the same scoring and metrics, written to EVAL_ROOT/v<V>/new-<name>/ and logged as ``new_*``."""
    import hashlib

    from embsum.registry import Registry

    from .newdata import SPLIT, prepare_new_data

    t0 = time.perf_counter()
    registry = Registry(cfg)
    version = registry.resolve(version, default="newest").version
    model_dir = registry.download(version, cfg.workdir_path / "models" / f"v{version}")
    name = Path(impressions).stem + "-" + hashlib.sha256(f"{impressions}\0{items}".encode()).hexdigest()[:8]
    out_root = cfg.workdir_path / "eval" / f"v{version}" / f"new-{name}"
    data = prepare_new_data(cfg, model_dir, impressions, items, out_root / "data")
    print(f"evaluate: {data['impressions']:,} impressions from {data['rows']:,} rows of {impressions} "
          f"({sum(data['quarantined'].values()):,} quarantined: {data['quarantined'] or 'none'}; "
          f"{data['skipped_without_both_labels']:,} without both a click and a non-click skipped) -> "
          f"{out_root / 'data' / 'quarantine'}", flush=True)
    if not data["impressions"]:
        raise ValueError(f"--impressions {impressions!r}: no impression with both a clicked and an unclicked "
                         f"catalogued candidate (see the quarantine under {out_root / 'data'})")
    init_ray(cfg.ray)
    results = score_splits(cfg, version, model_dir, out_root / "data" / "items.parquet",
                           {SPLIT: out_root / "data" / SPLIT}, out_root)
    results = {"version": version, **results, "data": data, "seconds": time.perf_counter() - t0}
    if log:
        run_id = registry.version(version).run_id
        registry.log_metrics(run_id, {f"new_{k}": v for k, v in results[SPLIT].items() if isinstance(v, (int, float))})
        registry.log_dict(run_id, results, f"eval/v{version}-new-{name}.json")
    print(format_table(results), flush=True)
    events.summary(summary_line(results))
    return results


def score_splits(cfg: Config, version: str, model_dir: Path, items_path: Path, split_dirs: dict[str, Path],
                 out_root: Path) -> dict[str, Any]:
    """Item bank, then every split through one scorer pool -> out_root/<split>/ + mean metrics."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = True
    model = {"cfg_dict": cfg.to_dict(), "version": version, "model_dir": str(model_dir)}
    events.progress(f"encoding {parquet_rows(items_path):,} catalog items")
    bank_ref = ray.put(_item_bank(cfg, model, items_path))
    dirs = {s: str(d) for s, d in split_dirs.items()}
    ds = ray.data.read_parquet(list(dirs.values()), include_paths=True)
    n_impressions = sum(parquet_rows(Path(d)) for d in dirs.values())
    events.progress(f"scoring {n_impressions:,} impressions ({', '.join(dirs)})")
    ds, rows = in_calls(ds, n_impressions, cfg.infer)
    scored = ds.map_batches(ImpressionScorer, batch_size=rows, batch_format="numpy",
                            fn_constructor_kwargs={"bank_ref": [bank_ref], "split_dirs": dirs, **model},
                            **pool_options(cfg.infer))
    staging = out_root / f".tmp-{int(time.time() * 1000)}"
    scored.write_parquet(str(staging), partition_cols=["split"])
    results: dict[str, Any] = {}
    for split in dirs:
        out = out_root / split
        if out.exists():
            shutil.rmtree(out)  # a rerun replaces, never mixes, the per-impression files
        written = staging / f"split={split}"
        if written.exists():
            written.replace(out)
        else:
            out.mkdir(parents=True)
        results[split] = mean_metrics_of(out)
    shutil.rmtree(staging, ignore_errors=True)
    return results


def mean_metrics_of(folder: Path) -> dict[str, float]:
    """Means from the written per-impression scores (recomputed, so the file is the source of truth)."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(folder), format="parquet").to_table(columns=["labels", "scores"])
    pairs = zip(table.column("labels").to_pylist(), table.column("scores").to_pylist(), strict=True)
    return mean_metrics(pairs).as_dict()


def summary_line(results: dict[str, Any]) -> str:
    """'v3 valid auc 0.6123 mrr ... (163 impressions) | test ...': the console's line for the stage."""
    splits = [s for s in results if isinstance(results[s], dict) and "auc" in results[s]]
    return f"v{results.get('version')} " + " | ".join(
        f"{s} " + " ".join(f"{m} {results[s][m]:.4f}" for m in METRIC_NAMES) + f" ({results[s]['impressions']:,} "
        f"impressions)" for s in splits)


def format_table(results: dict[str, Any]) -> str:
    splits = [s for s in results if isinstance(results[s], dict) and "auc" in results[s]]
    head = f"{'split':<8}" + "".join(f"{m:>9}" for m in METRIC_NAMES) + f"{'impr':>8}{'skipped':>9}"
    rows = [head] + [f"{s:<8}" + "".join(f"{results[s][m]:>9.4f}" for m in METRIC_NAMES)
                     + f"{results[s]['impressions']:>8}{results[s]['skipped']:>9}" for s in splits]
    return f"evaluation of v{results.get('version')}\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from embsum.stage import stage_main

    def add(p: Any) -> None:
        p.add_argument("--version", default=None, help="version number or alias (default: the newest)")
        p.add_argument("--impressions", default=None, help="a MIND-format behaviors file prepare never saw")
        p.add_argument("--items", default=None, help="its catalog, in the run config's item format")

    def run(cfg: Config, a: Any) -> dict[str, Any]:
        if bool(a.impressions) != bool(a.items):
            raise ValueError("--impressions and --items go together: new impressions need their catalog")
        if a.impressions:
            return run_evaluate_new(cfg, a.version, a.impressions, a.items)
        return run_evaluate(cfg, a.version)

    return stage_main("python -m train.evaluate", __doc__, run, argv, add)


if __name__ == "__main__":
    sys.exit(main())
