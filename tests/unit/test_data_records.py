"""Validation and quarantine: every malformed row gets the right reason and line; good rows
survive their bad neighbours; whole-file problems fail at once naming the file (no Ray)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embsum.config import DataConfig
from embsum.data import records as R
from embsum.data.catalog import build_catalog
from embsum.data.sources import EXPLODED_SCHEMA, explode_file, read_row_groups, resolve, split_row_groups

KNOWN = {"i1", "i2", "i3", "N1", "N2", "N3"}


def _lines(path, fmt: str, headed: bool) -> pa.Table:
    s, n, r = explode_file(str(path), path.read_bytes(), fmt, headed)
    return pa.table({"source": s, "line": pa.array(n, pa.int64()), "raw": pa.array(r, pa.binary())},
                    schema=EXPLODED_SCHEMA)


def _by_line(table: pa.Table) -> dict[int, str]:
    return dict(zip(table.column("line").to_pylist(), table.column("reason").to_pylist(), strict=True))


LOG_SPEC = DataConfig(user_col="user", item_col="item", timestamp_col="ts", label_col="rating",
                      positive_threshold=4, ignore_labels=[0], impression_col="imp")


def test_csv_log_every_bad_row_is_quarantined_with_reason_and_line(tmp_path):
    p = tmp_path / "log.csv"
    rows = [
        b"user,item,ts,rating,imp",                       # 1 header
        b"u1,i1,2024-01-01T10:00:00,5,m1",                # 2 good, positive
        b"u1,i2,2024-01-01T10:00:00,1,m1",                # 3 good, negative
        b"u1,i1,2024-01-01T10:00:00,5",                   # 4 wrong column count
        b"u\xff\xfe1,i1,2024-01-01T10:00:00,5,m2",        # 5 bad encoding
        b" ,i1,2024-01-01T10:00:00,5,m2",                 # 6 empty user id
        b"u2,,2024-01-01T10:00:00,5,m2",                  # 7 empty item id
        b"u2,i1,2024-01-01T10:00:00,great,m2",            # 8 bad label
        b"u2,i1,yesterday,5,m2",                          # 9 bad timestamp
        b"u2,zz,2024-01-01T10:00:00,5,m2",                # 10 item not in catalog
        b"u2,i3,2024-01-01T10:00:00,0,m2",                # 11 good, ignored label (kept, counted)
        b"u2,i1,2024-01-01T10:00:00,5,",                  # 12 empty impression id
        b'"u3","i2","1704103200",4,m3',                   # 13 good: quoted, epoch seconds
        b"u2,i2,2024-01-01T10:00:00,nan,m2",              # 14 bad label (not finite)
    ]
    p.write_bytes(b"\n".join(rows) + b"\n")
    spec = R.LogSpec.from_config(LOG_SPEC, "csv")
    headers = R.preflight(resolve(str(p), "data.interactions"), "csv", spec.required, "data.interactions")
    out = R.parse_logs(_lines(p, "csv", True), spec, headers, KNOWN)
    assert _by_line(out) == {2: "", 3: "", 4: R.WRONG_COLUMNS, 5: R.BAD_ENCODING, 6: R.EMPTY_USER, 7: R.EMPTY_ITEM,
                             8: R.BAD_LABEL, 9: R.BAD_TIMESTAMP, 10: R.NOT_IN_CATALOG, 11: "", 12: R.EMPTY_IMPRESSION,
                             13: "", 14: R.BAD_LABEL}
    good = out.filter(pc.equal(out.column("reason"), ""))
    assert good.column("labels").to_pylist() == [[1], [0], [R.IGNORED], [1]]
    assert good.column("user_id").to_pylist() == ["u1", "u1", "u2", "u3"]
    assert good.column("ts").to_pylist()[3] == 1704103200.0
    bad = out.filter(pc.not_equal(out.column("reason"), ""))
    assert all(bad.column("raw").to_pylist()) and "\\xff" in bad.column("raw").to_pylist()[1]  # raw kept, escaped
    assert sum(good.column("n_ignored").to_pylist()) == 1


def test_jsonl_and_tsv_logs(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join([json.dumps({"user": "u1", "item": "i1", "ts": "2024-01-01", "rating": 5, "imp": "m"}),
                            "{not json",
                            json.dumps([1, 2]),
                            json.dumps({"user": "u1", "ts": 1, "rating": 5, "imp": "m"}),
                            json.dumps({"user": 7, "item": "i2", "ts": 1.5, "rating": "4", "imp": 3})]) + "\n")
    spec = R.LogSpec.from_config(LOG_SPEC, "jsonl")
    out = R.parse_logs(_lines(p, "jsonl", False), spec, {}, KNOWN)
    assert _by_line(out) == {1: "", 2: R.BAD_JSON, 3: R.BAD_JSON, 4: R.MISSING_FIELD, 5: ""}
    assert out.column("user_id").to_pylist()[4] == "7" and out.column("impression_id").to_pylist()[4] == "3"
    t = tmp_path / "log.tsv"
    t.write_text("user\titem\nu1\ti1\nu2\ti2\textra\n")
    spec = R.LogSpec.from_config(DataConfig(user_col="user", item_col="item"), "tsv")
    headers = R.preflight(resolve(str(t), "x"), "tsv", spec.required, "data.interactions")
    out = R.parse_logs(_lines(t, "tsv", True), spec, headers, KNOWN)
    assert _by_line(out) == {2: "", 3: R.WRONG_COLUMNS}
    assert out.column("labels").to_pylist()[0] == [1]  # no label column: every row is a positive


def test_parquet_log_rows_are_numbered_and_typed(tmp_path):
    import datetime as dt

    when = [dt.datetime(2024, 1, 1, 10), None, dt.datetime(2024, 1, 2, 9)]
    pq.write_table(pa.table({"user": ["u1", "u2", None], "item": ["i1", "i2", "i3"], "ts": when,
                             "rating": [5.0, 3.0, 4.0], "imp": [1, 2, 3]}), tmp_path / "log.parquet")
    spec = R.LogSpec.from_config(LOG_SPEC, "parquet")
    R.preflight(resolve(str(tmp_path / "log.parquet"), "x"), "parquet", spec.required, "data.interactions")
    src = resolve(str(tmp_path / "log.parquet"), "x")
    rows = pa.concat_tables(read_row_groups(src.filesystem, g, list(spec.required))
                            for g in split_row_groups(src, 10))
    out = R.parse_logs(rows, spec, {}, KNOWN, keep_raw=True)
    assert _by_line(out) == {1: "", 2: R.BAD_TIMESTAMP, 3: R.EMPTY_USER}
    assert out.column("ts").to_pylist()[0] == dt.datetime(2024, 1, 1, 10, tzinfo=dt.timezone.utc).timestamp()
    assert out.column("impression_id").to_pylist()[0] == "1" and out.column("labels").to_pylist()[0] == [1]
    # A quarantined (or kept) parquet row's text is the row as JSON: what a person can search for.
    assert json.loads(out.column("raw").to_pylist()[1]) == {"user": "u2", "item": "i2", "ts": None, "rating": 3.0,
                                                            "imp": 2}
    # The same rows as JSON lines give the same records: one parser, two ways in.
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("".join(json.dumps(r, default=str) + "\n" for r in pq.read_table(tmp_path / "log.parquet")
                             .to_pylist()))
    as_json = R.parse_logs(_lines(jsonl, "jsonl", False), R.LogSpec.from_config(LOG_SPEC, "jsonl"), {}, KNOWN,
                           keep_raw=True)
    cols = ["line", "reason", "user_id", "impression_id", "ts", "items", "labels"]
    assert out.select(cols).equals(as_json.select(cols))


def test_mind_behaviors_rows(tmp_path):
    p = tmp_path / "behaviors.tsv"
    lines = [
        "1\tU1\t11/12/2019 2:14:46 PM\tN1 N2 N9\tN3-1 N1-0 N8-0",     # good; N9, N8 unknown: dropped, counted
        "2\tU1\t11/12/2019 2:14:46 PM\tN1",                          # wrong column count
        "3\tU2\t13/45/2019 2:14:46 PM\tN1\tN2-1",                    # bad timestamp
        "4\tU2\t11/12/2019 2:14:46 PM\tN1\tN2-2",                    # bad label
        "5\tU2\t11/12/2019 2:14:46 PM\tN1\tN2",                      # bad label (no -0/-1)
        "6\tU2\t11/12/2019 2:14:46 PM\tN1\t-1",                      # empty item id
        "7\t \t11/12/2019 2:14:46 PM\tN1\tN2-1",                     # empty user id
        " \tU2\t11/12/2019 2:14:46 PM\tN1\tN2-1",                    # empty impression id
        "9\tU2\t11/12/2019 2:14:46 PM\tN1\t",                        # no candidates
        "10\tU3\t11/12/2019 2:14:46 PM\tN7 N8\tN9-1 N8-0",           # nothing known: item not in catalog
        "11\tU4\t11/13/2019 8:00:00 AM\t\tN1-1 N2-0",                # good, empty history
    ]
    p.write_text("\n".join(lines) + "\n")
    out = R.parse_behaviors(_lines(p, "tsv", False), KNOWN)
    assert _by_line(out) == {1: "", 2: R.WRONG_COLUMNS, 3: R.BAD_TIMESTAMP, 4: R.BAD_LABEL, 5: R.BAD_LABEL,
                             6: R.EMPTY_ITEM, 7: R.EMPTY_USER, 8: R.EMPTY_IMPRESSION, 9: R.NO_CANDIDATES,
                             10: R.NOT_IN_CATALOG, 11: ""}
    first = out.slice(0, 1).to_pylist()[0]
    assert first["history"] == ["N1", "N2"] and first["items"] == ["N3", "N1"] and first["labels"] == [1, 0]
    assert (first["n_candidates"], first["n_clicks"], first["n_missing_candidates"]) == (3, 1, 1)
    assert (first["n_history"], first["n_missing_history"]) == (3, 1)
    assert out.slice(9, 1).to_pylist()[0]["n_candidates"] == 2  # whole-row drops still count what was read
    assert out.column("ts").to_pylist()[10] > out.column("ts").to_pylist()[0]


@pytest.mark.parametrize("value, expected", [
    ("11/12/2019 2:14:46 PM", 1573568086.0), ("2019-11-12T14:14:46", 1573568086.0),
    ("2019-11-12T14:14:46Z", 1573568086.0), ("2019-11-12T15:14:46+01:00", 1573568086.0), ("1573568086", 1573568086.0),
    (1573568086, 1573568086.0), ("", None), ("soon", None), ("inf", None), (None, None), (True, None)])
def test_parse_time(value, expected):
    assert R.parse_time(value) == expected


def test_preflight_wrong_delimiter_fails_at_once_naming_the_file(tmp_path):
    p = tmp_path / "ratings.tsv"
    p.write_text("user_id;isbn;book_rating\n1;a;5\n2;b;7\n")
    spec = R.LogSpec.from_config(DataConfig(user_col="user_id", item_col="isbn", label_col="book_rating"), "tsv")
    with pytest.raises(ValueError, match=r"ratings\.tsv.*missing required column.*'user_id', 'isbn', 'book_rating'"):
        R.preflight(resolve(str(p), "x"), "tsv", spec.required, "data.interactions")
    q = tmp_path / "ok_header.csv"  # right header, data lines in another delimiter
    q.write_text("user_id,isbn,book_rating\n1;a;5\n2;b;7\n")
    with pytest.raises(ValueError, match=r"ok_header\.csv.*every line has 1 column.*comma"):
        R.preflight(resolve(str(q), "x"), "csv", spec.required, "data.interactions")


def test_preflight_headerless_mind_and_jsonl_and_parquet(tmp_path):
    b = tmp_path / "behaviors.tsv"
    b.write_text("1,U1,11/12/2019 2:14:46 PM,N1,N2-1\n")
    with pytest.raises(ValueError, match=r"behaviors\.tsv.*expected 5 tab-separated columns"):
        R.preflight(resolve(str(b), "x"), "mind", (), "data.interactions", R.MIND_BEHAVIOR_COLUMNS)
    j = tmp_path / "log.jsonl"
    j.write_text('{"uid": "u1", "item": "i1"}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl.*missing required field.*\['user'\]"):
        R.preflight(resolve(str(j), "x"), "jsonl", ("user", "item"), "data.interactions")
    j.write_text("user,item\nu1,i1\n")
    with pytest.raises(ValueError, match="expected JSON lines"):
        R.preflight(resolve(str(j), "x"), "jsonl", ("user", "item"), "data.interactions")
    pq.write_table(pa.table({"user": ["u"]}), tmp_path / "log.parquet")
    with pytest.raises(ValueError, match=r"log\.parquet.*missing required column.*\['item'\]"):
        R.preflight(resolve(str(tmp_path / "log.parquet"), "x"), "parquet", ("user", "item"), "data.interactions")
    ok = tmp_path / "ok.csv"
    ok.write_text("\ufeffuser, item\nu1,i1\n")
    assert R.preflight(resolve(str(ok), "x"), "csv", ("user", "item"), "d") == {str(ok): ["user", "item"]}


def test_catalog_parse_dedupe_and_items_table(tmp_path, tokenizer):
    p = tmp_path / "news.tsv"
    p.write_text("\n".join([
        "N1\tsports\tnfl\tBrady wins\tA long game.\thttp://x\t[]\t[]",
        "N2\tfinance\tmarkets\tStocks fall\t\thttp://y\t[]\t[]",
        "N1\tsports\tnfl\tDuplicate text\t\thttp://z\t[]\t[]",
        "N3\tbroken",
        "\tnews\tx\tNo id\t\t\t[]\t[]",
    ]) + "\n")
    spec = R.CatalogSpec.from_config(DataConfig(), "mind")
    cat = build_catalog(R.parse_catalog(_lines(p, "tsv", False), spec, {}, tokenizer), tokenizer)
    assert cat.index.ids == ["N1", "N2"] and cat.rows_in == 5
    assert Counter(cat.quarantine.column("reason").to_pylist()) == {R.DUPLICATE_ITEM: 1, R.WRONG_COLUMNS: 1,
                                                                    R.EMPTY_ITEM: 1}
    assert dict(zip(cat.quarantine.column("reason").to_pylist(), cat.quarantine.column("line").to_pylist(),
                    strict=True))[R.DUPLICATE_ITEM] == 3
    items = cat.items.to_pylist()
    assert items[0]["text"] == "Brady wins | sports | A long game." and items[1]["text"] == "Stocks fall | finance"
    assert items[0]["category"] == "sports" and items[0]["news_id"] == "N1"
    assert items[0]["token_ids"] == tokenizer.encode_texts([items[0]["text"]])[0]
    assert cat.index.content.shape == (2, tokenizer.cfg.content_tokens)
    assert (cat.index.content[0] == tokenizer.content(cat.index.tokens[0])).all()


def test_generic_catalog_reserved_column_names(tmp_path, tokenizer):
    p = tmp_path / "books.csv"
    p.write_text('isbn,book_title,text\n0001,"Dune, the novel",blurb\n')
    spec = R.CatalogSpec.from_config(DataConfig(item_id_col="isbn", item_text_fields=["book_title", "text"]), "csv")
    headers = R.preflight(resolve(str(p), "x"), "csv", spec.required, "data.items")
    cat = build_catalog(R.parse_catalog(_lines(p, "csv", True), spec, headers, tokenizer), tokenizer)
    row = cat.items.to_pylist()[0]
    assert row["item_id"] == "0001" and row["text"] == "Dune, the novel | blurb" and row["raw_text"] == "blurb"
    with pytest.raises(ValueError, match=r"books\.csv.*missing required column.*\['title'\]"):
        R.preflight(resolve(str(p), "x"), "csv", ("isbn", "title"), "data.items")


def test_raw_fields_are_strings_as_written_whatever_they_look_like():
    import json

    import pyarrow as pa

    from embsum.data.catalog import _raw_fields

    rows = [{"id": "1", "year": "2019-01-01", "n": "007", "t": 'a "quoted"\ttab\nline ünï'},
            {"id": "2", "year": "", "n": "1e5", "t": "null"},
            {"isbn": "0-1", "title": "other file"}]  # a second source with its own header
    fields = pa.chunked_array([[json.dumps(r) for r in rows]])
    got = _raw_fields(fields, pa.chunked_array([["a.tsv", "a.tsv", "b.csv"]]))
    names = ["id", "year", "n", "t", "isbn", "title"]
    assert list(got) == names
    assert {n: got[n].to_pylist() for n in names} == {n: [r.get(n, "") for r in rows] for n in names}
    odd = pa.chunked_array([[json.dumps({"id": "1"}), json.dumps({"id": "2", "extra": "x"})]])  # 1 source, 2 key sets
    assert _raw_fields(odd, pa.chunked_array([["a", "a"]]))["extra"].to_pylist() == ["", "x"]
