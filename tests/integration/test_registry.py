"""The registry against a real MLflow store (SQLite file + artifact folder) and a real `mlflow
server` process: versions, aliases, the promotion gate (which promotes only versions whose
embeddings exist), downloads that never unpickle, and failing closed: a registry that errors on
alias lookups (a proxy answering 503) or is gone (the proxy stopped) makes `embsum promote` fail
with a message naming the registry and the error and leaves the alias where it was; `models
list` says the registry failed instead of "no versions". And the cluster's MLflow behind its
basic-auth app (cluster/base/mlflow-start.sh, run for real): without the Secret's credentials a
client is refused, with them (MLFLOW_TRACKING_USERNAME/PASSWORD, as every Ray pod reads them) it
registers and promotes. No Ray needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embsum.config import config_from_dict
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture()
def registry(tmp_path: Path):
    from embsum.registry import Registry

    return Registry(config_from_dict({"workdir": str(tmp_path), "mlflow": {"gate_floor": 0.55}}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    from embsum.checkpoint import save_model
    from embsum.model import EmbSum

    d = tmp_path_factory.mktemp("m") / "model"
    save_model(EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0), tokenizer, d)
    return d


def _version(registry, model_dir: Path, valid_auc: float | None, embedded: bool = True) -> str:
    """A registered version (with its embeddings manifest unless ``embedded`` is False)."""
    from embsum.embeddings import Manifest, version_dir, write_manifest

    run = registry.start_run("r")
    if valid_auc is not None:
        registry.log_metrics(run, {"valid_auc": valid_auc})
    v = registry.log_and_register(run, model_dir)
    registry.end_run(run)
    if embedded:
        folder = version_dir(registry.cfg.embeddings_dir, v)
        folder.mkdir(parents=True)
        write_manifest(folder, Manifest(model_name=registry.name, model_version=v, model_fingerprint="", items=1,
                                        users=1, dtype="float32", user_codes=1, content_codes=1, d_model=8))
    return v


def test_gate_promotes_only_better_models(registry, model_dir: Path) -> None:
    v0 = _version(registry, model_dir, 0.90, embedded=False)  # best metric, but nothing to serve it with
    ok, why = registry.gate(v0)
    assert not ok and registry.champion() is None
    assert f"version {v0} cannot serve: no embeddings at" in why and "alias 'champion' unchanged" in why
    ok, why = registry.gate(v0, force=True)  # --force skips the comparison, never the embeddings
    assert not ok and registry.champion() is None

    v1 = _version(registry, model_dir, 0.70)
    ok, why = registry.gate(v1)
    assert ok and registry.champion().version == v1, why

    v2 = _version(registry, model_dir, 0.65)  # worse: refused, alias stays, the reason names both
    ok, why = registry.gate(v2)
    assert not ok and registry.champion().version == v1
    assert f"version {v2}" in why and f"champion version {v1}" in why

    v3 = _version(registry, model_dir, 0.50)  # below the floor even with no better champion check
    ok, why = registry.gate(v3)
    assert not ok and "floor" in why and registry.champion().version == v1

    v4 = _version(registry, model_dir, None)  # never evaluated: refused
    ok, why = registry.gate(v4)
    assert not ok and "no valid_auc" in why

    v5 = _version(registry, model_dir, 0.80)
    ok, why = registry.gate(v5)
    assert ok and registry.champion().version == v5 and f"(was {v1})" in why
    assert [v.version for v in registry.versions()] == [v0, v1, v2, v3, v4, v5]
    ok, why = registry.gate(v2, force=True)
    assert ok and "forced" in why and registry.champion().version == v2


def test_download_by_alias_and_number(registry, model_dir: Path, tmp_path: Path) -> None:
    from embsum.checkpoint import load_model

    v = _version(registry, model_dir, 0.7)
    registry.promote(v)
    by_alias = registry.download("champion", tmp_path / "a")
    by_num = registry.download(v, tmp_path / "b")
    for d in (by_alias, by_num):
        assert (d / "model.safetensors").is_file() and not list(d.rglob("*.pkl")) and not list(d.rglob("*.bin"))
        load_model(d)
    with pytest.raises(ValueError, match="no version or alias '99'"):
        registry.version("99")
    with pytest.raises(ValueError, match="no version or alias 'prod'"):
        registry.version("@prod")


def test_resolve_is_the_one_way_to_name_a_version(registry, model_dir: Path) -> None:
    """What evaluate, embed and serve are told: a number or alias as given; else serve.model_version or
    the alias (embed, serve), or the newest version (evaluate)."""
    from embsum.config import replace
    from embsum.registry import NotFound, Registry

    with pytest.raises(NotFound, match="no registered versions of 'embsum'"):
        registry.resolve(default="newest")
    with pytest.raises(NotFound, match="no version or alias 'champion'"):
        registry.resolve()  # no alias yet: an error, never a guess
    v1 = _version(registry, model_dir, 0.7)
    v2 = _version(registry, model_dir, 0.8)
    registry.promote(v1)
    assert registry.resolve().version == v1 and registry.resolve("").version == v1
    assert registry.resolve(default="newest").version == v2
    assert registry.resolve(v2).version == v2 and registry.resolve(int(v2)).version == v2
    assert registry.resolve("@champion", default="newest").version == v1
    pinned = Registry(replace(registry.cfg, "serve.model_version", v2))
    assert pinned.resolve().version == v2 and pinned.resolve(v1).version == v1
    with pytest.raises(NotFound, match="no version or alias '99'"):
        registry.resolve("99")


# ---- a real tracking server, and a registry that fails ------------------------------------------------
NAME = "gate-test"


def embsum(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embsum.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    return errors[0]


@pytest.fixture()
def served_registry(mlflow_server, tmp_path: Path, model_dir: Path):
    """Through the real server: v1 (valid_auc 0.70) is champion; v2 (0.90) is better and embedded."""
    from embsum.registry import Registry

    values = {"workdir": str(tmp_path), "mlflow": {"tracking_uri": mlflow_server.url, "registered_model": NAME,
                                                   "experiment": f"gate-{tmp_path.name}",
                                                   "artifact_location": f"mlflow-artifacts:/{tmp_path.name}",
                                                   "http_retries": 3, "http_timeout_s": 60}}  # set-up: patient
    registry = Registry(config_from_dict(values))
    v1 = _version(registry, model_dir, 0.70)
    registry.promote(v1)
    v2 = _version(registry, model_dir, 0.90)
    return registry, v1, v2


def test_gate_fails_closed_when_alias_lookups_fail(served_registry, tmp_path: Path) -> None:
    """The server answers everything but alias lookups (503 from a proxy in front of it): the gate must
    not read that as "no champion" and promote without comparing."""
    from tests.mlflow_server import FaultyProxy

    registry, v1, v2 = served_registry
    proxy = FaultyProxy(int(registry.uri.rsplit(":", 1)[1]))
    args = ["promote", v2, f"workdir={tmp_path}", f"mlflow.tracking_uri={proxy.url}",
            f"mlflow.registered_model={NAME}", "mlflow.http_retries=1", "mlflow.http_timeout_s=30"]
    try:
        proxy.failing = True
        failed = embsum(*args)
        assert registry.champion().version == v1  # asked directly, not through the proxy
        proxy.failing = False  # the same command once the registry answers: the gate compares and promotes
        passed = embsum(*args)
    finally:
        proxy.stop()
    line = one_error_line(failed)
    assert f"the model registry at {proxy.url} failed to version or alias 'champion'" in line
    assert "503" in line and f"the gate cannot compare version {v2} with the champion" in line
    assert line.endswith("alias 'champion' unchanged")
    assert proxy.hits == 2  # the lookup and its one configured retry (mlflow.http_retries=1), nothing else
    assert passed.returncode == 0, passed.stdout + passed.stderr
    said = " ".join(passed.stdout.split())
    assert f"promoted: version {v2} valid_auc=0.9000 promoted to 'champion' (was {v1})" in said
    assert registry.champion().version == v2


def test_a_registry_that_is_gone_is_an_error_not_an_empty_registry(served_registry, tmp_path: Path) -> None:
    from tests.mlflow_server import FaultyProxy

    registry, v1, v2 = served_registry
    proxy = FaultyProxy(int(registry.uri.rsplit(":", 1)[1]))
    proxy.stop()  # nothing listens there any more: a killed server
    common = [f"workdir={tmp_path}", f"mlflow.tracking_uri={proxy.url}", f"mlflow.registered_model={NAME}",
              "mlflow.http_retries=0"]
    line = one_error_line(embsum("models", "list", *common))
    assert f"the model registry at {proxy.url} failed to list its versions" in line and "Connection" in line
    line = one_error_line(embsum("promote", v2, *common))
    assert f"the model registry at {proxy.url} failed to version or alias '{v2}'" in line
    assert registry.champion().version == v1
    # Versions that do not exist are still "not found", never a registry failure.
    line = one_error_line(embsum("models", "show", "99", f"workdir={tmp_path}", f"mlflow.tracking_uri={registry.uri}",
                                 f"mlflow.registered_model={NAME}"))
    assert "no version or alias '99'" in line and "failed to" not in line


def test_the_clusters_mlflow_requires_the_secrets_credentials(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    import httpx

    from embsum.registry import Registry, RegistryError
    from tests.mlflow_server import MlflowServer

    user, password = "embsum", "test-only-password-8f3c2a"
    server = MlflowServer(tmp_path / "server", start_script=REPO / "cluster" / "base" / "mlflow-start.sh",
                          env={"MLFLOW_AUTH_ADMIN_USERNAME": user, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key",
                               "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini")}).start()
    try:
        assert httpx.get(server.url + "/health").status_code == 200  # probes need no credentials
        cfg = config_from_dict({"workdir": str(tmp_path), "mlflow": {
            "tracking_uri": server.url, "registered_model": "auth-test", "http_retries": 0, "http_timeout_s": 60,
            "artifact_location": "mlflow-artifacts:/auth-test"}})  # refusals are 401s: no timeout is asserted on
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(k, raising=False)
        with pytest.raises(RegistryError, match=rf"the model registry at {server.url} failed to list its versions"):
            Registry(cfg).versions()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(RegistryError):
            Registry(cfg).versions()
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        registry = Registry(cfg)
        v = _version(registry, model_dir, 0.7)
        assert registry.gate(v)[0] and registry.champion().version == v
    finally:
        server.stop()
