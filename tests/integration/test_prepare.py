"""The prepare job on a local Ray cluster: synthetic, Book-Crossing and MIND end to end, a log full
of bad rows, and outputs that read back through Ray Data as (B, G, L) / (B, C, Lc) tensors."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embsum.config import Config, config_from_dict, load_config
from embsum.data import layout
from embsum.data import records as R
from tests.conftest import REPO, TINY, shared_data
from train.prepare import main, run_prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
G, L, LC = TINY["num_sessions"], TINY["session_tokens"], TINY["content_tokens"]


def _synthetic(tmp_path, **data) -> Config:
    return config_from_dict({"workdir": str(tmp_path / "wd"), "model": TINY, "data": {
        "format": "synthetic", "synth_users": 60, "synth_items": 120, "synth_impressions": 300, **data}})


def _table(cfg: Config, name: str):
    return pads.dataset(str(cfg.data_dir / name), format="parquet").to_table()


def _check_torch_batches(ray, cfg: Config, name: str, negatives: int) -> int:
    ds = ray.data.read_parquet(str(cfg.data_dir / name)).select_columns(["session_ids", "candidate_ids"])
    rows = 0
    for batch in ds.iter_torch_batches(batch_size=16):
        b = batch["session_ids"].shape[0]
        assert tuple(batch["session_ids"].shape) == (b, G, L) and str(batch["session_ids"].dtype) == "torch.int32"
        # T targets per example, each a [positive, K negatives] block (data.targets_per_example)
        assert tuple(batch["candidate_ids"].shape) == (b, cfg.data.targets_per_example * (1 + negatives), LC)
        rows += b
    return rows


def test_synthetic_end_to_end_rerun_and_determinism(ray_cluster, tmp_path):
    import os

    import ray.data

    cfg = _synthetic(tmp_path)
    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.resource_limits, ctx.shuffle_compression)
    rep = run_prepare(cfg)
    # One task per core on this one-machine cluster (its logical CPUs may outnumber the cores), and
    # the job's Ray Data settings are put back for the stages after it.
    assert rep["task_slots"] == min(rep["cluster_cpus"], len(os.sched_getaffinity(0)))
    assert (ctx.execution_options.resource_limits, ctx.shuffle_compression) == before
    assert rep["rows_in"] == rep["rows_out"] == 300 and rep["quarantined"] == 0 and rep["items"]["items"] == 120
    assert rep["examples"]["train"] > 100 and rep["users"]["total"] == len(set(_table(cfg, layout.USERS)
                                                                               .column("user_id").to_pylist()))
    assert json.loads((cfg.data_dir / layout.REPORT).read_text())["fingerprint"] == rep["fingerprint"]
    assert _check_torch_batches(ray_cluster, cfg, layout.TRAIN, 4) == rep["examples"]["train"]
    assert _check_torch_batches(ray_cluster, cfg, layout.VALID_EXAMPLES, 4) == rep["examples"]["valid_examples"]
    for split in ("valid", "test"):
        t = _table(cfg, split)
        assert t.num_rows == rep["eval_impressions"][split]
        assert all(0 < sum(lab) < len(lab) for lab in t.column("labels").to_pylist())
    users = _table(cfg, layout.USERS)
    assert set(users.column("split").to_pylist()) <= {"train", "valid", "test"}
    assert pq.read_table(cfg.data_dir / layout.ITEMS).num_rows == 120
    first = _table(cfg, layout.TRAIN).sort_by("example_id")

    smaller = run_prepare(_synthetic(tmp_path, synth_impressions=120))  # rerun: same workdir, fewer rows
    assert _table(cfg, layout.TRAIN).num_rows == smaller["examples"]["train"] < rep["examples"]["train"]
    assert not list(cfg.data_dir.glob(".prepare-*"))  # no staging left behind
    assert smaller["fingerprint"] != rep["fingerprint"]

    # Same data, the cluster reached by address as `embsum run`'s stages reach it: identical rows,
    # and still one task per core (the address names this machine's one node).
    from embsum.config import replace

    by_address = replace(cfg, "ray.address", ray.get_runtime_context().gcs_address)
    again = run_prepare(by_address)
    assert again["fingerprint"] == rep["fingerprint"] and again["task_slots"] == rep["task_slots"]
    assert _table(cfg, layout.TRAIN).sort_by("example_id").equals(first)


def _tables(cfg: Config) -> dict[str, object]:
    keys = {layout.TRAIN: "example_id", layout.VALID_EXAMPLES: "example_id", layout.VALID: "impression_id",
            layout.TEST: "impression_id", layout.USERS: "user_id"}
    return {name: _table(cfg, name).sort_by(key) for name, key in keys.items()}


def test_same_rows_on_one_partition_or_many_and_in_one_process(ray_cluster, tmp_path, monkeypatch):
    """Determinism: the rows written do not depend on how users land in partitions or blocks, and
    equal what the same transforms give in one process (the benchmark's pandas baseline)."""
    import train.prepare as prep
    from bench.prepare_bench import run_baseline

    data = dict(synth_users=40, synth_impressions=400, valid_fraction=0.2, test_fraction=0.2)
    monkeypatch.setattr(prep, "ROWS_PER_PARTITION", (10**9, 10**9))  # one partition
    one = _synthetic(tmp_path / "one", **data)
    rep_one = run_prepare(one)
    monkeypatch.setattr(prep, "ROWS_PER_PARTITION", (5, 40))  # ten partitions, parsed in 8 blocks
    monkeypatch.setattr(prep, "ROWS_PER_BLOCK", (50, 50))
    many = _synthetic(tmp_path / "many", **data)
    rep_many = run_prepare(many)
    assert (rep_one["plan_partitions"], rep_many["plan_partitions"]) == (1, 10)
    assert len(list((many.data_dir / layout.USERS).glob("*.parquet"))) == 10  # every partition has users
    base = _synthetic(tmp_path / "pandas", **data)
    run_baseline(base)
    got_one, got_many, got_base = _tables(one), _tables(many), _tables(base)
    for name in got_one:
        assert got_one[name].num_rows > 0, name
        assert got_one[name].equals(got_many[name]), name
        assert got_one[name].select(got_base[name].column_names).equals(got_base[name]), name
    for key in ("rows_in", "rows_out", "examples", "eval_impressions", "users", "candidates", "skipped"):
        assert rep_one[key] == rep_many[key], key


def test_random_order_targets_and_held_out_positives_do_not_depend_on_partitions(ray_cluster, tmp_path,
                                                                                   monkeypatch):
    """A log without time (data.event_order random, T targets per example, several held-out positives,
    several views): the same rows on one partition or many, with rows and files permuted."""
    import random

    import train.prepare as prep

    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"b{k},Book {k}\n" for k in range(60)))
    rng = random.Random(3)
    rows = sorted({(f"u{rng.randrange(30)}", f"b{rng.randrange(60)}") for _ in range(600)})
    rng.shuffle(rows)

    def cfg_for(name: str, files: list[list[tuple[str, str]]]) -> Config:
        log_dir = tmp_path / name / "log"
        log_dir.mkdir(parents=True)
        for k, part in enumerate(files):
            (log_dir / f"{k}.csv").write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in part))
        return config_from_dict({"workdir": str(tmp_path / name / "wd"), "model": TINY, "data": {
            "format": "logs", "interactions": str(log_dir), "items": str(items), "user_col": "user",
            "item_col": "item", "item_text_fields": ["title"], "event_order": "random", "targets_per_example": 2,
            "eval_positives": 2, "views_per_user": 2, "valid_fraction": 0.2, "test_fraction": 0.2,
            "eval_negatives": 5}})

    monkeypatch.setattr(prep, "ROWS_PER_PARTITION", (10**9, 10**9))  # one partition
    one = cfg_for("one", [rows])
    rep_one = run_prepare(one)
    monkeypatch.setattr(prep, "ROWS_PER_PARTITION", (60, 120))  # several partitions, in small blocks
    monkeypatch.setattr(prep, "ROWS_PER_BLOCK", (50, 50))
    many = cfg_for("many", [rows[300:][::-1], rows[:300]])  # other files, other row order
    rep_many = run_prepare(many)
    assert rep_one["plan_partitions"] == 1 < rep_many["plan_partitions"]
    got_one, got_many = _tables(one), _tables(many)
    for name in got_one:
        assert got_one[name].num_rows > 0, name
        assert got_one[name].equals(got_many[name]), name
    train = got_one[layout.TRAIN]
    assert all(len(lab) == 2 * (1 + one.data.negatives) for lab in train.column("labels").to_pylist())
    held = [i for i in got_one[layout.VALID].column("impression_id").to_pylist() if ":held" in i]
    assert held and rep_one["examples"]["valid_examples"] > 0
    for key in ("rows_in", "rows_out", "examples", "eval_impressions", "users", "skipped"):
        assert rep_one[key] == rep_many[key], key


