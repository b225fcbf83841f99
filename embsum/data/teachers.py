"""Teachers: who writes the user-interest summaries that supervise EmbSum's decoder.

The paper teacher-forces the T5 decoder on summaries written by a large LLM. Two teachers share one
small interface (``Teacher``), so the summarize job does not care which one runs:

- ``ChatCompletionsTeacher``: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, a
  hosted API). Concurrency-limited, timed out, retried with backoff, and cached on disk so that a
  rerun never pays twice. A user whose request still fails is reported, never given a fake summary.
- ``OfflineTeacher``: no LLM, deterministic; a one-sentence summary from the history's most
  frequent facets (categories, authors), entities and title terms. What CPU runs and tests use;
  its name goes into every summary row and from there into the run's MLflow params.

A teacher gets each user's history as item records (``items.parquet`` rows as str dicts, oldest
first) and looks at the most recent ``max_items`` of them.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol

import httpx

from embsum.config import Config, TeacherConfig
from embsum.data.teacher_cache import TeacherCache, cache_key

ItemRecord = Mapping[str, str]
OFFLINE_TEACHER_NAME = "offline-v1"  # bump when the offline summary's wording or rules change
MAX_BACKOFF_S = 60.0  # one backoff sleep never exceeds this, however many retries
MAX_RETRY_AFTER_S = 300.0  # a server's Retry-After is honoured up to this

SYSTEM_PROMPT = ("You write short, factual summaries of a person's interests from the items they "
                 "engaged with.")
DEFAULT_TEMPLATE = ("Here are the items a user engaged with, oldest first, one per line:\n\n{history}\n\n"
                    "In one or two sentences, summarize this user's interests: the topics, categories, "
                    "people and places they follow. Reply with the summary only.")


@dataclass(frozen=True)
class SummaryResult:
    """One user's outcome: a summary, or an error (never both, never a placeholder summary)."""

    user_id: str
    summary: str = ""
    error: str = ""
    cached: bool = False
    requests: int = 0  # HTTP requests spent on this user, retries included

    @property
    def ok(self) -> bool:
        return not self.error


class Teacher(Protocol):
    """What the summarize job needs from a teacher."""

    name: str  # stored in every summary row (e.g. 'offline-v1', 'openai:<model>')
    prompt_version: str
    columns: tuple[str, ...]  # items.parquet columns it reads (missing ones are ignored)

    def summarize(self, user_ids: Sequence[str],
                  histories: Sequence[Sequence[ItemRecord]]) -> list[SummaryResult]: ...

    def close(self) -> None: ...


# ---- items lookup ---------------------------------------------------------------------------
def load_item_records(path: str | Path, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """items.parquet (a file or a dataset directory) -> {item_id: {column: non-empty str value}}.

    Reads only ``columns`` that exist (catalogs differ: MIND has category, Book-Crossing has
    book_author). HTML entities are decoded (Book-Crossing writes 'Simon &amp; Schuster'): neither
    a summary nor a prompt should carry them. Everything is loaded into memory: fine for catalogs
    of up to a few million items.
    """
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(str(path), format="parquet")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"items catalog {str(path)!r} cannot be read (run the prepare stage first): {e}") from None
    names = set(dataset.schema.names)
    if "item_id" not in names:
        raise ValueError(f"items catalog {str(path)!r} has no item_id column (columns: {sorted(names)})")
    wanted = [c for c in dict.fromkeys(columns) if c in names and c != "item_id"]
    table = dataset.to_table(columns=["item_id", *wanted])
    ids = table.column("item_id").to_pylist()
    cols = {c: table.column(c).to_pylist() for c in wanted}
    out: dict[str, dict[str, str]] = {}
    for k, item_id in enumerate(ids):
        rec = {c: html.unescape(str(vals[k])).strip() for c, vals in cols.items()
               if vals[k] is not None and str(vals[k]).strip()}
        out[str(item_id)] = rec
    return out


