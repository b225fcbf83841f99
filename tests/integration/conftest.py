"""Integration fixtures: one local Ray cluster per test session, always shut down."""

from __future__ import annotations

import pytest


def start_local_ray() -> None:
    """The session's local Ray cluster: 4 logical CPUs on any machine (Data read tasks must never
    starve behind other work, see stack-notes)."""
    import ray

    from embsum.runtime import setup_env, worker_env

    setup_env()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": worker_env()})


@pytest.fixture(scope="session")
def ray_cluster():
    """The local cluster (``start_local_ray``). Reused when something already started one; shut
    down only if this fixture started it. A module that needs another cluster (test_multinode.py)
    shuts it down for its tests and starts it again after them."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()