def test_parquet_log_read_natively_with_row_numbers_in_quarantine(ray_cluster, tmp_path):
    import pyarrow as pa

    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [f"b{k}" for k in range(20)], "title": [f"Book {k}" for k in range(20)]}),
                   items)
    good = [(f"u{k % 4}", f"b{k % 20}", f"2024-01-{1 + k % 28:02d}T10:00:00", "5", f"s{k}") for k in range(30)]
    bad = {31: (("", "b1", "2024-01-02T10:00:00", "5", "s90"), R.EMPTY_USER),
           32: (("u1", "b1", "2024-01-02T10:00:00", "five", "s91"), R.BAD_LABEL),
           33: (("u1", "b999", "2024-01-02T10:00:00", "5", "s92"), R.NOT_IN_CATALOG),
           34: (("u2", "b4", "yesterday", "5", "s93"), R.BAD_TIMESTAMP),
           35: (("u3", "b4", "2024-01-03T10:00:00", "5", "s1"), R.DUPLICATE_IMPRESSION)}  # s1 is u1's
    rows = good + [r for r, _ in bad.values()]
    cols = ["user", "item", "when", "stars", "session"]
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    # two files, several row groups each, an extra column the job must not read
    for name, part in (("a.parquet", rows[:18]), ("b.parquet", rows[18:])):
        table = pa.table({c: [r[i] for r in part] for i, c in enumerate(cols)} | {"blob": ["x" * 100] * len(part)})
        pq.write_table(table, log_dir / name, row_group_size=5)
    cfg = config_from_dict({"workdir": str(tmp_path / "wd"), "model": TINY, "data": {
        "format": "logs", "interactions": str(log_dir), "items": str(items), "user_col": "user", "item_col": "item",
        "timestamp_col": "when", "label_col": "stars", "positive_threshold": 4, "impression_col": "session",
        "item_text_fields": ["title"], "valid_fraction": 0.0, "test_fraction": 0.0}})
    rep = run_prepare(cfg)
    q = _table(cfg, layout.QUARANTINE)
    got = {(s.rsplit("/", 1)[-1], n): r for s, n, r in zip(*(q.column(c).to_pylist()
                                                              for c in ("source", "line", "reason")), strict=True)}
    assert got == {("b.parquet", k - 18): reason for k, (_, reason) in bad.items()}  # row numbers within b.parquet
    assert rep["rows_in"] == len(rows) and rep["rows_out"] == len(good) and rep["items"]["items"] == 20
    assert rep["quarantined_by_reason"] == dict(Counter(r for _, r in bad.values()))
    raw = q.filter(pc.equal(q.column("line"), 32 - 18)).column("raw").to_pylist()[0]
    assert json.loads(raw) == dict(zip(cols, bad[32][0], strict=True))  # the row, as JSON, without "blob"
    users = _table(cfg, layout.USERS).to_pylist()
    assert {(u["user_id"], i) for u in users for i in u["history"]} == {(r[0], r[1]) for r in good}


