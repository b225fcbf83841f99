"""The summarize stage as a Ray Data job on a local Ray cluster: the offline teacher, and the
chat teacher against a real local HTTP server, including a partially failing endpoint and a
rerun that is served from the cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embsum.arrow_tensors import tensor_array
from embsum.config import config_from_dict
from embsum.data import layout
from embsum.tokenization import EmbSumTokenizer
from tests.conftest import TINY
from tests.fake_llm import FakeLLM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CATEGORIES = [("sports", "nfl"), ("sports", "soccer"), ("finance", "markets"), ("travel", "europe")]
N_ITEMS, N_USERS = 24, 40
POISON = "POISONED"  # the fake endpoint answers 500 to any prompt holding this
HISTORY = {f"U{u}": [f"n{(u * 3 + j) % N_ITEMS}" for j in range(3 + u % 4)] for u in range(N_USERS)}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():  # a shared fixture got there first: use its cluster, leave it running
        yield ray
        return
    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def _write_fixture(data_dir, poison_item: str | None = None) -> list[str]:
    """train/ (the columns summarize reads) and items.parquet as embsum/data/layout.py describes;
    returns the train user ids (one example each)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(N_ITEMS):
        cat, sub = CATEGORIES[i % len(CATEGORIES)]
        title = f"{'Brady' if cat == 'sports' else 'Market'} story number {i}"
        ents = json.dumps([{"Label": "Tom Brady" if cat == "sports" else "Wall Street", "Type": "P"}])
        text = f"{title} | {cat}" + (f" {POISON}" if f"n{i}" == poison_item else "")
        items.append({"item_id": f"n{i}", "text": text, "token_ids": list(range(1, 6)), "category": cat,
                      "subcategory": sub, "title": title, "abstract": "", "title_entities": ents})
    table = pa.Table.from_pylist(items).cast(pa.schema([
        ("item_id", pa.string()), ("text", pa.string()), ("token_ids", pa.list_(pa.int32())),
        ("category", pa.string()), ("subcategory", pa.string()), ("title", pa.string()),
        ("abstract", pa.string()), ("title_entities", pa.string())]))
    pq.write_table(table, layout.path(data_dir, layout.ITEMS))
    splits = ["train" if u % 8 < 6 else ("valid" if u % 8 == 6 else "test") for u in range(N_USERS)]
    train = [f"U{u}" for u in range(N_USERS) if splits[u] == "train"]  # one training example per train user
    sessions = np.ones((len(train), TINY["num_sessions"], TINY["session_tokens"]), dtype=np.int32)  # (E, G, L)
    examples = pa.table({
        "example_id": pa.array([f"{u}:1" for u in train], pa.string()),
        "user_id": pa.array(train, pa.string()),
        "session_ids": tensor_array(sessions),  # a fixed_shape_tensor column, as prepare writes
        "history": pa.array([HISTORY[u] for u in train], pa.list_(pa.string())),
    })
    train_dir = layout.path(data_dir, layout.TRAIN)
    train_dir.mkdir()
    for part in (0, 1):  # two prepare partitions: users with an even and an odd number
        pq.write_table(examples.filter(pa.array([int(u[1:]) % 2 == part for u in train])),
                       train_dir / f"part-{'ab'[part]}.parquet")
    return train


def _cfg(tmp_path, **teacher):
    return config_from_dict({"workdir": str(tmp_path), "model": TINY, "ray": {"num_cpus": 4},
                             "data": {"teacher": {"num_workers": 2, **teacher}}})


def _read_dir(path) -> pa.Table:
    return pq.read_table(str(path))


def test_offline_job_writes_one_summary_per_train_user(ray_cluster, tmp_path):
    from train.summarize import SUMMARY_COLUMNS, run_summarize

    cfg = _cfg(tmp_path)
    train = _write_fixture(cfg.data_dir)
    report = run_summarize(cfg)
    assert report["examples_in"] == report["summarized"] == len(train) and report["failed"] == 0
    assert report["teacher"] == "offline-v1" and report["requests"] == 0 and report["status"] == "ok"
    assert json.loads(layout.path(cfg.data_dir, layout.SUMMARY_REPORT).read_text())["summarized"] == len(train)

    ds = ray_cluster.data.read_parquet(str(layout.path(cfg.data_dir, layout.SUMMARIES)))
    assert ds.columns() == [*SUMMARY_COLUMNS, layout.PART_COLUMN]  # part: from the hive folder names
    rows = ds.take_all()
    assert sorted(r["user_id"] for r in rows) == sorted(train)  # training examples only, each once
    assert sorted(r["example_id"] for r in rows) == sorted(f"{u}:1" for u in train)
    # Partitioned like train/: each example's summary sits under its train file's stem, one file
    # per partition.
    assert all(r[layout.PART_COLUMN] == f"part-{'ab'[int(r['user_id'][1:]) % 2]}" for r in rows)
    folders = sorted(layout.path(cfg.data_dir, layout.SUMMARIES).glob("part=*"))
    assert [f.name for f in folders] == ["part=part-a", "part=part-b"]
    assert all(len(list(f.glob("*.parquet"))) == 1 for f in folders)
    tok = EmbSumTokenizer.from_config(cfg.model)
    for r in rows:
        assert r["summary"].startswith("The user reads mostly ") and r["teacher"] == "offline-v1"
        assert r["prompt_version"] == "v1"
        ids = r["summary_ids"]
        assert ids.shape == (TINY["summary_tokens"],) and ids.dtype == np.int32  # (S,)
        np.testing.assert_array_equal(ids, tok.summary(r["summary"]))
    assert _read_dir(layout.path(cfg.data_dir, layout.SUMMARY_FAILURES)).num_rows == 0


