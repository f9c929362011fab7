"""Fixtures for the Helm chart tests: the chart loaded through Helm's own Go SDK, rendering into
parsed objects, and a tiny fake Kubernetes API server that answers Helm's `lookup`.

No helm binary is needed: `helm-python-sdk` (import `helm_python`) bundles Helm's SDK, and
`kubernetes-validate` carries the Kubernetes OpenAPI schemas. test_chart.py skips when they are
missing, except in CI (CI=true), where a missing package is an error.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import helm_python as helm
except ImportError:  # test_chart.py skips (or fails in CI)
    helm = None

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "llama-gateway"
RELEASE = "rel"
NAMESPACE = "ai"


@dataclass
class Rendered:
    """One render: the objects by (kind, name), in order, and NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(
            f"no {kind} {name}; have {[(o['kind'], o['metadata']['name']) for o in self.objects]}"
        )

    def has(self, kind: str, name: str) -> bool:
        return any(o["kind"] == kind and o["metadata"]["name"] == name for o in self.objects)

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")]


def parse(manifests: dict[str, str], values: dict[str, Any]) -> Rendered:
    objects: list[dict[str, Any]] = []
    notes = ""
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(objects=objects, notes=notes, values=values)


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any):  # type: ignore[no-untyped-def]
    """render(values) -> Rendered, offline (`lookup` finds nothing)."""

    def _render(values: dict[str, Any] | None = None) -> Rendered:
        values = values or {}
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        return parse(manifests, values)

    return _render


@dataclass
class FakeKubeAPI:
    """Just enough of a Kubernetes API server for Helm's `lookup` of v1 Secrets."""

    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Store a Secret; `data` values are base64 already (as in a rendered manifest)."""
        self.secrets[(namespace, name)] = dict(data)

    def put_plain_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.put_secret(
            namespace, name, {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        )

    @property
    def kubeconfig(self) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}
                ],
                "users": [{"name": "fake", "user": {"token": "test"}}],
                "contexts": [
                    {
                        "name": "fake",
                        "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE},
                    }
                ],
                "current-context": "fake",
            }
        )


def _handler(api: FakeKubeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            api.requests.append(path)
            parts = path.strip("/").split("/")
            if path == "/api":
                self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
            elif path == "/apis":
                self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            elif path == "/api/v1":
                resource = {
                    "name": "secrets",
                    "singularName": "secret",
                    "namespaced": True,
                    "kind": "Secret",
                    "verbs": ["get", "list"],
                }
                self._send(
                    200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [resource]}
                )
            elif (
                len(parts) == 6
                and parts[:3] == ["api", "v1", "namespaces"]
                and parts[4] == "secrets"
            ):
                namespace, name = parts[3], parts[5]
                data = api.secrets.get((namespace, name))
                if data is None:
                    self._send(404, _not_found(name))
                else:
                    self._send(
                        200,
                        {
                            "apiVersion": "v1",
                            "kind": "Secret",
                            "metadata": {"name": name, "namespace": namespace},
                            "type": "Opaque",
                            "data": data,
                        },
                    )
            else:
                self._send(404, _not_found(path))

    return Handler


def _not_found(name: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "message": f"{name} not found",
        "code": 404,
    }


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeAPI]:
    """A fake API server on a free loopback port, stopped after the test."""
    api = FakeKubeAPI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def render_live(chart: Any, fake_kube: FakeKubeAPI):  # type: ignore[no-untyped-def]
    """render_live(values) -> Rendered, with `lookup` answered by the fake API server."""

    def _render(values: dict[str, Any] | None = None) -> Rendered:
        values = values or {}
        with helm.Config(kubeconfig_content=fake_kube.kubeconfig, namespace=NAMESPACE) as cfg:
            manifests = cfg.render(chart, values, name=RELEASE, namespace=NAMESPACE)
        return parse(manifests, values)

    return _render