def _write_bad_log(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,genre\n"
                     + "".join(f"b{k},Book number {k},genre{k % 3}\n" for k in range(30))
                     + "b3,A second b3,dup\n"      # line 32: duplicate item id
                     + ",No id,x\n")               # line 33: empty item id
    log = tmp_path / "log.csv"
    good = [f"u{k % 5},b{k % 30},2024-01-{1 + k % 28:02d}T10:00:00,{5 if k % 4 else 2},s{k}" for k in range(40)]
    bad = {  # line -> (text, reason); lines 2..41 are the good rows above
        42: ("u1,b1,2024-01-02T10:00:00,5", R.WRONG_COLUMNS),
        43: (b"u\xe9,b1,2024-01-02T10:00:00,5,s90", R.BAD_ENCODING),
        44: (",b1,2024-01-02T10:00:00,5,s91", R.EMPTY_USER),
        45: ("u1,,2024-01-02T10:00:00,5,s92", R.EMPTY_ITEM),
        46: ("u1,b1,2024-01-02T10:00:00,five,s93", R.BAD_LABEL),
        47: ("u1,b1,02/30/2024 10:00:00 AM,5,s94", R.BAD_TIMESTAMP),
        48: ("u1,b999,2024-01-02T10:00:00,5,s95", R.NOT_IN_CATALOG),
        49: ("u2,b4,2024-01-02T10:00:00,5,s1", R.DUPLICATE_IMPRESSION),  # s1 belongs to u1
        50: ("u2,b4,2024-01-02T10:00:00,5,", R.EMPTY_IMPRESSION),
    }
    lines = [b"user,item,when,stars,session"] + [g.encode() for g in good] + \
        [t if isinstance(t, bytes) else t.encode() for t, _ in bad.values()]
    log.write_bytes(b"\n".join(lines) + b"\n")
    return log, items, good, {k: v[1] for k, v in bad.items()}


