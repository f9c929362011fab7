"""The Helm chart: lint, packaging, rendering in every mode, strict Kubernetes 1.30 validation of
every object, invariants over every scenario, the values schema, and secrets kept across
upgrades (rendered twice, the second time with Helm's `lookup` answered by a fake API server).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

if os.environ.get("CI"):  # in CI a missing package fails instead of skipping
    import helm_python
    import kubernetes_validate
else:
    helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )

from tests.helm.conftest import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    Rendered,
    parse,
)

helm = helm_python

KUBE_VERSION = "1.30.0"
FULLNAME = f"{RELEASE}-llama-gateway"
GPU = "nvidia.com/gpu"

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis-existing-secret": {
        "redis": {
            "mode": "external",
            "external": {
                "url": "rediss://redis.data.svc.cluster.local:6380/2",
                "existingSecret": "redis-auth",
                "existingSecretPasswordKey": "password",
            },
        },
        "secrets": {"existingSecret": "gateway-secrets"},
    },
    "external-redis-host-port": {
        "redis": {
            "mode": "external",
            "failureMode": "open",
            "external": {
                "host": "redis.example.internal",
                "port": 6380,
                "db": 3,
                "tls": True,
                "username": "gateway",
                "existingSecret": "redis-auth",
            },
        },
        "config": {"defaultRpm": 600, "defaultTpm": 1000000, "imageFetchAllow": ["10.0.0.0/8"]},
    },
    "bundled-redis-pvc": {
        "redis": {
            "mode": "bundled",
            "bundled": {"persistence": {"enabled": True, "size": "4Gi", "storageClassName": "ssd"}},
        },
        "model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}, "dir": "llama-11b"},
        "termination": {"preStop": "exec", "preStopSeconds": 5, "extraGraceSeconds": 10},
        "config": {
            "extraEnv": {
                "GATEWAY_MAX_BODY_BYTES": 50000000,
                "GATEWAY_LOG_LEVEL": "debug",
                "GATEWAY_IMAGE_FETCH_TIMEOUT_S": 2.5,
            }
        },
        "engine": {
            "extraEnv": [
                {"name": "GATEWAY_DEFAULT_POLICY", "value": "audit"},
                {"name": "NCCL_DEBUG", "value": "WARN"},
            ],
            "runtimeClassName": "nvidia",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "gpu", "operator": "In", "values": ["true"]}
                                ]
                            }
                        ]
                    }
                }
            },
        },
    },
    "split-hpa": {
        "mode": "split",
        "model": {
            "source": "copy",
            "dir": "Llama-3.2-11B-Vision-Instruct",
            "copy": {"volume": {"persistentVolumeClaim": {"claimName": "weights-rwx"}}},
        },
        "gateway": {
            "autoscaling": {
                "targetMemoryUtilizationPercentage": 80,
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            }
        },
        "engine": {"replicas": 2, "gpus": 2},
    },
    "upstream-cpu-only": {
        "mode": "upstream",
        "routes": {
            "config": {
                "routes": [
                    {
                        "model": "meta-llama/llama-3.2-11b-vision-instruct",
                        "api_base": "http://vision-engine.llm.svc:8000/v1",
                    }
                ]
            }
        },
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
        "redis": {"mode": "external", "external": {"url": "redis://redis-master:6379/0"}},
    },
    "ingress-networkpolicy-servicemonitor": {
        "mode": "split",
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                    }
                }
            ],
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "policies": {
            "files": {
                "team-a.yaml": "name: team-a\nextends: strict\n",
                "default.yaml": {"name": "default", "version": "2"},
            }
        },
    },
}

CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def rendered(render) -> dict[str, Rendered]:  # type: ignore[no-untyped-def]
    return {name: render(values) for name, values in SCENARIOS.items()}


def pod_specs(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) for every Deployment and StatefulSet."""
    return [(w, w["spec"]["template"]["spec"]) for w in r.workloads()]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"].get("app.kubernetes.io/component", "")


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def gateway_containers(r: Rendered) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(component, pod spec, container) for each gateway process (server, engine, gateway)."""
    out = []
    for workload, spec in pod_specs(r):
        if component(workload) in ("server", "engine", "gateway"):
            for c in spec["containers"]:
                out.append((component(workload), spec, c))
    return out


# --- lint and packaging ------------------------------------------------------------------------


def test_strict_lint_is_clean() -> None:
    report = helm.lint(CHART_DIR, strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("scenario", ["split-hpa", "upstream-cpu-only"])
def test_strict_lint_other_modes(scenario: str) -> None:
    report = helm.lint(
        CHART_DIR, SCENARIOS[scenario], strict=True, kube_version="v1.30.0", namespace=NAMESPACE
    )
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_package_ships_schema_readme_and_policies(tmp_path: Path) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for required in (
        "llama-gateway/Chart.yaml",
        "llama-gateway/values.yaml",
        "llama-gateway/values.schema.json",
        "llama-gateway/README.md",
        "llama-gateway/templates/NOTES.txt",
    ):
        assert required in names
    shipped = sorted(p.name for p in (CHART_DIR / "files" / "policies").glob("*.yaml"))
    assert shipped, "the chart has no policy files"
    for policy in shipped:
        assert f"llama-gateway/files/policies/{policy}" in names
    with helm.Chart.load(archive) as packaged:
        assert packaged.schema is not None
        assert packaged.schema == json.loads((CHART_DIR / "values.schema.json").read_text())
        objects = parse(packaged.render({}, name=RELEASE, namespace=NAMESPACE), {}).objects
        assert {(o["kind"], o["metadata"]["name"]) for o in objects} >= {
            ("Deployment", FULLNAME),
            ("ConfigMap", f"{FULLNAME}-policies"),
        }
        # A packaged chart still refuses bad values (the schema was not .helmignored).
        with pytest.raises(helm.HelmValuesError):
            packaged.validate_schema({"bogus": 1})


def test_helmignore_keeps_what_must_ship() -> None:
    lines = (CHART_DIR / ".helmignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    for keep in ("values.schema.json", "README.md", "files/policies/default.yaml", "templates"):
        for pattern in patterns:
            assert not fnmatch.fnmatch(keep, pattern.rstrip("/")), (keep, pattern)
            assert not keep.startswith(pattern.rstrip("/") + "/"), (keep, pattern)


# --- every scenario: strict Kubernetes validation and invariants ------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_object_validates_against_kubernetes_1_30(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    assert r.objects
    for obj in r.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
        assert obj["metadata"]["namespace"] == NAMESPACE or obj["kind"] == "Namespace"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gpu_limits_only_on_engine_containers(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    gpus = r.values.get("engine", {}).get("gpus", 1)
    for workload, spec in pod_specs(r):
        gpu_pod = component(workload) in ("server", "engine")
        for c in spec["containers"]:
            limits = c["resources"].get("limits", {})
            if gpu_pod:
                assert limits.get(GPU) == gpus, (workload["metadata"]["name"], limits)
                assert GPU not in c["resources"].get("requests", {})
            else:
                assert GPU not in limits and GPU not in c["resources"].get("requests", {})
        for c in spec.get("initContainers", []):
            assert GPU not in c["resources"].get("limits", {})
        if gpu_pod:
            tolerations = spec.get("tolerations", [])
            assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in tolerations)
    if r.values.get("mode") == "upstream":
        assert all(component(w) == "gateway" for w, _ in pod_specs(r) if component(w) != "redis")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_images_are_pinned(rendered: dict[str, Rendered], scenario: str) -> None:
    for _, spec in pod_specs(rendered[scenario]):
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            name_and_tag = image.split("@", 1)[0]
            last = name_and_tag.rsplit("/", 1)[-1]
            assert ":" in last, f"untagged image {image}"
            tag = last.split(":", 1)[1]
            assert tag and tag.lower() != "latest", image


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_container_has_resources_security_and_probes(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    for workload, spec in pod_specs(rendered[scenario]):
        where = workload["metadata"]["name"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"], (where, c["name"])
            assert res["limits"]["memory"], (where, c["name"])
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (None, 0)
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, (where, c["name"], probe)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gateway_containers_contract(rendered: dict[str, Rendered], scenario: str) -> None:
    """Bind address, port, probes, writable dirs, the policy mount and the drain."""
    r = rendered[scenario]
    containers = gateway_containers(r)
    assert containers
    mode = r.values.get("mode", "combined")
    for comp, spec, c in containers:
        env = env_of(c)
        names = [e["name"] for e in c["env"]]
        assert len(names) == len(set(names)), f"duplicate env names in {comp}"
        assert env["GATEWAY_HOST"]["value"] == "0.0.0.0"
        assert env["GATEWAY_PORT"]["value"] == "8000"
        assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        json.loads(env["GATEWAY_IMAGE_FETCH_ALLOW"]["value"])
        for secret_env in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_KEY_SECRET", "GATEWAY_BOOTSTRAP_KEY"):
            assert "secretKeyRef" in env[secret_env]["valueFrom"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert all("subPath" not in m for m in c["volumeMounts"])
        for writable in ("/tmp", env["GATEWAY_STATE_DIR"]["value"]):
            assert "emptyDir" in volumes[mounts[writable]["name"]], writable
        policy_mount = mounts[env["GATEWAY_POLICY_DIR"]["value"]]
        assert volumes[policy_mount["name"]]["configMap"]["name"] == f"{FULLNAME}-policies"
        if comp in ("server", "engine"):
            assert env["GATEWAY_DEVICE"]["value"] == "cuda"
            model_path = env["GATEWAY_MODEL_PATH"]["value"]
            assert any(model_path.startswith(p) for p in mounts if p.startswith("/models"))
            shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
            assert shm["medium"] == "Memory"
            assert "GATEWAY_ROUTES_FILE" not in env
        else:
            assert env["GATEWAY_DEVICE"]["value"] == "cpu"
            assert "GATEWAY_MODEL_PATH" not in env
            routes_dir = str(Path(env["GATEWAY_ROUTES_FILE"]["value"]).parent)
            assert volumes[mounts[routes_dir]["name"]]["configMap"]["name"] == f"{FULLNAME}-routes"
        # The drain: a preStop pause, then GATEWAY_SHUTDOWN_GRACE_S inside the grace period.
        grace = float(env["GATEWAY_SHUTDOWN_GRACE_S"]["value"])
        pre_stop = c.get("lifecycle", {}).get("preStop", {})
        pause = pre_stop.get("sleep", {}).get("seconds") or (
            int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0
        )
        assert pause > 0
        assert spec["terminationGracePeriodSeconds"] > pause + grace
        annotations = next(
            w["spec"]["template"]["metadata"]["annotations"]
            for w in r.workloads()
            if w["spec"]["template"]["spec"] is spec
        )
        assert {"checksum/config", "checksum/secrets"} <= set(annotations)
    if mode != "upstream":
        engine = next(w for w in r.of_kind("Deployment") if component(w) in ("server", "engine"))
        assert engine["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_references_resolve(rendered: dict[str, Rendered], scenario: str) -> None:
    """Every Secret/ConfigMap a pod uses is rendered here or named in values as existing."""
    r = rendered[scenario]
    existing = {
        r.values.get("secrets", {}).get("existingSecret"),
        r.values.get("redis", {}).get("external", {}).get("existingSecret"),
    } - {None, ""}
    for _, spec in pod_specs(r):
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in existing or r.has("Secret", ref["name"]), ref
                    if r.has("Secret", ref["name"]):
                        assert ref["key"] in r.get("Secret", ref["name"])["data"]
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert r.has("ConfigMap", v["configMap"]["name"])
        assert spec["serviceAccountName"] == FULLNAME and r.has("ServiceAccount", FULLNAME)
    for svc in r.of_kind("Service"):
        selector = svc["spec"]["selector"]
        assert any(
            selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in r.workloads()
        ), svc["metadata"]["name"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_plain_secrets_in_pod_specs(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    for comp, _, c in gateway_containers(r):
        env = env_of(c)
        url = env["GATEWAY_REDIS_URL"]["value"]
        assert re.match(r"^rediss?://", url)
        names = [e["name"] for e in c["env"]]
        if "$(REDIS_PASSWORD)" in url:
            assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
            assert names.index("REDIS_PASSWORD") < names.index("GATEWAY_REDIS_URL")
        userinfo = url.split("//", 1)[1].rpartition("@")[0]
        assert ":" not in userinfo or userinfo.endswith(":$(REDIS_PASSWORD)"), url
        for e in c["env"]:
            assert "value" not in e or not re.search(r"sk-[A-Za-z0-9]{20,}", e["value"]), comp


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_policy_configmap_holds_the_shipped_policies(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    data = r.get("ConfigMap", f"{FULLNAME}-policies")["data"]
    overrides = r.values.get("policies", {}).get("files", {})
    for path in sorted((CHART_DIR / "files" / "policies").glob("*.yaml")):
        if path.name not in overrides:
            assert data[path.name] == path.read_text(), path.name
    for name, content in overrides.items():
        got = data[name] if isinstance(content, str) else yaml.safe_load(data[name])
        assert got == content


# --- per-scenario specifics ---------------------------------------------------------------------


def test_defaults_combined_with_bundled_redis(rendered: dict[str, Rendered]) -> None:
    r = rendered["defaults"]
    deployments = r.of_kind("Deployment")
    assert [d["metadata"]["name"] for d in deployments] == [FULLNAME]
    assert deployments[0]["spec"]["replicas"] == 1
    assert not r.of_kind("HorizontalPodAutoscaler")
    redis = r.get("StatefulSet", f"{FULLNAME}-redis")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"] == "redis:7.4.2-alpine"
    assert "volumeClaimTemplates" not in redis["spec"]
    secret = r.get("Secret", FULLNAME)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    plain = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(plain) == {"admin-token", "key-secret", "bootstrap-key"}
    assert re.fullmatch(r"sk-[A-Za-z0-9]{20,}", plain["bootstrap-key"])
    assert len(plain["admin-token"]) >= 32 and len(plain["key-secret"]) >= 32
    env = env_of(deployments[0]["spec"]["template"]["spec"]["containers"][0])
    assert (
        env["GATEWAY_REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    )
    assert env["GATEWAY_MODEL_PATH"]["value"] == "/models"
    weights = next(
        v for v in deployments[0]["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights"
    )
    assert weights["persistentVolumeClaim"] == {"claimName": "llama-weights", "readOnly": True}
    assert r.get("PodDisruptionBudget", FULLNAME)["spec"]["maxUnavailable"] == 1
    assert not r.of_kind("Ingress") and not r.of_kind("NetworkPolicy")
    assert not r.of_kind("ServiceMonitor")
    # NOTES.txt: the first curl, with the bootstrap key from the Secret.
    assert "curl" in r.notes and "Authorization: Bearer $API_KEY" in r.notes
    assert f"get secret {FULLNAME} -o jsonpath='{{.data.bootstrap-key}}'" in r.notes
    assert "60-90 s" in r.notes


def test_external_redis_with_existing_secrets(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-redis-existing-secret"]
    assert not r.of_kind("StatefulSet") and not r.of_kind("Secret")
    c = r.get("Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert (
        env["GATEWAY_REDIS_URL"]["value"]
        == "rediss://:$(REDIS_PASSWORD)@redis.data.svc.cluster.local:6380/2"
    )
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-auth",
        "key": "password",
    }
    for name, key in (
        ("GATEWAY_ADMIN_TOKEN", "admin-token"),
        ("GATEWAY_KEY_SECRET", "key-secret"),
        ("GATEWAY_BOOTSTRAP_KEY", "bootstrap-key"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "gateway-secrets", "key": key}
    assert "gateway-secrets" in r.notes


def test_external_redis_host_port_tls_user(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-redis-host-port"]
    env = env_of(r.get("Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0])
    assert (
        env["GATEWAY_REDIS_URL"]["value"]
        == "rediss://gateway:$(REDIS_PASSWORD)@redis.example.internal:6380/3"
    )
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert env["GATEWAY_REDIS_FAILURE_MODE"]["value"] == "open"
    assert env["GATEWAY_DEFAULT_RPM"]["value"] == "600"
    assert env["GATEWAY_DEFAULT_TPM"]["value"] == "1000000"
    assert json.loads(env["GATEWAY_IMAGE_FETCH_ALLOW"]["value"]) == ["10.0.0.0/8"]
    assert "GATEWAY_DEFAULT_MAX_CONCURRENCY" not in env


def test_bundled_redis_with_pvc_and_hostpath_weights(rendered: dict[str, Rendered]) -> None:
    r = rendered["bundled-redis-pvc"]
    sts = r.get("StatefulSet", f"{FULLNAME}-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Gi"
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert not any(v["name"] == "data" for v in sts["spec"]["template"]["spec"]["volumes"])
    assert r.has("Service", f"{FULLNAME}-redis")
    assert "redis-password" in r.get("Secret", f"{FULLNAME}-redis")["data"]
    spec = r.get("Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "nodeAffinity" in spec["affinity"]
    weights = next(v for v in spec["volumes"] if v["name"] == "weights")
    assert weights["hostPath"] == {"path": "/mnt/models", "type": "Directory"}
    c = spec["containers"][0]
    assert env_of(c)["GATEWAY_MODEL_PATH"]["value"] == "/models/llama-11b"
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    # Extra env replaces the chart's entries of the same name (no duplicates) or adds new ones.
    env = env_of(c)
    assert env["GATEWAY_MAX_BODY_BYTES"]["value"] == "50000000"
    assert env["GATEWAY_LOG_LEVEL"]["value"] == "debug"
    assert env["GATEWAY_IMAGE_FETCH_TIMEOUT_S"]["value"] == "2.5"
    assert env["GATEWAY_DEFAULT_POLICY"]["value"] == "audit"
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert spec["terminationGracePeriodSeconds"] == 5 + 60 + 10


def test_split_gateway_and_engine_with_hpa(rendered: dict[str, Rendered]) -> None:
    r = rendered["split-hpa"]
    gateway = r.get("Deployment", f"{FULLNAME}-gateway")
    engine = r.get("Deployment", f"{FULLNAME}-engine")
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    assert engine["spec"]["replicas"] == 2
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = r.get("HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-gateway",
    }
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert r.get("Service", FULLNAME)["spec"]["selector"]["app.kubernetes.io/component"] == (
        "gateway"
    )
    engine_svc = r.get("Service", f"{FULLNAME}-engine")
    assert engine_svc["spec"]["selector"]["app.kubernetes.io/component"] == "engine"
    routes = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-routes")["data"]["routes.yaml"])
    (route,) = routes["routes"]
    assert route["model"] == "meta-llama/llama-3.2-11b-vision-instruct"
    assert route["api_base"] == f"http://{FULLNAME}-engine.{NAMESPACE}.svc:8000/v1"
    gw = gateway["spec"]["template"]["spec"]["containers"][0]
    assert gw["image"].endswith(":0.1.0-cpu")
    assert engine["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cuda")
    # Weights copied by an init container from a volume into a pod-local emptyDir.
    espec = engine["spec"]["template"]["spec"]
    (init,) = espec["initContainers"]
    init_env = env_of(init)
    assert init_env["SRC"]["value"] == "/source/Llama-3.2-11B-Vision-Instruct"
    assert init_env["DST"]["value"] == "/models/Llama-3.2-11B-Vision-Instruct"
    assert env_of(espec["containers"][0])["GATEWAY_MODEL_PATH"]["value"] == init_env["DST"]["value"]
    volumes = {v["name"]: v for v in espec["volumes"]}
    assert volumes["weights-source"]["persistentVolumeClaim"] == {"claimName": "weights-rwx"}
    assert volumes["weights"]["emptyDir"]["sizeLimit"] == "60Gi"
    assert {p["metadata"]["name"] for p in r.of_kind("PodDisruptionBudget")} == {
        f"{FULLNAME}-engine",
        f"{FULLNAME}-gateway",
    }


def test_upstream_mode_is_cpu_only(rendered: dict[str, Rendered]) -> None:
    r = rendered["upstream-cpu-only"]
    assert [d["metadata"]["name"] for d in r.of_kind("Deployment")] == [f"{FULLNAME}-gateway"]
    assert r.get("Deployment", f"{FULLNAME}-gateway")["spec"]["replicas"] == 3
    assert not r.of_kind("HorizontalPodAutoscaler") and not r.of_kind("StatefulSet")
    routes = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-routes")["data"]["routes.yaml"])
    assert routes == SCENARIOS["upstream-cpu-only"]["routes"]["config"]
    spec = r.get("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    assert "tolerations" not in spec and "runtimeClassName" not in spec
    assert all(v["name"] != "dshm" for v in spec["volumes"])
    env = env_of(spec["containers"][0])
    assert env["GATEWAY_REDIS_URL"]["value"] == "redis://redis-master:6379/0"
    assert "REDIS_PASSWORD" not in env


def test_ingress_networkpolicy_servicemonitor(rendered: dict[str, Rendered]) -> None:
    r = rendered["ingress-networkpolicy-servicemonitor"]
    ingress = r.get("Ingress", FULLNAME)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-tls"
    assert "https://llm.example.com" in r.notes
    policies = {p["metadata"]["name"]: p for p in r.of_kind("NetworkPolicy")}
    assert set(policies) == {f"{FULLNAME}-gateway", f"{FULLNAME}-engine", f"{FULLNAME}-redis"}
    engine_from = policies[f"{FULLNAME}-engine"]["spec"]["ingress"][0]["from"]
    assert engine_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert len(engine_from) == 2  # the gateway and the metrics scrapers
    # The ServiceMonitor is a custom resource: no Kubernetes schema, so a check of its own.
    (sm,) = r.of_kind("ServiceMonitor")
    check_service_monitor(sm, r)


SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace", "labels"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object"},
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["key", "operator"],
                                "additionalProperties": False,
                                "properties": {
                                    "key": {"type": "string"},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port", "path"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def check_service_monitor(sm: dict[str, Any], r: Rendered) -> None:
    import jsonschema

    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # It selects the gateway and engine Services (on their `http` port), not Redis.
    selector = sm["spec"]["selector"]
    (expr,) = selector["matchExpressions"]
    selected = [
        s
        for s in r.of_kind("Service")
        if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["labels"].get(expr["key"]) in expr["values"]
    ]
    assert {s["metadata"]["name"] for s in selected} == {FULLNAME, f"{FULLNAME}-engine"}
    for s in selected:
        assert any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])


def test_extra_policy_files_are_added(rendered: dict[str, Rendered]) -> None:
    data = rendered["ingress-networkpolicy-servicemonitor"].get(
        "ConfigMap", f"{FULLNAME}-policies"
    )["data"]
    assert data["team-a.yaml"] == "name: team-a\nextends: strict\n"
    assert yaml.safe_load(data["default.yaml"]) == {"name": "default", "version": "2"}


def test_chart_policies_match_the_project_policies() -> None:
    """The chart ships a copy of policies/*.yaml; refresh it with
    `cp policies/*.yaml helm/llama-gateway/files/policies/` when the policies change."""
    project = {p.name: p.read_text() for p in (REPO_ROOT / "policies").glob("*.yaml")}
    if not project:
        pytest.skip("the project ships no policies/*.yaml")
    chart_copy = {p.name: p.read_text() for p in (CHART_DIR / "files" / "policies").glob("*.yaml")}
    assert chart_copy == project


def test_config_changes_roll_pods_but_policy_edits_do_not(render) -> None:  # type: ignore[no-untyped-def]
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        r = render(values)
        return r.get("Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]

    base = annotations({})
    assert annotations({}) == base  # deterministic, even though generated secrets are random
    assert (
        annotations({"config": {"logLevel": "debug"}})["checksum/config"] != base["checksum/config"]
    )
    assert (
        annotations({"secrets": {"existingSecret": "other"}})["checksum/secrets"]
        != base["checksum/secrets"]
    )
    policy_edit = annotations({"policies": {"files": {"extra.yaml": "name: extra\n"}}})
    assert policy_edit == base


def test_split_mode_routes_change_rolls_the_gateway(render) -> None:  # type: ignore[no-untyped-def]
    def checksum(values: dict[str, Any]) -> str:
        r = render({"mode": "split", **values})
        d = r.get("Deployment", f"{FULLNAME}-gateway")
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    custom = {"routes": {"config": {"routes": [{"model": "x", "api_base": "http://y/v1"}]}}}
    assert checksum({}) != checksum(custom)


# --- secrets are generated once and kept (Helm's lookup, against a fake API server) -------------


def test_generated_secrets_survive_an_upgrade(render, render_live, fake_kube) -> None:  # type: ignore[no-untyped-def]
    """Install renders new secrets; an upgrade's render, whose `lookup` sees the live Secrets
    (served by a fake Kubernetes API), keeps every value byte for byte."""
    first = render({})
    app = first.get("Secret", FULLNAME)["data"]
    redis = first.get("Secret", f"{FULLNAME}-redis")["data"]
    assert render({}).get("Secret", FULLNAME)["data"] != app  # offline: nothing to keep
    fake_kube.put_secret(NAMESPACE, FULLNAME, app)
    fake_kube.put_secret(NAMESPACE, f"{FULLNAME}-redis", redis)
    for _ in range(2):
        upgrade = render_live({"config": {"logLevel": "debug"}})
        assert upgrade.get("Secret", FULLNAME)["data"] == app
        assert upgrade.get("Secret", f"{FULLNAME}-redis")["data"] == redis
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{FULLNAME}" in fake_kube.requests
    # The pods' secret checksum does not move either: no needless rollout of GPU pods.
    live = upgrade.get("Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]
    offline = first.get("Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]
    assert live["checksum/secrets"] == offline["checksum/secrets"]


def test_a_missing_key_is_generated_and_the_others_kept(render_live, fake_kube) -> None:  # type: ignore[no-untyped-def]
    fake_kube.put_plain_secret(
        NAMESPACE, FULLNAME, {"admin-token": "admin-kept", "key-secret": "secret-kept"}
    )
    data = render_live({}).get("Secret", FULLNAME)["data"]
    plain = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert plain["admin-token"] == "admin-kept" and plain["key-secret"] == "secret-kept"
    assert re.fullmatch(r"sk-[A-Za-z0-9]{20,}", plain["bootstrap-key"])


def test_rotating_an_existing_secret_rolls_the_pods(render_live, fake_kube) -> None:  # type: ignore[no-untyped-def]
    values = {"secrets": {"existingSecret": "gateway-secrets"}}
    fake_kube.put_plain_secret(NAMESPACE, "gateway-secrets", {"admin-token": "one"})

    def checksum() -> str:
        d = render_live(values).get("Deployment", FULLNAME)
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]

    before = checksum()
    assert checksum() == before
    fake_kube.put_plain_secret(NAMESPACE, "gateway-secrets", {"admin-token": "two"})
    assert checksum() != before


# --- the values schema refuses bad values, naming them -------------------------------------------

BAD_VALUES = [
    pytest.param({"engine": {"gpus": "two"}}, "/engine/gpus", id="wrong-type"),
    pytest.param({"engine": {"gpuCount": 2}}, "gpuCount", id="unknown-key"),
    pytest.param({"replicaCount": 2}, "replicaCount", id="unknown-top-level-key"),
    pytest.param({"mode": "hybrid"}, "/mode", id="unknown-mode"),
    pytest.param({"image": {"cuda": {"tag": "latest"}}}, "/image/cuda/tag", id="latest-tag"),
    pytest.param({"image": {"cpu": {"tag": ""}}}, "/image/cpu/tag", id="untagged"),
    pytest.param(
        {"redis": {"external": {"url": "redis://:hunter2@redis:6379/0"}}},
        "/redis/external/url",
        id="password-in-url",
    ),
    pytest.param({"redis": {"mode": "external"}}, "/redis/external", id="external-without-host"),
    pytest.param({"mode": "upstream"}, "/routes/config", id="upstream-without-routes"),
    pytest.param({"config": {"defaultRpm": 0}}, "/config/defaultRpm", id="zero-rpm"),
    pytest.param({"config": {"logLevel": "loud"}}, "/config/logLevel", id="log-level"),
    pytest.param({"policies": {"files": {"../x.yaml": "a"}}}, "../x.yaml", id="policy-name"),
    # null removes a default in Helm; resources must stay on every container.
    pytest.param({"engine": {"resources": {"limits": None}}}, "/engine/resources", id="no-limits"),
    pytest.param(
        {"securityContext": {"runAsNonRoot": False}},
        "/securityContext/runAsNonRoot",
        id="root-container",
    ),
    pytest.param({"podSecurityContext": None}, "podSecurityContext", id="no-pod-security"),
    pytest.param({"model": {"source": "copy"}}, "/model/copy", id="copy-without-volume"),
    pytest.param({"termination": {"preStop": "wait"}}, "/termination/preStop", id="prestop"),
    pytest.param({"engine": {"startupProbe": {"path": "/x"}}}, "path", id="probe-path-is-fixed"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES)
def test_schema_refuses_bad_values(chart, values: dict[str, Any], named: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert named in str(err.value)


def test_render_refuses_bad_values_too(chart) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(helm.HelmValuesError, match="gpuCount"):
        chart.render({"engine": {"gpuCount": 2}}, name=RELEASE, namespace=NAMESPACE)


def test_every_scenario_passes_the_schema(chart) -> None:  # type: ignore[no-untyped-def]
    for values in SCENARIOS.values():
        chart.validate_schema(values)


def test_schema_is_closed_everywhere_practical() -> None:
    """additionalProperties: false on every object the chart defines (Kubernetes pass-through
    objects such as affinity or a volume source are typed by Kubernetes, not here)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("$comment", "").startswith("A Kubernetes type"):
            return
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                open_objects.append(path or "/")
            for key, child in node["properties"].items():
                walk(child, f"{path}/{key}")
        items = node.get("items")
        if isinstance(items, dict):
            walk(items, f"{path}[]")

    walk(schema, "")
    assert open_objects == []


# --- documentation ------------------------------------------------------------------------------


def schema_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        kubernetes_type = child.get("$comment", "").startswith("A Kubernetes type")
        if child.get("type") == "object" and "properties" in child and not kubernetes_type:
            paths.extend(schema_paths(child, path + "."))
    return paths


def test_readme_documents_every_value() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    readme = (CHART_DIR / "README.md").read_text()
    missing = [p for p in schema_paths(schema) if f"`{p}`" not in readme]
    assert missing == []


def test_values_yaml_and_schema_agree(chart) -> None:  # type: ignore[no-untyped-def]
    """Every key of values.yaml is in the schema (and the defaults pass it)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    known = set(schema_paths(schema))
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node and f"{prefix}".rstrip(".") not in _FREE_FORM:
            out = []
            for key, child in node.items():
                out.extend(leaves(child, f"{prefix}{key}."))
            return out
        return [prefix.rstrip(".")]

    assert [p for p in leaves(values) if p not in known] == []
    chart.validate_schema({})


_FREE_FORM = {
    "podSecurityContext",
    "securityContext",
    "redis.bundled.podSecurityContext",
    "redis.bundled.securityContext",
    "engine.resources",
    "gateway.resources",
    "redis.bundled.resources",
    "model.copy.resources",
}


def test_audit_retention_values_reach_every_gateway(render) -> None:  # type: ignore[no-untyped-def]
    for values, expected in (
        ({}, ("true", "100000", "604800")),
        (
            {"config": {"audit": {"enabled": False, "maxEntries": 5000, "maxAgeSeconds": 3600}}},
            ("false", "5000", "3600"),
        ),
    ):
        r = render(values)
        containers = gateway_containers(r)
        assert containers
        for _, _, c in containers:
            env = env_of(c)
            got = tuple(
                env[name]["value"]
                for name in (
                    "GATEWAY_AUDIT_ENABLED",
                    "GATEWAY_AUDIT_MAX_ENTRIES",
                    "GATEWAY_AUDIT_MAX_AGE_S",
                )
            )
            assert got == expected
