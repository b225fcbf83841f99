"""What a local cluster this process starts is set up with (memory of the train stage: no idle
prestarted workers, no preemption watcher, one compiler at a time); the caller's settings win."""

from __future__ import annotations

import os

import pytest

from embsum.runtime import LOCAL_CLUSTER_ENV, local_cluster_env, local_system_config


def test_local_cluster_prestarts_no_idle_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RAY_num_workers_soft_limit", "RAY_worker_maximum_startup_concurrency",
              "RAY_prestart_worker_first_driver"):
        monkeypatch.delenv(k, raising=False)
    assert local_system_config(4) == {"num_workers_soft_limit": 8, "worker_maximum_startup_concurrency": 4,
                                      "prestart_worker_first_driver": False}
    monkeypatch.setenv("RAY_prestart_worker_first_driver", "1")  # Ray reads the caller's own setting
    assert "prestart_worker_first_driver" not in local_system_config(4)


def test_local_cluster_env_defaults_and_the_callers_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MAX_JOBS": "8"}  # this process's environment stays as it was
    monkeypatch.setattr(os, "environ", env)
    local_cluster_env()
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == LOCAL_CLUSTER_ENV["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and env["MAX_JOBS"] == "8"


def test_process_env_reaches_this_process_and_workers_and_the_callers_setting_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from embsum.runtime import PROCESS_ENV, process_env, setup_env, worker_env

    env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", env)
    process_env()
    assert env == PROCESS_ENV and env["ARROW_DEFAULT_MEMORY_POOL"] == "system"
    env.clear()
    setup_env()
    assert all(env[k] == v for k, v in PROCESS_ENV.items())
    assert all(worker_env()[k] == v for k, v in PROCESS_ENV.items())  # a cluster reached by address
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    process_env()
    setup_env()
    assert env["ARROW_DEFAULT_MEMORY_POOL"] == worker_env()["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"
