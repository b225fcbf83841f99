"""Integration fixtures: one local Ray cluster and one real `mlflow server` per test session, always
shut down."""

from __future__ import annotations

import pytest


def start_local_ray() -> None:
    """The session's local Ray cluster: 4 logical CPUs on any machine (Data read tasks must never
    starve behind other work, see stack-notes)."""
    import ray

    from embsum.runtime import setup_env, worker_env

    setup_env()
    # address="local": a new cluster even when a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": worker_env()})


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (SQLite backend, artifact proxy) on a free port; its URL.
    Modules register under their own model names, so they never see each other's versions."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()