def _chat_teacher(llm: FakeLLM, **kw) -> dict:
    return dict(kind="openai", base_url=llm.base_url, model="fake-model", max_retries=1, backoff_s=0.01,
                timeout_s=10.0, max_concurrency=4, **kw)


def test_chat_job_partial_failure_is_reported_and_a_rerun_hits_the_cache(ray_cluster, tmp_path):
    from train.summarize import run_summarize

    with FakeLLM() as llm:
        cfg = _cfg(tmp_path, **_chat_teacher(llm, max_failure_fraction=0.5))
        train = _write_fixture(cfg.data_dir, poison_item="n5")
        poisoned = sorted(u for u in train if "n5" in HISTORY[u])
        assert 0 < len(poisoned) < len(train) * 0.5
        llm.fail_marker = POISON

        # 1) A partially failing endpoint: failed users are listed and counted, never given a summary.
        report = run_summarize(cfg)
        assert report["failed"] == len(poisoned) and report["summarized"] == len(train) - len(poisoned)
        assert report["requests"] == llm.requests == (len(train) - len(poisoned)) + 2 * len(poisoned)
        assert report["cached_hits"] == 0 and report["status"] == "ok"
        failures = _read_dir(layout.path(cfg.data_dir, layout.SUMMARY_FAILURES)).to_pylist()
        assert sorted(f["user_id"] for f in failures) == poisoned
        assert all("gave up after 2 attempts: HTTP 500" in f["error"] for f in failures)
        summaries_dir = layout.path(cfg.data_dir, layout.SUMMARIES)
        rows = pq.read_table(str(summaries_dir)).to_pylist()
        assert sorted(r["user_id"] for r in rows) == sorted(set(train) - set(poisoned))
        assert all(r["summary"].startswith("The user follows topic") for r in rows)  # real answers only
        assert {r["teacher"] for r in rows} == {"openai:fake-model"}
        assert all(r["summary_ids"][0] != 0 for r in pq.read_table(str(summaries_dir)).to_pylist())

        # 2) The endpoint recovers: successes come from the cache; one request per failed user.
        llm.fail_marker = None
        llm.reset_counters()
        report = run_summarize(cfg)
        assert report["failed"] == 0 and report["summarized"] == len(train)
        assert llm.requests == report["requests"] == len(poisoned)
        assert report["cached_hits"] == len(train) - len(poisoned)
        assert pq.read_table(str(summaries_dir)).num_rows == len(train)
        assert _read_dir(layout.path(cfg.data_dir, layout.SUMMARY_FAILURES)).num_rows == 0


def test_chat_job_above_the_failure_threshold_raises_and_publishes_nothing(ray_cluster, tmp_path):
    from train.summarize import SummarizeError, run_summarize

    with FakeLLM() as llm:
        cfg = _cfg(tmp_path, **_chat_teacher(llm))  # default max_failure_fraction 0.05
        train = _write_fixture(cfg.data_dir, poison_item="n5")
        poisoned = sorted(u for u in train if "n5" in HISTORY[u])
        llm.fail_marker = POISON
        with pytest.raises(SummarizeError, match=rf"{len(poisoned)} of {len(train)} training examples") as e:
            run_summarize(cfg)
        assert "HTTP 500" in str(e.value) and poisoned[0] in str(e.value)  # first errors, with example ids
        failures = _read_dir(layout.path(cfg.data_dir, layout.SUMMARY_FAILURES)).to_pylist()
        assert sorted(f["user_id"] for f in failures) == poisoned
        report = json.loads(layout.path(cfg.data_dir, layout.SUMMARY_REPORT).read_text())
        assert report["status"] == "failed" and report["failed"] == len(poisoned)
        assert not layout.path(cfg.data_dir, layout.SUMMARIES).exists()