def test_bad_rows_are_quarantined_through_ray_and_good_rows_all_come_out(ray_cluster, tmp_path):
    log, items, good, expected = _write_bad_log(tmp_path)
    cfg = config_from_dict({"workdir": str(tmp_path / "wd"), "model": TINY, "data": {
        "format": "logs", "interactions": str(log), "items": str(items), "user_col": "user", "item_col": "item",
        "timestamp_col": "when", "label_col": "stars", "positive_threshold": 4, "impression_col": "session",
        "item_text_fields": ["title", "genre"], "valid_fraction": 0.2, "test_fraction": 0.2, "eval_negatives": 5}})
    rep = run_prepare(cfg)
    q = _table(cfg, layout.QUARANTINE)
    got = {(s, n): r for s, n, r in zip(*(q.column(c).to_pylist() for c in ("source", "line", "reason")),
                                        strict=True)}
    assert {n: r for (s, n), r in got.items() if s == str(log)} == expected
    assert {n: r for (s, n), r in got.items() if s == str(items)} == {32: R.DUPLICATE_ITEM, 33: R.EMPTY_ITEM}
    assert rep["rows_in"] == len(good) + len(expected) and rep["rows_out"] == len(good)
    assert rep["quarantined"] == len(expected) + 2
    assert rep["quarantined_by_reason"] == dict(Counter([*expected.values(), R.DUPLICATE_ITEM, R.EMPTY_ITEM]))
    positives = {(g.split(",")[0], g.split(",")[1]) for g in good if g.split(",")[3] == "5"}
    users = _table(cfg, layout.USERS).to_pylist()
    assert {(u["user_id"], i) for u in users for i in u["history"]} == positives  # every good positive is kept
    assert q.filter(pc.equal(q.column("line"), 43)).column("raw").to_pylist()[0].startswith("u\\xe9")


def test_mind_format_bad_rows_and_duplicate_impressions(ray_cluster, tmp_path):
    news = tmp_path / "news.tsv"
    news.write_text("".join(f"N{k}\tsports\tnfl\tTitle {k}\tAbstract {k}\thttp://x\t[]\t[]\n" for k in range(20)))
    beh = tmp_path / "behaviors.tsv"
    lines = [f"{k}\tU{k % 4}\t11/1{k % 9}/2019 1:00:00 PM\tN1 N2 N50\tN{k % 20}-1 N{(k + 1) % 20}-0 N77-0"
             for k in range(1, 13)]
    lines += ["3\tU9\t11/12/2019 1:00:00 PM\tN1\tN4-1 N5-0",      # line 13: duplicate impression id 3
              "14\tU9\t11/12/2019 1:00:00 PM\tN1\tN4-1 N5-x",     # line 14: bad label
              "15\tU9\tlast tuesday\tN1\tN4-1 N5-0"]              # line 15: bad timestamp
    beh.write_text("\n".join(lines) + "\n")
    cfg = config_from_dict({"workdir": str(tmp_path / "wd"), "model": TINY, "data": {
        "format": "mind", "interactions": str(beh), "items": str(news), "valid_fraction": 0.0, "test_fraction": 0.0}})
    rep = run_prepare(cfg)
    q = _table(cfg, layout.QUARANTINE)
    assert dict(zip(q.column("line").to_pylist(), q.column("reason").to_pylist(), strict=True)) == \
        {13: R.DUPLICATE_IMPRESSION, 14: R.BAD_LABEL, 15: R.BAD_TIMESTAMP}
    assert rep["rows_out"] == 12 and rep["candidates"]["dropped_not_in_catalog"] >= 12  # N77 has no text
    assert rep["history_items"]["dropped_not_in_catalog"] >= 12  # N50 neither
    train = _table(cfg, layout.TRAIN)
    assert "3" in train.column("impression_id").to_pylist() and "U9" not in train.column("user_id").to_pylist()


