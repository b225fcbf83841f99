"""A Ray Data datasource of numbered input rows: what the prepare job reads instead of Ray Data's
csv / json / parquet readers, which lose the line a row came from (and stop at the first
malformed line, where we quarantine it and go on).

One read task per range cut on the driver (embsum/data/sources.py): a line-aligned byte range of a
text file (rows: source, line, raw bytes) or a run of parquet row groups, read natively as Arrow
columns with only the columns asked for (rows: source, line = row number, record = struct of the
columns). Read tasks are ordinary Ray Data read operators: the parse that follows fuses into them,
they stream under Ray Data's backpressure, and they run on any node (inputs are URIs every node
can open).
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from embsum.data.sources import Chunk, RowGroups, read_chunk, read_row_groups


class NumberedRows(Datasource):
    """Rows of text ranges (``Chunk``) or parquet row-group runs (``RowGroups``), numbered as in
    their files."""

    def __init__(self, filesystem: pafs.FileSystem, chunks: list[Chunk] | list[RowGroups],
                 columns: list[str] | None = None) -> None:
        super().__init__()
        self.filesystem = filesystem
        self.chunks = chunks
        self.columns = columns

    def get_name(self) -> str:
        return "NumberedRows"

    def _size(self, chunk: Chunk | RowGroups) -> int:
        return chunk.end - chunk.start if isinstance(chunk, Chunk) else 64 * chunk.rows  # a row: ~64 B of values

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._size(c) for c in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One task per range: the ranges were sized for the cluster already (``parallelism``
        is Ray Data's own guess, ignored)."""
        fs, columns = self.filesystem, self.columns
        tasks = []
        for c in self.chunks:
            if isinstance(c, Chunk):
                def read(c: Chunk = c) -> list:
                    return [read_chunk(fs, c)]
                rows = None
            else:
                def read(c: RowGroups = c) -> list:  # type: ignore[misc]
                    return [read_row_groups(fs, c, columns)]
                rows = c.rows
            meta = BlockMetadata(num_rows=rows, size_bytes=self._size(c), input_files=(c.uri,), exec_stats=None)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks
