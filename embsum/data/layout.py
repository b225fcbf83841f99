"""Where the data stages write, and the columns they write: the contract between stages.

All paths are under ``Config.data_dir`` (WORKDIR/data). Tensor columns are fixed-shape int32
(Ray Data tensor columns), so the trainer streams them with ``iter_torch_batches`` unchanged.

items.parquet          one row per catalog item
    item_id: str, text: str (formatted by data.item_text_fields), token_ids: list<int32> (tokenized
    once, no markers, capped), plus every raw catalog column as str (for the offline teacher).
users/, train/, valid_examples/, valid/, test/ are written partition by partition: each prepare
partition (a set of whole users) writes ``part-<key>.parquet`` into each of them, so a user's
rows sit in files of the same name in every folder.

users/                 one row per user with at least one engagement (parquet dataset)
    user_id: str, split: str ('train'|'valid'|'test'), history: list<str> (item ids, oldest first,
    the user's full known positive history = what precompute and serving use),
    session_ids: (G, L) int32 (the tokenized sessions of that history).
train/                 training examples (parquet dataset): T = data.targets_per_example positives
    sharing one history, each followed by its K negatives
    example_id: str, user_id: str, impression_id: str, session_ids: (G, L) int32, history: list<str>
    (the item ids session_ids encodes), candidate_ids: (T*C, Lc) int32 (blocks of [positive,
    K negatives]), candidate_item_ids: list<str> (T*C), labels: list<int8> (T*C: 1 positive,
    0 negative, -1 padding of an example short of T)
valid_examples/        the same format with T = 1, from valid users (in-loop validation AUC)
valid/, test/          evaluation impressions (parquet datasets)
    impression_id: str, user_id: str, session_ids: (G, L) int32, history: list<str>,
    candidate_item_ids: list<str>, labels: list<int8>
quarantine/            malformed input rows (parquet dataset)
    source: str (file), line: int64 (1-based, header = line 1), reason: str, raw: str
summaries/             one teacher summary per training example: of its own history (parquet dataset,
    hive-partitioned: part=<train file stem>/*.parquet holds the summaries of the examples in
    train/<stem>.parquet; train/summaries.py joins them file by file)
    example_id: str, user_id: str, summary: str, teacher: str, prompt_version: str, summary_ids: (S,) int32
summaries_failed/      training examples the teacher could not summarize (parquet dataset; may be empty)
    example_id: str, user_id: str, error: str (why, e.g. 'gave up after 5 attempts: HTTP 503 ...')
summarize_report.json  examples_in, summarized, cached_hits, failed, requests, teacher, prompt_version,
    seconds, status ('ok'|'failed'), first_errors
prepare_report.json    counts: rows in/out, quarantined by reason, examples per split, fingerprint
"""

from __future__ import annotations

from pathlib import Path

ITEMS = "items.parquet"
USERS = "users"
TRAIN = "train"
VALID_EXAMPLES = "valid_examples"
VALID = "valid"
TEST = "test"
QUARANTINE = "quarantine"
SUMMARIES = "summaries"
REPORT = "prepare_report.json"
SUMMARY_REPORT = "summarize_report.json"
SUMMARY_FAILURES = "summaries_failed"
PART_COLUMN = "part"  # summaries/ partition column: the train/ file stem the example came from


def path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / name