# ---- offline teacher ------------------------------------------------------------------------
# A plain English stopword list plus news/book filler: no NLTK download on an offline machine.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my
myself no nor not now of off on once only or other our ours out over own same she should so some such
than that the their theirs them then there these they this those through to too under until up very was
we were what when where which while who whom why will with would you your yours new says say said get
gets got one two three first last year years day days week time make makes made may might must via vs
after amid per like back still way ways know need needs top best book books novel novels volume vol
edition reissue paperback hardcover series
""".split())
_WORD = re.compile(r"[a-z][a-z0-9'&-]*[a-z0-9]")


def _top(counts: Counter[str], k: int, last_seen: Mapping[str, int] | None = None) -> list[str]:
    """The k most frequent keys; ties go to the most recently seen (``last_seen``: key -> position
    in the history), then alphabetically, so the result is a pure function of the history."""
    seen = last_seen or {}
    return [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], -seen.get(kv[0], -1), kv[0]))[:k]]


def _tally(values: Sequence[Sequence[str]]) -> tuple[Counter[str], dict[str, int]]:
    """Per-item value lists (oldest first) -> (items each value occurs in, its last position)."""
    counts: Counter[str] = Counter()
    last: dict[str, int] = {}
    for pos, vals in enumerate(values):
        for v in dict.fromkeys(vals):  # once per item, not per mention
            counts[v] += 1
            last[v] = pos
    return counts, last


def _join_and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _entity_labels(raw: str) -> list[str]:
    """MIND entity column (JSON list of {'Label': ...}) -> labels; malformed JSON yields none."""
    try:
        ents = json.loads(raw)
    except (ValueError, TypeError):
        return []
    if not isinstance(ents, list):
        return []
    return [" ".join(str(e["Label"]).split()) for e in ents if isinstance(e, dict) and e.get("Label")]


class OfflineTeacher:
    """Deterministic summaries from facets, entities and title terms; needs no LLM."""

    def __init__(self, cfg: TeacherConfig, *, max_facets: int = 3, max_topics: int = 5) -> None:
        self.cfg = cfg
        self.name = OFFLINE_TEACHER_NAME
        self.prompt_version = cfg.prompt_version
        self.max_facets = max_facets
        self.max_topics = max_topics
        self.columns = tuple(dict.fromkeys(["item_id", "text", *cfg.facet_fields, *cfg.title_fields,
                                            *cfg.entity_fields]))

    def summarize(self, user_ids: Sequence[str],
                  histories: Sequence[Sequence[ItemRecord]]) -> list[SummaryResult]:
        out = []
        for uid, hist in zip(user_ids, histories, strict=True):
            text = self.summary_text(hist)
            out.append(SummaryResult(uid, summary=text) if text else
                       SummaryResult(uid, error=f"offline teacher: no facets, entities or title terms in the "
                                                f"user's {len(hist)} known items"))
        return out

    def summary_text(self, history: Sequence[ItemRecord]) -> str:
        """E.g. 'The user reads mostly sports (nfl, soccer) and finance; recurring topics: Tom Brady,
        stocks.' ('' when the history holds nothing to summarize)."""
        recs = list(history)[-self.cfg.max_items:]
        facet = self._facets(recs)
        topics = self._topics(recs, set(re.findall(r"[\w'&-]+", facet.lower())))
        if facet and topics:
            return f"The user reads mostly {facet}; recurring topics: {', '.join(topics)}."
        if facet:
            return f"The user reads mostly {facet}."
        if topics:
            return f"The user reads about {_join_and(topics)}."
        return ""

    def _facets(self, recs: Sequence[ItemRecord]) -> str:
        """Top values of the first facet field present, each with the top values of the next one
        among its items (MIND: category (subcategories); Book-Crossing: author (publishers))."""
        fields = [f for f in self.cfg.facet_fields if any(r.get(f) for r in recs)]
        if not fields:
            return ""
        primary, secondary = fields[0], (fields[1] if len(fields) > 1 else None)
        parts = []
        counts, last = _tally([[r[primary]] if r.get(primary) else [] for r in recs])
        for value in _top(counts, self.max_facets, last):
            detail = ""
            if secondary:
                sub, sub_last = _tally([[r[secondary]] if r.get(primary) == value and r.get(secondary) else []
                                        for r in recs])
                subs = [s for s in _top(sub, 3, sub_last) if s.lower() != value.lower()][:2]
                detail = f" ({', '.join(subs)})" if subs else ""
            parts.append(value + detail)
        return _join_and(parts)

    def _topics(self, recs: Sequence[ItemRecord], exclude: set[str]) -> list[str]:
        """Most frequent entities first (named things say a lot even once), then title terms that
        recur (in at least two items once the history has three: a single word once is noise)."""
        ents, ents_last = _tally([[lb for f in self.cfg.entity_fields if r.get(f) for lb in _entity_labels(r[f])]
                                  for r in recs])
        topics = _top(ents, min(3, self.max_topics), ents_last)
        said = exclude | {w for t in topics for w in t.lower().split()}
        words = []
        for r in recs:
            titles = [r[f] for f in self.cfg.title_fields if r.get(f)] or [r.get("text", "")]
            words.append([w for t in titles for w in _WORD.findall(t.lower())
                          if len(w) >= 3 and w not in STOPWORDS and w not in said])
        counts, last = _tally(words)
        min_count = 2 if len(recs) >= 3 else 1
        recurring = Counter({w: c for w, c in counts.items() if c >= min_count})
        return topics + _top(recurring, self.max_topics - len(topics), last)

    def close(self) -> None:
        pass