def test_wrong_delimiter_fails_before_any_job(tmp_path):
    log = tmp_path / "log.tsv"
    log.write_text("user,item\nu1,b1\n")
    items = tmp_path / "items.tsv"
    items.write_text("item_id\ttitle\nb1\tA book\n")
    cfg = config_from_dict({"workdir": str(tmp_path / "wd"), "model": TINY, "data": {
        "format": "logs", "interactions": str(log), "items": str(items), "user_col": "user", "item_col": "item",
        "item_text_fields": ["title"]}})
    with pytest.raises(ValueError, match=r"log\.tsv.*missing required column.*tab-separated"):
        run_prepare(cfg)


def test_book_crossing_by_config(ray_cluster, tmp_path):
    shared_data("book-crossing")
    cfg = load_config(REPO / "configs" / "book-crossing.yaml",
                      [f"workdir={tmp_path / 'wd'}", *(f"model.{k}={v}" for k, v in TINY.items()),
                       f"data.interactions={shared_data('book-crossing', 'ratings.tsv')}",
                       f"data.items={shared_data('book-crossing', 'books.tsv')}"])
    rep = run_prepare(cfg)
    assert rep["rows_in"] == rep["rows_out"] == 106_729 and rep["quarantined"] == 0
    assert rep["labels"]["ignored"] == 65_273 and rep["dropped"]["ignored label"] == 65_273
    assert rep["items"]["items"] == 2030 and rep["users"]["total"] == 1820
    explicit = rep["rows_in"] - rep["labels"]["ignored"]
    assert explicit == 41_456 and 0.6 < rep["labels"]["positive"] / explicit < 0.7  # README: 66.3% are >= 8
    assert cfg.data.targets_per_example == 4  # the recipe: 4 positives share one history
    assert _check_torch_batches(ray_cluster, cfg, layout.TRAIN, 4) == rep["examples"]["train"] > 5_000
    test = _table(cfg, layout.TEST)
    assert all(len(c) == 50 and sum(lab) == 1 for c, lab in zip(test.column("candidate_item_ids").to_pylist(),
                                                                  test.column("labels").to_pylist(), strict=True))


def test_mind_sample_and_covered_via_cli(ray_cluster, tmp_path):
    shared_data("mind")
    base = [*(f"model.{k}={v}" for k, v in TINY.items()),
            f"data.items={shared_data('mind', 'MINDsmall_train_sample', 'news.tsv')}"]
    raw = load_config(REPO / "configs" / "mind.yaml", [*base, f"workdir={tmp_path / 'raw'}", "data.interactions="
                      + str(shared_data("mind", "MINDsmall_train_sample", "behaviors.tsv"))])
    rep = run_prepare(raw)
    assert rep["rows_in"] == 5000 and rep["candidates"]["in"] == 189_359 and rep["candidates"]["clicked"] == 7_542
    assert set(rep["quarantined_by_reason"]) == {R.NOT_IN_CATALOG}  # well-formed rows, sparse text coverage
    assert rep["rows_out"] + rep["quarantined"] == 5000 and rep["items"]["items"] == 2000
    result = tmp_path / "result.json"
    covered = str(shared_data("mind", "derived", "behaviors_news_covered.tsv"))
    assert main(["--config", str(REPO / "configs" / "mind.yaml"), "--result", str(result), *base,
                 f"workdir={tmp_path / 'covered'}", f"data.interactions={covered}"]) == 0
    rep = json.loads(result.read_text())
    assert (rep["rows_in"], rep["candidates"]["in"], rep["candidates"]["clicked"], rep["quarantined"]) == \
        (119, 402, 126, 0)
    assert rep["candidates"]["dropped_not_in_catalog"] == 0
