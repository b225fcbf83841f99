"""Integration fixtures: one local Ray cluster per test session, always shut down."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (4 logical CPUs on any machine: Data read tasks must never starve behind
    other work, see stack-notes). Reused when something already started one; shut down only if
    this fixture started it."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    from embsum.runtime import setup_env, worker_env

    setup_env()
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": worker_env()})
    try:
        yield ray
    finally:
        ray.shutdown()
