"""Teachers without Ray: the offline summary, prompt rendering, the cache, and the chat-completions
client against a real local HTTP server (tests/fake_llm.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from embsum.config import TeacherConfig, config_from_dict
from embsum.data.teacher_cache import TeacherCache, cache_key
from embsum.data.teachers import (
    DEFAULT_TEMPLATE,
    OFFLINE_TEACHER_NAME,
    ChatCompletionsTeacher,
    OfflineTeacher,
    SummaryResult,
    load_prompt_template,
    make_teacher,
    render_prompt,
)
from tests.fake_llm import FakeLLM


def _ents(*labels: str) -> str:
    return json.dumps([{"Label": lb, "Type": "P", "WikidataId": "Q1", "Confidence": 1.0} for lb in labels])


MIND_HISTORY = [
    {"title": "Patriots beat Jets in overtime", "category": "sports", "subcategory": "nfl",
     "title_entities": _ents("Tom Brady", "New England Patriots"), "text": "Patriots beat Jets | sports"},
    {"title": "Stocks rally as election nears", "category": "finance", "subcategory": "markets",
     "title_entities": _ents("Wall Street"), "text": "Stocks rally | finance"},
    {"title": "Brady throws four touchdowns", "category": "sports", "subcategory": "nfl",
     "title_entities": _ents("Tom Brady"), "text": "Brady throws | sports"},
    {"title": "Champions League soccer recap", "category": "sports", "subcategory": "soccer",
     "title_entities": "not json", "text": "Champions League | sports"},
]

BOOK_HISTORY = [
    {"book_title": "The Shining", "book_author": "Stephen King", "publisher": "Signet", "text": "The Shining"},
    {"book_title": "It", "book_author": "Stephen King", "publisher": "Viking", "text": "It"},
    {"book_title": "The Firm", "book_author": "John Grisham", "publisher": "Dell", "text": "The Firm"},
    {"book_title": "Carrie", "book_author": "Stephen King", "publisher": "Signet", "text": "Carrie"},
]


# ---- offline teacher ------------------------------------------------------------------------
def test_offline_mind_is_deterministic_and_names_the_dominant_facet():
    t = OfflineTeacher(TeacherConfig())
    text = t.summary_text(MIND_HISTORY)
    assert text.startswith("The user reads mostly sports (nfl, soccer) and finance")
    assert "Tom Brady" in text  # the most frequent entity
    assert text == OfflineTeacher(TeacherConfig()).summary_text([dict(r) for r in MIND_HISTORY])
    [r] = t.summarize(["u1"], [MIND_HISTORY])
    assert r.ok and r.summary == text and r.requests == 0 and t.name == OFFLINE_TEACHER_NAME


def test_offline_book_crossing_facets_are_authors():
    text = OfflineTeacher(TeacherConfig()).summary_text(BOOK_HISTORY)
    assert text == "The user reads mostly Stephen King (Signet, Viking) and John Grisham (Dell)."


def test_offline_ties_go_to_the_most_recent_and_terms_must_recur():
    hist = [{"category": "travel", "title": "Cheap flights to Lisbon"},
            {"category": "autos", "title": "Electric cars get cheaper"},
            {"category": "food", "title": "Lisbon pastry guide"}]
    text = OfflineTeacher(TeacherConfig()).summary_text(hist)
    assert text == "The user reads mostly food, autos and travel; recurring topics: lisbon."


def test_offline_uses_only_the_most_recent_items():
    t = OfflineTeacher(TeacherConfig(max_items=2))
    old = [{"category": "travel", "title": "Old trip to Rome", "text": "x"}] * 5
    text = t.summary_text(old + MIND_HISTORY[-2:])
    assert "travel" not in text and "sports" in text


def test_offline_reports_an_error_instead_of_an_empty_summary():
    [r] = OfflineTeacher(TeacherConfig()).summarize(["u9"], [[{"title": "the of and"}]])
    assert not r.ok and r.summary == "" and "u9" == r.user_id and "no facets" in r.error


# ---- prompt and cache -----------------------------------------------------------------------
def test_render_prompt_keeps_recent_items_oldest_first_one_per_line():
    hist = [{"text": f"item {i}\nwith  newline"} for i in range(5)]
    prompt = render_prompt("A {x} {history} Z", hist, max_items=3)
    assert prompt == "A {x} item 2 with newline\nitem 3 with newline\nitem 4 with newline Z"
    assert "{history}" in DEFAULT_TEMPLATE


def test_prompt_template_file(tmp_path):
    assert load_prompt_template("") == DEFAULT_TEMPLATE
    good = tmp_path / "p.txt"
    good.write_text("Summarize:\n{history}\n")
    assert load_prompt_template(str(good)) == "Summarize:\n{history}\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match="no {history} placeholder"):
        load_prompt_template(str(bad))
    with pytest.raises(ValueError, match="not found"):
        load_prompt_template(str(tmp_path / "missing.txt"))


def test_cache_key_changes_with_prompt_version_model_and_prompt():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    k = cache_key("v1", "m", msgs)
    assert k == cache_key("v1", "m", [dict(m) for m in msgs]) and len(k) == 64
    assert k != cache_key("v2", "m", msgs)
    assert k != cache_key("v1", "m2", msgs)
    assert k != cache_key("v1", "m", [msgs[0], {"role": "user", "content": "u2"}])


def test_cache_survives_concurrent_writers_and_corrupt_entries(tmp_path):
    cache = TeacherCache(tmp_path)
    key = cache_key("v1", "m", [{"role": "user", "content": "x"}])
    threads = [threading.Thread(target=lambda i=i: [cache.put(key, f"summary {i}") for _ in range(20)])
               for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert cache.get(key).startswith("summary ") and len(cache) == 1
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind
    (tmp_path / key[:2] / f"{key}.json").write_text("{truncated")
    assert cache.get(key) is None  # a corrupt entry is a miss, not a crash


# ---- chat-completions teacher against a real HTTP server ------------------------------------
@pytest.fixture(scope="module")
def server():
    with FakeLLM() as llm:
        yield llm


@pytest.fixture
def llm(server):
    server.mode, server.fail_times, server.retry_after, server.delay_s = "ok", 0, "1", 0.0
    server.fail_marker, server.slow_s = None, 5.0
    server.reset_counters()
    yield server
    server.release()


def _chat(llm: FakeLLM, tmp_path, **kw) -> ChatCompletionsTeacher:
    opts = dict(kind="openai", base_url=llm.base_url, model="fake-model", max_retries=3, backoff_s=0.01,
                timeout_s=5.0, max_concurrency=4, api_key_env="EMBSUM_TEST_LLM_KEY")
    opts.update(kw)
    return ChatCompletionsTeacher(TeacherConfig(**opts), TeacherCache(tmp_path / "cache"))


def describe(results: list[SummaryResult]) -> dict[str, int]:
    return {"users": len(results), "summarized": sum(r.ok for r in results),
            "cached_hits": sum(r.cached for r in results), "failed": sum(not r.ok for r in results),
            "requests": sum(r.requests for r in results)}


def _users(n: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    return [f"u{i}" for i in range(n)], [[{"text": f"story {i} part {j}"} for j in range(3)] for i in range(n)]


def test_chat_ok_speaks_the_protocol_with_bearer_auth(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSUM_TEST_LLM_KEY", "sk-test")
    t = _chat(llm, tmp_path, max_tokens=50, temperature=0.3)
    ids, hists = _users(3)
    res = t.summarize(ids, hists)
    assert [r.user_id for r in res] == ids and all(r.ok and r.summary for r in res)
    assert describe(res) == {"users": 3, "summarized": 3, "cached_hits": 0, "failed": 0, "requests": 3}
    body = llm.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 50 and body["temperature"] == 0.3
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert all(h.get("Authorization") == "Bearer sk-test" for h in llm.headers)
    assert t.name == "openai:fake-model"


def test_chat_without_key_sends_no_auth_header(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("EMBSUM_TEST_LLM_KEY", raising=False)
    _chat(llm, tmp_path).summarize(*_users(1))
    assert "Authorization" not in llm.headers[0]


def test_chat_retries_5xx_then_recovers(llm, tmp_path):
    llm.mode, llm.fail_times = "fail_then_ok", 2
    [r] = _chat(llm, tmp_path).summarize(*_users(1))
    assert r.ok and r.requests == 3 and llm.requests == 3


def test_chat_honours_retry_after_on_429(llm, tmp_path):
    llm.mode, llm.fail_times, llm.retry_after = "rate_limit", 1, "1"
    t0 = time.perf_counter()
    [r] = _chat(llm, tmp_path, backoff_s=0.01).summarize(*_users(1))
    assert r.ok and r.requests == 2
    assert time.perf_counter() - t0 >= 1.0  # waited what the server asked, not the 10 ms backoff


def test_chat_enforces_the_timeout(llm, tmp_path):
    llm.mode, llm.slow_s = "slow", 3.0
    t0 = time.perf_counter()
    [r] = _chat(llm, tmp_path, timeout_s=0.2, max_retries=1).summarize(*_users(1))
    assert not r.ok and "timeout after 0.2s" in r.error and r.requests == 2
    assert time.perf_counter() - t0 < 2.0


def test_chat_does_not_retry_400_and_reports_status_and_body(llm, tmp_path):
    llm.mode = "bad_request"
    [r] = _chat(llm, tmp_path).summarize(*_users(1))
    assert not r.ok and r.requests == 1 and llm.requests == 1
    assert "HTTP 400" in r.error and "context length exceeded" in r.error


def test_chat_always_500_gives_up_after_retries(llm, tmp_path):
    llm.mode = "always_500"
    [r] = _chat(llm, tmp_path, max_retries=2).summarize(*_users(1))
    assert not r.ok and r.requests == 3 and "gave up after 3 attempts: HTTP 500" in r.error


def test_chat_partial_failure_names_the_users_and_caches_only_successes(llm, tmp_path):
    llm.fail_marker = "POISON"
    ids, hists = _users(6)
    hists[1][0]["text"] = hists[4][2]["text"] = "POISON story"
    t = _chat(llm, tmp_path, max_retries=1)
    res = t.summarize(ids, hists)
    assert sorted(r.user_id for r in res if not r.ok) == ["u1", "u4"]
    assert all(r.summary == "" for r in res if not r.ok)  # no fake summary for a failed user
    llm.reset_counters()
    again = t.summarize(ids, hists)
    assert describe(again)["cached_hits"] == 4 and llm.requests == 4  # failures are retried, 2 x 2 attempts


def test_chat_respects_max_concurrency(llm, tmp_path):
    llm.delay_s = 0.1
    res = _chat(llm, tmp_path, max_concurrency=3).summarize(*_users(12))
    assert all(r.ok for r in res)
    assert 2 <= llm.max_in_flight <= 3


def test_chat_second_run_is_all_cache_hits_with_zero_requests(llm, tmp_path):
    ids, hists = _users(5)
    first = _chat(llm, tmp_path).summarize(ids, hists)
    assert llm.requests == 5
    llm.reset_counters()
    second = _chat(llm, tmp_path).summarize(ids, hists)  # a fresh teacher, same cache dir
    assert llm.requests == 0 and all(r.cached and r.requests == 0 for r in second)
    assert [r.summary for r in second] == [r.summary for r in first]
    _chat(llm, tmp_path, prompt_version="v2").summarize(ids, hists)
    assert llm.requests == 5  # a new prompt version is a new key


def test_make_teacher_dispatches_on_kind(tmp_path):
    cfg = config_from_dict({"workdir": str(tmp_path)})
    assert isinstance(make_teacher(cfg), OfflineTeacher)
    chat = make_teacher(config_from_dict({"workdir": str(tmp_path), "data": {"teacher": {"kind": "openai"}}}))
    assert isinstance(chat, ChatCompletionsTeacher)
    assert chat.cache.root == tmp_path.resolve() / "cache" / "teacher"
    with pytest.raises(ValueError, match="max_failure_fraction"):
        config_from_dict({"data": {"teacher": {"max_failure_fraction": 1.5}}})


def test_failure_verdict_of_the_summarize_job():
    from train.summarize import failure_verdict  # importing the job module starts no Ray

    assert failure_verdict(100, 5, 0.05) == ""
    assert "6 of 100 training examples (6.0%) failed" in failure_verdict(100, 6, 0.05)
    assert "max_failure_fraction=0.05" in failure_verdict(100, 6, 0.05)
    assert failure_verdict(3, 3, 1.0) == "every one of the 3 training examples failed"  # even at 1.0
    assert "no training examples" in failure_verdict(0, 0, 0.05)
