"""cluster/: what keeps a real fleet up and closed, checked on the rendered manifests (no cluster).

- GCS fault tolerance: the RayService keeps its GCS state in the Redis of redis.yaml (address and
  password resolve), the head is out of the serve Service;
- Serve's HTTP ingress on the RayService pods is what serve.ingress selects for `embsum serve`;
- PodDisruptionBudgets select the serving workers and MLflow and never block every drain;
- NetworkPolicies: only Ray pods reach MLflow, Redis and the Ray pods' own ports (GCS included),
  only MLflow reaches PostgreSQL; the scoring API and metrics stay reachable;
- MLflow runs its basic-auth app with credentials from Secrets that every Ray pod reads
  (mlflow-start.sh, run here with a stub `mlflow`), and the API token Secret is required;
- the PodMonitor scrapes the RayService pods' metrics port.
Schemas (Kubernetes, KubeRay and Prometheus Operator CRDs) are checked in test_manifests.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_manifests import (
    BUILDS,
    CLUSTER,
    RAY_KINDS,
    app_config,
    build,
    cluster_spec,
    load_docs,
    one,
    pod_templates,
    serve_app,
)

MONITORING = CLUSTER / "monitoring"


def pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(where, labels as on the running pod, pod spec) of every pod the resources make; KubeRay adds
    ray.io/node-type and ray.io/group to the template's labels."""
    out = []
    for d in docs:
        for grp, template in pod_templates(d):
            labels = dict(template["metadata"].get("labels", {}))
            if d["kind"] in RAY_KINDS:
                labels.update({"ray.io/node-type": "head" if grp == "head" else "worker", "ray.io/group": grp,
                               "ray.io/is-ray-node": "yes"})
            out.append((f"{d['kind']}/{d['metadata']['name']}[{grp}]", labels, template["spec"]))
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are used here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def ports_of(spec: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}


