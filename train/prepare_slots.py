"""How the prepare job uses the cluster (train/prepare.py): its task slots (one task per core) and
the Ray Data settings it runs with. No Ray at import; the helpers that ask Ray import it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def task_slots(one_machine: bool, cpus: int, cores: int) -> int:
    """Tasks the job runs at once: one per core. The local cluster embsum starts declares more
    logical CPUs than the machine has cores, on purpose (embsum.runtime.local_num_cpus: Data
    beside Train); the prepare tasks are CPU-bound, so there the job caps Ray Data at the cores
    (run_prepare). On 2 cores (4 logical CPUs), 800k impressions: 111 CPU-s and 69 s capped
    against 128-134 CPU-s and 70-83 s with 3 or 4 tasks at once. ``one_machine``: the cluster is
    this machine (on_one_machine); elsewhere (KubeRay pods, whose logical CPUs are their cores)
    one task per CPU. ``cpus``: the cluster's; ``cores``: this machine's."""
    return cores if one_machine and cpus > cores else cpus


def on_one_machine() -> bool:
    """The cluster is a single node (with CPUs), and it is this process's machine: its CPUs and this
    process's cores are the same hardware. True for the local cluster ``embsum run`` starts, which
    its stages reach by address; False for several nodes, or one node elsewhere (a Ray Client)."""
    import ray
    from ray.util import get_node_ip_address

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == get_node_ip_address()


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def data_settings(one_machine: bool) -> dict[str, Any]:
    """Ray Data settings of this job (DataContext attributes). On one machine the shuffles' shards
    never cross a network, so they are compressed with lz4, cheaper per byte than Ray's default zstd
    (the 200k job's object-store peak: 321-442 MB with lz4, 171-231 MB with zstd); a cluster of
    several nodes keeps Ray's default (its shards travel)."""
    return {"shuffle_compression": "lz4"} if one_machine else {}


@contextmanager
def job_settings(ctx: Any, settings: dict[str, Any], cpu_limit: int | None) -> Iterator[None]:
    """Ray Data ``settings`` (DataContext attributes) and a CPU cap (None: none) on ``ctx`` for the
    job's duration, put back however it ends: the pipeline's later stages share the context."""
    saved, limits = {k: getattr(ctx, k) for k in settings}, ctx.execution_options.resource_limits
    for k, v in settings.items():
        setattr(ctx, k, v)
    if cpu_limit is not None:
        ctx.execution_options.resource_limits = limits.copy(cpu=cpu_limit)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        ctx.execution_options.resource_limits = limits