# ---- chat-completions teacher ---------------------------------------------------------------
def load_prompt_template(path: str) -> str:
    """The template text: the built-in one for '', else the file, which must contain {history}."""
    if not path:
        return DEFAULT_TEMPLATE
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data.teacher.prompt_template: file {str(p)!r} not found")
    text = p.read_text(encoding="utf-8")
    if "{history}" not in text:
        raise ValueError(f"data.teacher.prompt_template: {str(p)!r} has no {{history}} placeholder")
    return text


def render_prompt(template: str, history: Sequence[ItemRecord], max_items: int) -> str:
    """Substitute {history}: the most recent ``max_items`` items' text, oldest first, one per line.

    ``str.replace``, not ``str.format``: templates may contain other braces (JSON examples).
    """
    lines = [" ".join(r.get("text", "").split()) for r in list(history)[-max_items:]]
    return template.replace("{history}", "\n".join(x for x in lines if x))


class _GiveUp(Exception):
    """A request that must not be retried (4xx other than 429, malformed 200)."""


class ChatCompletionsTeacher:
    """POST {base_url}/chat/completions per user, at most ``max_concurrency`` in flight."""

    columns: tuple[str, ...] = ("item_id", "text")

    def __init__(self, cfg: TeacherConfig, cache: TeacherCache | None, template: str = DEFAULT_TEMPLATE) -> None:
        if "{history}" not in template:
            raise ValueError("chat teacher: the prompt template has no {history} placeholder")
        self.cfg = cfg
        self.cache = cache
        self.template = template
        self.name = f"openai:{cfg.model}"
        self.prompt_version = cfg.prompt_version
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._rng = random.Random()  # jitter must differ between workers, so unseeded

    def messages(self, history: Sequence[ItemRecord]) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": render_prompt(self.template, history, self.cfg.max_items)}]

    def summarize(self, user_ids: Sequence[str],
                  histories: Sequence[Sequence[ItemRecord]]) -> list[SummaryResult]:
        """Blocking wrapper (Ray Data calls a sync ``__call__``); one event loop per batch."""
        return asyncio.run(self.asummarize(user_ids, histories))

    async def asummarize(self, user_ids: Sequence[str],
                         histories: Sequence[Sequence[ItemRecord]]) -> list[SummaryResult]:
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency,
                              max_keepalive_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits,
                                     headers=self._headers) as client:
            return list(await asyncio.gather(*(self._one(client, sem, uid, hist)
                                               for uid, hist in zip(user_ids, histories, strict=True))))

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, user_id: str,
                   history: Sequence[ItemRecord]) -> SummaryResult:
        msgs = self.messages(history)
        if not msgs[1]["content"].strip() or not any(r.get("text") for r in history):
            return SummaryResult(user_id, error="chat teacher: the user's history has no item text")
        key = cache_key(self.prompt_version, self.cfg.model, msgs)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return SummaryResult(user_id, summary=hit, cached=True)
        summary, attempts, error = await self._request(client, sem, msgs)
        if error:
            return SummaryResult(user_id, error=error, requests=attempts)
        if self.cache is not None:
            self.cache.put(key, summary, {"model": self.cfg.model, "prompt_version": self.prompt_version})
        return SummaryResult(user_id, summary=summary, requests=attempts)

    async def _request(self, client: httpx.AsyncClient, sem: asyncio.Semaphore,
                       msgs: list[dict[str, str]]) -> tuple[str, int, str]:
        """(summary, attempts, error): retries timeouts, transport errors, 429 and 5xx."""
        body = {"model": self.cfg.model, "messages": msgs, "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature}
        attempts, last = 0, ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after: float | None = None
            attempts += 1
            try:
                async with sem:  # held only while a request is in flight, never while backing off
                    # wait_for bounds the whole exchange; httpx's timeout alone is per read/write.
                    resp = await asyncio.wait_for(client.post(self.url, json=body), self.cfg.timeout_s)
                if resp.status_code == 200:
                    return self._parse(resp), attempts, ""
                if resp.status_code != 429 and resp.status_code < 500:
                    raise _GiveUp(f"HTTP {resp.status_code} from {self.url} (not retried): {resp.text[:200]!r}")
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
            except _GiveUp as e:
                return "", attempts, str(e)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                last = f"timeout after {self.cfg.timeout_s:g}s"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:  # decoding errors, redirects: retrying will not help
                return "", attempts, f"{type(e).__name__}: {e}"
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return "", attempts, f"gave up after {attempts} attempts: {last}"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best; a little jitter avoids a herd
            return retry_after * (1.0 + 0.1 * self._rng.random())
        d = min(self.cfg.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
        return d / 2 + self._rng.uniform(0, d / 2)  # "equal jitter": at least half the backoff

    def _parse(self, resp: httpx.Response) -> str:
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _GiveUp(f"malformed chat-completions response (HTTP 200): {resp.text[:200]!r}") from None
        if not isinstance(content, str) or not content.strip():
            raise _GiveUp(f"empty completion from {self.url}: {resp.text[:200]!r}")
        return " ".join(content.split())

    def close(self) -> None:
        pass  # the HTTP client lives for one batch (see summarize)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent/unparsable."""
    if not value:
        return None
    try:
        s = float(value)
    except ValueError:
        try:
            import datetime as dt

            s = (parsedate_to_datetime(value) - dt.datetime.now(dt.timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(s, 0.0), MAX_RETRY_AFTER_S)


# ---- factory --------------------------------------------------------------------------------
def resolve_cache_dir(cfg: Config) -> Path:
    """data.teacher.cache_dir, or WORKDIR/cache/teacher; absolute (Ray workers' cwd differs)."""
    t = cfg.data.teacher
    return Path(t.cache_dir).expanduser().resolve() if t.cache_dir else cfg.workdir_path / "cache" / "teacher"


def make_teacher(cfg: Config, *, template: str | None = None, cache_dir: str | Path | None = None) -> Teacher:
    """The teacher ``cfg.data.teacher.kind`` names. ``template``/``cache_dir`` override what the
    config says (the summarize job resolves them on the driver and ships them to its workers)."""
    t = cfg.data.teacher
    if t.kind == "offline":
        return OfflineTeacher(t)
    if t.kind == "openai":
        text = template if template is not None else load_prompt_template(t.prompt_template)
        return ChatCompletionsTeacher(t, TeacherCache(cache_dir or resolve_cache_dir(cfg)), template=text)
    raise ValueError(f"data.teacher.kind: {t.kind!r} is not allowed; choose one of ['offline', 'openai']")
