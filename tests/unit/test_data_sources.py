"""Input files: resolution, formats, numbered lines, fingerprints (no Ray)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embsum.data.sources import (
    detect_format,
    explode_file,
    fingerprint,
    iter_lines,
    read_row_groups,
    resolve,
    split_row_groups,
)


def test_resolve_file_directory_glob_and_file_uri(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.csv", "d/sub/b.csv", "d/.hidden.csv", "d/_SUCCESS", "d/c.tsv"):
        (tmp_path / name).write_text("x\n")
    assert [f.path for f in resolve(str(tmp_path / "d" / "a.csv"), "data.items").files] == [str(tmp_path / "d/a.csv")]
    found = [os.path.relpath(f.path, tmp_path) for f in resolve(str(tmp_path / "d"), "data.items").files]
    assert found == ["d/a.csv", "d/c.tsv", "d/sub/b.csv"]  # sorted; hidden and _-prefixed skipped
    glob = [os.path.relpath(f.path, tmp_path) for f in resolve(str(tmp_path / "d" / "*.csv"), "x").files]
    assert glob == ["d/a.csv"]
    uri = resolve("file://" + str(tmp_path / "d" / "a.csv"), "x")
    assert uri.files[0].path == str(tmp_path / "d/a.csv") and uri.files[0].size == 2


def test_resolve_relative_path_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "r.tsv").write_text("a\n")
    monkeypatch.chdir(tmp_path)
    assert resolve("r.tsv", "x").files[0].path == str(tmp_path / "r.tsv")  # workers run elsewhere


@pytest.mark.parametrize("uri, msg", [("", "data.interactions is empty"),
                                      ("/nonexistent/x.csv", "no such file"),
                                      ("/nonexistent/*.csv", "matched no files")])
def test_resolve_errors_name_the_field(uri, msg):
    with pytest.raises(ValueError, match=msg) as e:
        resolve(uri, "data.interactions")
    assert "data.interactions" in str(e.value)


def test_detect_format(tmp_path):
    for name in ("a.csv", "b.jsonl", "c.tsv", "d.bin"):
        (tmp_path / name).write_text("")
    assert detect_format("auto", resolve(str(tmp_path / "a.csv"), "f"), "data.items") == "csv"
    assert detect_format("auto", resolve(str(tmp_path / "b.jsonl"), "f"), "data.items") == "jsonl"
    assert detect_format("parquet", resolve(str(tmp_path / "d.bin"), "f"), "data.items") == "parquet"
    with pytest.raises(ValueError, match="cannot tell the format.*data.items_format"):
        detect_format("auto", resolve(str(tmp_path / "d.bin"), "f"), "data.items")
    with pytest.raises(ValueError, match="several formats"):
        detect_format("auto", resolve(str(tmp_path / "[ab].*"), "f"), "data.items")


def test_iter_lines_numbers_every_physical_line():
    data = b"\xef\xbb\xbfh1\r\nrow2\n\n   \nrow5\r\nrow6"
    assert list(iter_lines(data)) == [(1, b"h1"), (2, b"row2"), (5, b"row5"), (6, b"row6")]


def test_explode_headed_skips_header_but_keeps_numbers():
    src, lines, raws = explode_file("f.csv", b"\nuser,item\nu1,i1\n\nu2,i2\n", "csv", headed=True)
    assert lines == [3, 5] and raws == [b"u1,i1", b"u2,i2"] and src == ["f.csv", "f.csv"]


def test_parquet_row_groups_are_cut_from_footers_and_rows_numbered_per_file(tmp_path):
    # Two files, row groups of 3 rows: runs of whole row groups, numbered as rows of their file.
    pq.write_table(pa.table({"user": [f"u{k}" for k in range(7)], "item": list(range(7)), "x": [1.5] * 7}),
                   tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"user": ["v0", "v1"], "item": [9, 8], "x": [0.0, 1.0]}), tmp_path / "b.parquet")
    src = resolve(str(tmp_path), "data.interactions")
    groups = split_row_groups(src, 4)
    assert [(g.uri.rsplit("/", 1)[-1], g.first, g.stop, g.first_row, g.rows) for g in groups] == \
        [("a.parquet", 0, 2, 1, 6), ("a.parquet", 2, 3, 7, 1), ("b.parquet", 0, 1, 1, 2)]
    rows = [read_row_groups(src.filesystem, g, ["user", "item"]) for g in groups]
    assert [t.column("line").to_pylist() for t in rows] == [[1, 2, 3, 4, 5, 6], [7], [1, 2]]
    assert rows[1].column("record").to_pylist() == [{"user": "u6", "item": 6}]  # only the asked-for columns
    assert rows[2].column("source").to_pylist() == [str(tmp_path / "b.parquet")] * 2
    with pytest.raises(ValueError, match="read parquet with read_row_groups"):
        explode_file("x.parquet", b"", "parquet", headed=False)


def test_fingerprint_tracks_files_and_config(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("u,i\n")
    fp1 = fingerprint([resolve(str(p), "data.items")], {"seed": 0})
    assert fp1 == fingerprint([resolve(str(p), "data.items")], {"seed": 0})
    assert fp1 != fingerprint([resolve(str(p), "data.items")], {"seed": 1})
    p.write_text("u,i\nx,y\n")
    assert fp1 != fingerprint([resolve(str(p), "data.items")], {"seed": 0})