# ---- GCS fault tolerance, ingress env ------------------------------------------------------------------
@pytest.mark.parametrize("rel", BUILDS)
def test_rayservice_survives_a_head_restart(rel: str):
    docs = build(rel)
    service = one(docs, "RayService")
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True
    ft = cluster_spec(service)["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    svc = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    redis = one(docs, "StatefulSet", host)
    assert selects({"matchLabels": svc["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = redis["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}} in env, "Ray and Redis share one password"
    script = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "appendonly yes" in script and "requirepass" in script and "$REDIS_PASSWORD" in script
    assert redis["spec"]["volumeClaimTemplates"], "the GCS state survives a Redis restart"


@pytest.mark.parametrize("rel", BUILDS)
def test_rayservice_pods_run_the_ingress_that_serve_ingress_selects(rel: str):
    from embsum.config import replace
    from serve.ingress import serve_env

    docs = build(rel)
    service = one(docs, "RayService")
    _, app = serve_app(service)
    cfg = replace(app_config(app["args"]["overrides"]), "ray.address", "auto")  # a cluster it did not start
    env = one(docs, "ConfigMap", "embsum-serve-env")["data"]
    assert env == serve_env(cfg, {}), "the RayService's pods and `embsum serve` select the same ingress"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    for where, _, spec in pods([service]):
        refs = [s["configMapRef"]["name"] for s in spec["containers"][0]["envFrom"] if "configMapRef" in s]
        assert "embsum-serve-env" in refs, where


# ---- disruption budgets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", BUILDS)
def test_disruption_budgets_cover_serving_and_mlflow(rel: str):
    docs = build(rel)
    all_pods = pods(docs)
    budgets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"embsum-serving", "mlflow"}
    for name, pdb in budgets.items():
        chosen = [w for w, labels, _ in all_pods if selects(pdb["spec"]["selector"], labels)]
        assert chosen, f"PDB {name} selects no pod"
        # maxUnavailable, never minAvailable == replicas: a drain must be able to proceed.
        assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
    serving = [w for w, labels, _ in all_pods if selects(budgets["embsum-serving"]["spec"]["selector"], labels)]
    assert serving == ["RayService/embsum[cpu]"], serving  # the replicas' pods, not the head, not the pipeline
    service = one(docs, "RayService")
    cpu = cluster_spec(service)["workerGroupSpecs"][0]
    _, app = serve_app(service)
    s = app_config(app["args"]["overrides"]).serve
    assert cpu["minReplicas"] >= 2 and s.min_replicas >= 2 and s.max_replicas_per_node == 1, \
        "two replicas on two pods: a drain of one leaves one serving"


# ---- network policies ------------------------------------------------------------------------------------
def ingress_from(docs: list[dict[str, Any]], target: str) -> list[tuple[str, int | None]]:
    """(source pod, port) pairs admitted to the pods of ``target`` (a 'where' of ``pods``) by the
    NetworkPolicies; source '*' = any source, port None = any port."""
    all_pods = pods(docs)
    labels = next(lab for w, lab, _ in all_pods if w == target)
    admitted: list[tuple[str, int | None]] = []
    for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if not selects(pol["spec"]["podSelector"], labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            port_list = [p["port"] for p in rule.get("ports", [])] or [None]
            sources: list[str] = []
            for peer in rule.get("from", [{}]):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources += [w for w, lab, _ in all_pods if selects(peer["podSelector"] or {}, lab)] \
                        if peer["podSelector"] else ["<this namespace>"]
                else:
                    sources.append("*" if not peer else "<other namespaces>")
            admitted += [(src, port) for src in sources for port in port_list]
    return admitted


@pytest.mark.parametrize("rel", BUILDS)
def test_only_ray_pods_reach_mlflow_redis_and_the_gcs(rel: str):
    docs = build(rel)
    ray_pods = {w for w, _, _ in pods(docs) if w.split("/")[0] in RAY_KINDS}
    assert len(ray_pods) >= 7  # heads and workers of the RayJob, RayCluster and RayService

    mlflow = ingress_from(docs, "Deployment/mlflow[mlflow]")
    assert {src for src, _ in mlflow} == ray_pods and {p for _, p in mlflow} == {5000}
    redis = ingress_from(docs, "StatefulSet/embsum-redis[embsum-redis]")
    assert {src for src, _ in redis} == ray_pods and {p for _, p in redis} == {6379}
    postgres = ingress_from(docs, "StatefulSet/mlflow-postgres[mlflow-postgres]")
    assert postgres == [("Deployment/mlflow[mlflow]", 5432)]
    for head in (w for w in ray_pods if w.endswith("[head]")):
        admitted = ingress_from(docs, head)
        gcs = {src for src, port in admitted if port in (6379, None)}
        assert gcs == ray_pods, f"{head}: the GCS port admits {gcs - ray_pods}"
        # Beyond Ray pods: the API (bearer token), the dashboard (Ray token auth), metrics; nothing else.
        outside = {port for src, port in admitted if src not in ray_pods}
        assert outside == {8000, 8265, 8080}, (head, outside)
        assert ("*", 8000) in admitted


# ---- auth: MLflow's basic auth, the API token ------------------------------------------------------------
@pytest.mark.parametrize("rel", BUILDS)
def test_every_ray_pod_reads_the_mlflow_credentials_and_the_service_requires_its_token(rel: str):
    docs = build(rel)
    for where, _, spec in pods(docs):
        if where.split("/")[0] not in RAY_KINDS:
            continue
        secrets = {s["secretRef"]["name"]: s["secretRef"].get("optional", False)
                   for s in spec["containers"][0]["envFrom"] if "secretRef" in s}
        assert secrets.get("mlflow-auth") is False, f"{where}: Secret mlflow-auth must be required"
        if where.startswith("RayService/"):
            assert secrets.get("embsum-api") is False, f"{where}: the API token is required beyond loopback"
    mlflow = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    c = mlflow["containers"][0]
    assert c["command"] == ["/bin/sh", "/etc/mlflow/start.sh"]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c["env"]}
    # The server's admin is the user the clients log in as: the same Secret keys.
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_USERNAME"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == "mlflow-db"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/mlflow")
    volume = next(v for v in mlflow["volumes"] if v["name"] == mount["name"])
    script = one(docs, "ConfigMap", volume["configMap"]["name"])["data"]["start.sh"]
    assert script == (CLUSTER / "base" / "mlflow-start.sh").read_text()


