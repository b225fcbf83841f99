"""Prepare's read ranges (train/prepare.py ``_ranges``, no Ray): one big file is cut into enough
line-aligned ranges that every CPU of the cluster parses a share of it, each within the
configured rows per block; small inputs stay in one range (a block costs more than it gives)."""

from __future__ import annotations

import pytest

from embsum.data.sources import iter_lines, resolve
from train.prepare import BLOCKS_PER_CPU, ROWS_PER_BLOCK, _ranges

LINE = "i{k:07d}\tu{k:07d}\t11/11/2019 9:05:58 AM\tN1 N2 N3\tN4-1 N5-0\n"


@pytest.mark.parametrize("rows, cpus", [(120_000, 6), (120_000, 2), (5_000, 6)])
def test_one_file_is_cut_for_every_cpu_within_the_block_bounds(tmp_path, rows, cpus):
    path = tmp_path / "behaviors.tsv"
    path.write_text("".join(LINE.format(k=k) for k in range(rows)))
    src = resolve(str(path), "data.interactions")
    ranges, est = _ranges(src, "tsv", False, cpus)
    lo, hi = ROWS_PER_BLOCK
    assert abs(est - rows) <= 0.05 * rows  # estimated from the head: lines here are all alike
    expected = min(max(BLOCKS_PER_CPU * cpus, -(-rows // hi)), max(1, rows // lo))
    assert abs(len(ranges) - expected) <= 1, (len(ranges), expected)
    data = path.read_bytes()
    first, end = 1, 0
    for r in ranges:  # contiguous, whole lines, numbered as in the file
        assert (r.start, r.first_line) == (end, first)
        lines = list(iter_lines(data[r.start:r.end], first=r.first_line, file_start=r.start == 0))
        assert 0 < len(lines) <= 1.05 * max(lo, min(hi, rows // (BLOCKS_PER_CPU * cpus)))
        first, end = lines[-1][0] + 1, r.end
    assert (end, first - 1) == (len(data), rows)
