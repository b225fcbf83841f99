"""Input files: where they are, what format they hold, and their lines with 1-based numbers.

Paths may be local (relative to the current directory), ``file://``, or any URI pyarrow's
filesystems understand (``s3://``, ``gs://``, ``hdfs://``); other fsspec protocols are wrapped
with pyarrow's ``FSSpecHandler``. A path may name a file, a directory (every file below it,
hidden and ``_``-prefixed ones skipped) or a glob in its last component (``logs/part-*.csv``).

The file list is resolved once, on the driver, and handed to Ray Data as an explicit list: the
fingerprint, the preflight checks and the job then agree on exactly which files were read.

Line numbers are the reason this module exists: Ray Data's text readers do not keep them, and a
malformed line must be quarantined with its file and line. Text files are cut into line-aligned
byte ranges (``split_lines``, on the driver: one sequential read of each file that only counts
newlines, at memchr speed, in constant memory) so that each range knows the number of its first
line; a read task then reads just its range (``read_chunk``) and turns it into rows of (source,
line, raw bytes). One big file is so parsed by many tasks, and nothing but the ranges' bounds
crosses the object store before parsing. Decoding happens later, per line, so a bad byte sequence
costs one quarantined row, not the file.

Parquet has rows, not lines: it is read natively, as Arrow columns (``read_row_groups``, only the
columns asked for), in ranges of row groups cut from the files' footers (``split_row_groups``);
a row's number in its file (1-based) stands for its line, and its values travel as one struct
column ``record`` to the parsers (no text round trip).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".jsonl": "jsonl",
               ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
HEAD_BYTES = 1 << 16  # preflight reads this much of each file
BOM = b"\xef\xbb\xbf"

EXPLODED_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.binary())])


@dataclass(frozen=True)
class FileRef:
    """One input file: ``path`` as its filesystem names it, ``uri`` as reports show it."""

    path: str
    uri: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """The resolved files behind one config field (``data.interactions`` or ``data.items``)."""

    field: str
    filesystem: pafs.FileSystem
    files: tuple[FileRef, ...]
    prefix: str  # prepended to a filesystem path to make the uri ('' for local, 's3://' ...)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, uri prefix). Local paths become absolute (workers' cwd differs)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), ""
    scheme = uri.split("://", 1)[0]
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):]), ""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path, f"{scheme}://"
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        pass
    try:
        import fsspec.core

        ffs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot open {uri!r}: no pyarrow or fsspec filesystem for scheme {scheme!r} ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), path, f"{scheme}://"


def resolve(uri: str, field: str) -> Source:
    """Expand a file / directory / glob into its files. Raises ``ValueError`` naming ``field``."""
    if not uri:
        raise ValueError(f"{field} is empty; give a file, directory or glob (local path or URI)")
    fs, path, prefix = _filesystem(uri)
    infos: list[pafs.FileInfo]
    base = path.rstrip("/").rsplit("/", 1)[-1]
    if any(c in base for c in "*?["):
        parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        listing = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        infos = [i for i in listing if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, base)
                 and not i.base_name.startswith((".", "_"))]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"{field}={uri!r}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File
                     and not any(p.startswith((".", "_")) for p in i.path[len(path):].split("/") if p)]
        else:
            infos = [info]
    if not infos:
        raise ValueError(f"{field}={uri!r}: matched no files")
    files = tuple(FileRef(i.path, prefix + i.path, int(i.size or 0), int(i.mtime_ns or 0))
                  for i in sorted(infos, key=lambda i: i.path))
    return Source(field, fs, files, prefix)


def detect_format(declared: str, source: Source, field: str) -> str:
    """'auto' -> the format the file extension names (all files must agree)."""
    if declared != "auto":
        return declared
    found = set()
    for f in source.files:
        ext = os.path.splitext(f.path)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(f"{field}: cannot tell the format of {f.uri!r} from its extension {ext!r}; set "
                             f"{field}_format to one of {list(FORMATS)}")
        found.add(_EXTENSIONS[ext])
    if len(found) > 1:
        raise ValueError(f"{field}: files of several formats {sorted(found)}; point at one format or set "
                         f"{field}_format")
    return found.pop()


def read_head(source: Source, ref: FileRef, n: int = HEAD_BYTES) -> bytes:
    with source.filesystem.open_input_stream(ref.path) as f:
        return f.read(n)


def read_parquet_schema(source: Source, ref: FileRef) -> pa.Schema:
    import pyarrow.parquet as pq

    with source.filesystem.open_input_file(ref.path) as f:
        return pq.read_schema(f)


def estimate_rows(source: Source) -> int:
    """Rows in all files, estimated from the first file's head (lines per byte) and total size:
    enough to size blocks so that every CPU gets work, without reading everything twice."""
    total = sum(f.size for f in source.files)
    head = read_head(source, source.files[0])
    lines = head.count(b"\n")
    return max(1, int(total * lines / len(head))) if head and lines else max(1, len(source.files))


def fingerprint(sources: list[Source], extra: dict[str, Any], *, mtimes: bool = True) -> str:
    """sha256 over every input file's uri, size and mtime plus ``extra`` (the data config):
    cheap on any storage, and it changes whenever an input or a setting that shapes the output does.
    ``mtimes=False`` for generated inputs, whose content is a pure function of ``extra``."""
    h = hashlib.sha256()
    for s in sources:
        for f in s.files:
            h.update(f"{s.field}\x1f{f.uri}\x1f{f.size}\x1f{f.mtime_ns if mtimes else ''}\n".encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---- whole files -> numbered lines (runs inside Ray Data tasks; pure) ----------------------

def iter_lines(data: bytes, first: int = 1, file_start: bool = True) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its line ending), numbered from ``first``. At a file's start
    (``file_start``) a UTF-8 BOM is dropped; blank lines (whitespace only) are skipped: they are
    not rows, and they keep their numbers out of use."""
    if file_start and data.startswith(BOM):
        data = data[len(BOM):]
    for i, line in enumerate(data.split(b"\n"), start=first):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            yield i, line


def explode_file(uri: str, data: bytes, fmt: str, headed: bool) -> tuple[list[str], list[int], list[bytes]]:
    """One file's bytes -> (sources, lines, raws). ``headed`` skips the header line (numbers stay
    1-based and count it, so the first data row of a csv is line 2). Text formats only: parquet
    is read by ``read_row_groups``."""
    if fmt == "parquet":
        raise ValueError("explode_file reads text files; read parquet with read_row_groups")
    lines, raws = [], []
    header_pending = headed
    for no, raw in iter_lines(data):
        if header_pending:  # the header is the first non-blank line
            header_pending = False
            continue
        lines.append(no)
        raws.append(raw)
    return [uri] * len(raws), lines, raws


# ---- text files -> line-aligned byte ranges (driver) and their rows (tasks) ------------------

SCAN_BYTES = 1 << 23  # split_lines reads files in blocks of this size


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of one text file: whole lines, the first numbered ``first_line``.
    ``header_line``: the file's header line number (skipped), 0 when the file has none."""

    path: str
    uri: str
    start: int
    end: int
    first_line: int
    header_line: int


def _first_nonblank(fs: pafs.FileSystem, path: str) -> int:
    """Number of the first non-blank line (the header of a csv/tsv), 0 for a blank file."""
    seen, rest, at_start = 0, b"", True
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(HEAD_BYTES)
            data = rest + block
            if at_start:  # a BOM is not content (as in iter_lines)
                if block and len(data) < len(BOM) and BOM.startswith(data):
                    rest = data
                    continue
                at_start = False
                data = data[len(BOM):] if data.startswith(BOM) else data
            parts = data.split(b"\n")
            whole = parts if not block else parts[:-1]  # the last part may go on in the next block
            for i, line in enumerate(whole):
                if line.strip():
                    return seen + i + 1
            if not block:
                return 0
            seen += len(whole)
            rest = parts[-1]


def split_lines(source: Source, chunk_bytes: int, headed: bool) -> list[Chunk]:
    """Cut every file into chunks of about ``chunk_bytes`` that end at a newline, each with the
    number of its first line. One sequential read per file that only counts newlines (C speed);
    memory stays at one read block whatever the file size."""
    chunk_bytes = max(1, chunk_bytes)
    out: list[Chunk] = []
    for ref in source.files:
        header = _first_nonblank(source.filesystem, ref.path) if headed else 0
        start, start_line, pos, newlines = 0, 1, 0, 0
        target = chunk_bytes
        with source.filesystem.open_input_stream(ref.path) as f:
            while block := f.read(SCAN_BYTES):
                while target < pos + len(block):
                    nl = block.find(b"\n", max(0, target - pos))
                    if nl < 0:
                        break  # the cut moves into the next block
                    cut = pos + nl + 1
                    out.append(Chunk(ref.path, source.prefix + ref.path, start, cut, start_line, header))
                    start, start_line = cut, newlines + block.count(b"\n", 0, nl + 1) + 1
                    target = cut + chunk_bytes
                newlines += block.count(b"\n")
                pos += len(block)
        if pos > start:
            out.append(Chunk(ref.path, source.prefix + ref.path, start, pos, start_line, header))
    return out


def read_chunk(filesystem: pafs.FileSystem, chunk: Chunk) -> pa.Table:
    """One chunk's non-blank lines as EXPLODED_SCHEMA rows, numbered as in the whole file."""
    with filesystem.open_input_file(chunk.path) as f:
        data = f.read_at(chunk.end - chunk.start, chunk.start)
    lines, raws = [], []
    for no, raw in iter_lines(data, first=chunk.first_line, file_start=chunk.start == 0):
        if no != chunk.header_line:
            lines.append(no)
            raws.append(raw)
    return pa.table({"source": pa.array([chunk.uri] * len(raws), pa.string()), "line": pa.array(lines, pa.int64()),
                     "raw": pa.array(raws, pa.binary())}, schema=EXPLODED_SCHEMA)


# ---- parquet files -> ranges of row groups (driver) and their rows (tasks) -----------------

@dataclass(frozen=True)
class RowGroups:
    """Row groups [first, stop) of one parquet file; its first row is row ``first_row`` (1-based)
    of the file."""

    path: str
    uri: str
    first: int
    stop: int
    first_row: int
    rows: int


def split_row_groups(source: Source, rows_per_chunk: int) -> list[RowGroups]:
    """Cut every parquet file into runs of whole row groups of about ``rows_per_chunk`` rows, from
    the files' footers (one small read per file; nothing grows with the rows)."""
    import pyarrow.parquet as pq

    out: list[RowGroups] = []
    for ref in source.files:
        with source.filesystem.open_input_file(ref.path) as f:
            meta = pq.ParquetFile(f).metadata
        first, first_row, rows = 0, 1, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= rows_per_chunk or g == meta.num_row_groups - 1:
                out.append(RowGroups(ref.path, source.prefix + ref.path, first, g + 1, first_row, rows))
                first, first_row, rows = g + 1, first_row + rows, 0
    return out


def read_row_groups(filesystem: pafs.FileSystem, chunk: RowGroups, columns: list[str] | None = None) -> pa.Table:
    """One range of row groups as (source, line = row number in the file, record = the row's
    ``columns`` (all when None) as one struct column)."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(chunk.path) as f:
        table = pq.ParquetFile(f).read_row_groups(list(range(chunk.first, chunk.stop)), columns=columns)
    return numbered_records(table, chunk.uri, chunk.first_row)


def numbered_records(table: pa.Table, uri: str, first_row: int = 1) -> pa.Table:
    """A table's rows as (source, line, record struct), numbered from ``first_row``."""
    n = table.num_rows
    arrays = [c.combine_chunks() for c in table.columns]
    record = pa.StructArray.from_arrays(arrays, names=table.column_names) if arrays else \
        pa.array([{}] * n, pa.struct([]))
    return pa.table({"source": pa.array([uri] * n, pa.string()),
                     "line": pa.array(range(first_row, first_row + n), pa.int64()), "record": record})