def test_dev_secrets_pass_the_api_token_rules_and_the_example_does_not():
    """The dev overlay's token is accepted; the example Secret's placeholder is refused, so a copied
    example never becomes the production credential."""
    from embsum.config import ServeConfig
    from serve.auth import api_token

    def token(path: Path) -> str:
        return next(d for d in load_docs(path) if d["metadata"]["name"] == "embsum-api")["stringData"][
            "EMBSUM_API_TOKEN"]

    s = ServeConfig(host="0.0.0.0")
    dev = token(CLUSTER / "overlays" / "dev-cpu" / "dev-secrets.yaml")
    assert api_token(s, {"EMBSUM_API_TOKEN": dev}) == dev
    with pytest.raises(ValueError, match="placeholder"):
        api_token(s, {"EMBSUM_API_TOKEN": token(CLUSTER / "overlays" / "gpu" / "secrets.example.yaml")})


def run_mlflow_start(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, str, str]:
    """mlflow-start.sh with a stub `mlflow` that records its arguments and the auth config it sees."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "mlflow"
    stub.write_text('#!/bin/sh\necho "$@" > "$STUB_OUT/args"\ncat "$MLFLOW_AUTH_CONFIG_PATH" > "$STUB_OUT/ini"\n')
    stub.chmod(0o755)
    full = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STUB_OUT": str(tmp_path),
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"), **env}
    proc = subprocess.run(["sh", str(CLUSTER / "base" / "mlflow-start.sh"), "--host=0.0.0.0", "--port=5000"],
                          env=full, capture_output=True, text=True, timeout=30)
    read = lambda name: (tmp_path / name).read_text() if (tmp_path / name).exists() else ""  # noqa: E731
    return proc, read("args"), read("ini")


def test_mlflow_start_script_writes_the_auth_config_from_the_environment(tmp_path: Path):
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:p@mlflow-postgres:5432/mlflow",
           "MLFLOW_AUTH_ADMIN_USERNAME": "embsum", "MLFLOW_AUTH_ADMIN_PASSWORD": "pw-from-secret",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    proc, args, ini = run_mlflow_start(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert args.split() == ["server", "--app-name", "basic-auth", "--host=0.0.0.0", "--port=5000"]
    import configparser

    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    assert dict(parsed["mlflow"]) == {
        "default_permission": "NO_PERMISSIONS", "database_uri": env["MLFLOW_BACKEND_STORE_URI"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    assert "pw-from-secret" not in ini + args, "the password reaches MLflow through its env variable only"
    assert oct((tmp_path / "auth" / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
    for missing in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        proc, args, _ = run_mlflow_start({k: v for k, v in env.items() if k != missing}, tmp_path / missing)
        assert proc.returncode != 0 and missing in proc.stderr and not args


# ---- metrics ---------------------------------------------------------------------------------------------
def test_podmonitor_scrapes_the_serving_pods():
    monitors = load_docs(MONITORING / "podmonitor.yaml")
    assert [d["kind"] for d in monitors] == ["PodMonitor"]
    pm = monitors[0]
    docs = build("base")
    chosen = [(w, spec) for w, labels, spec in pods(docs) if selects(pm["spec"]["selector"], labels)]
    assert {w for w, _ in chosen} == {"RayService/embsum[head]", "RayService/embsum[cpu]"}
    names = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for where, spec in chosen:
        declared = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert names <= set(declared), where
        assert declared["metrics"] == 8080  # Ray's metrics export port (KubeRay's default)
    k = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert k["resources"] == ["podmonitor.yaml"]
