"""Prepare's read ranges (train/prepare.py ``_ranges``, no Ray): one big file is cut into enough
line-aligned ranges that every task slot of the job parses a share of it, each within the
configured rows per block; small inputs stay in one range (a block costs more than it gives)."""

from __future__ import annotations

import pytest

from embsum.data.sources import iter_lines, resolve
from train.prepare import BLOCKS_PER_SLOT, ROWS_PER_BLOCK, _ranges

LINE = "i{k:07d}\tu{k:07d}\t11/11/2019 9:05:58 AM\tN1 N2 N3\tN4-1 N5-0\n"


@pytest.mark.parametrize("rows, slots", [(120_000, 6), (120_000, 2), (5_000, 6)])
def test_one_file_is_cut_for_every_slot_within_the_block_bounds(tmp_path, rows, slots):
    path = tmp_path / "behaviors.tsv"
    path.write_text("".join(LINE.format(k=k) for k in range(rows)))
    src = resolve(str(path), "data.interactions")
    ranges, est = _ranges(src, "tsv", False, slots)
    lo, hi = ROWS_PER_BLOCK
    assert abs(est - rows) <= 0.05 * rows  # estimated from the head: lines here are all alike
    expected = min(max(BLOCKS_PER_SLOT * slots, -(-rows // hi)), max(1, rows // lo))
    assert abs(len(ranges) - expected) <= 1, (len(ranges), expected)
    data = path.read_bytes()
    first, end = 1, 0
    for r in ranges:  # contiguous, whole lines, numbered as in the file
        assert (r.start, r.first_line) == (end, first)
        lines = list(iter_lines(data[r.start:r.end], first=r.first_line, file_start=r.start == 0))
        assert 0 < len(lines) <= 1.05 * max(lo, min(hi, rows // (BLOCKS_PER_SLOT * slots)))
        first, end = lines[-1][0] + 1, r.end
    assert (end, first - 1) == (len(data), rows)


# ---- how many tasks run at once, and in how many partitions (train/prepare.py, no Ray) -----------
@pytest.mark.parametrize("one_machine, cpus, cores, expected", [
    (True, 4, 2, 2),  # embsum's local cluster on 2 cores: 4 logical CPUs, one task per core
    (True, 16, 16, 16),  # a local cluster with as many CPUs as cores: one task per CPU
    (True, 2, 8, 2),  # fewer CPUs than cores: the cluster's CPUs
    (False, 8, 2, 8),  # several nodes, or given by address: its CPUs are its nodes' cores
])
def test_prepare_runs_one_task_per_core_on_the_local_cluster(one_machine, cpus, cores, expected):
    from train.prepare_slots import task_slots

    assert task_slots(one_machine, cpus, cores) == expected


@pytest.mark.parametrize("rows, slots, expected", [
    (250_000, 2, 4),  # 3 by the row bound -> 2 whole waves of 2 (3 left a core idle through the last)
    (200_000, 2, 2),
    (10_000, 2, 2),
    (12_000, 4, 3),  # fewer than the slots: bounded by ROWS_PER_PARTITION's minimum, no rounding
    (3_200_000, 2, 32),
    (3_200_000, 3, 33),
])
def test_user_partitions_fill_whole_waves_oftask_slots(rows, slots, expected):
    from train.prepare import ROWS_PER_PARTITION, _partitions

    n = _partitions(rows, slots)
    assert n == expected
    lo, hi = ROWS_PER_PARTITION
    assert n <= max(1, -(-rows // lo))  # never smaller partitions than the minimum allows


def test_the_jobs_data_settings_compress_shuffles_cheaply_where_they_do_not_travel():
    from train.prepare_slots import data_settings

    assert data_settings(True) == {"shuffle_compression": "lz4"}  # one machine: the cheaper codec
    assert data_settings(False) == {}  # shards travel between nodes: Ray's default codec stays


def test_the_jobs_settings_are_put_back_even_when_the_job_fails():
    from ray.data import DataContext

    from train.prepare_slots import job_settings

    ctx = DataContext()
    codec, limits = ctx.shuffle_compression, ctx.execution_options.resource_limits
    with pytest.raises(RuntimeError, match="job failed"):
        with job_settings(ctx, {"shuffle_compression": "lz4"}, cpu_limit=2):
            assert ctx.shuffle_compression == "lz4" and ctx.execution_options.resource_limits.cpu == 2
            raise RuntimeError("job failed")
    assert ctx.shuffle_compression == codec and ctx.execution_options.resource_limits == limits
    with job_settings(ctx, {}, cpu_limit=None):  # nothing to change: nothing changed
        assert ctx.execution_options.resource_limits == limits
