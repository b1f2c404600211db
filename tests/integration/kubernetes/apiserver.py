"""A recorded-request Kubernetes API server for the tests: a real HTTP server on a loopback socket that answers
exactly the requests fleetctl makes (read/patch a node, list a node's pods, evict a pod) the way kube-apiserver
does, and records every request for the test to assert the sequence.

Why not the real one: no kube-apiserver can run on the project's machines (docs/deploy.md, "Kubernetes": kind
and k3s need a container runtime, Debian 12 packages etcd but not kube-apiserver, and no package registry we can
reach ships the envtest binaries). What this server does the real one also does, as far as fleetctl relies on it:

- it speaks HTTPS with its own certificate, named in the kubeconfig it writes (kubectl sends no credentials
  over plain HTTP), and requests carry the kubeconfig's bearer token (401 without it);
- a PATCH is merged by its content type: strategic merge (``null`` deletes a key); a JSON object sent as
  ``application/json-patch+json`` (the client's default content type for PATCH) is refused with 400 as
  kube-apiserver refuses it;
- an eviction of a pod whose PodDisruptionBudget allows no disruption is answered 429 (``refusals`` times);
  an evicted pod lingers ``terminating_lists`` pod lists before it is gone, like a pod in its grace period;
- a missing node or pod is 404 with a ``Status`` body;
- discovery (``/api``, ``/apis``, each group version's resource list) names the resources fleetctl's manifest
  uses (deploy/kubernetes/agent-daemonset.yaml) with their real kinds, groups and scopes, so that ``kubectl
  apply --dry-run=client`` maps every document of the manifest as it would against a cluster.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN = "recorded-test-token"
# group version -> (resource, kind, namespaced), as kube-apiserver's discovery lists them
RESOURCES = {
    "v1": [("namespaces", "Namespace", False), ("nodes", "Node", False), ("pods", "Pod", True),
           ("secrets", "Secret", True), ("serviceaccounts", "ServiceAccount", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False)],
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any

    @property
    def call(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class FakePod:
    namespace: str
    name: str
    node: str
    owner_kind: str | None = None  # "DaemonSet", "ReplicaSet"...
    mirror: bool = False
    phase: str = "Running"
    refusals: int = 0  # evictions answered 429 (PodDisruptionBudget) before one is accepted
    terminating_lists: int = 1  # pod lists that still show it after its eviction
    evicted: bool = False

    @property
    def uid(self) -> str:
        return f"uid-{self.namespace}-{self.name}"

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        if self.owner_kind:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": self.owner_kind, "name": f"{self.name}-owner",
                                        "uid": f"owner-{self.uid}", "controller": True}]
        if self.mirror:
            meta["annotations"] = {"kubernetes.io/config.mirror": "abc"}
        if self.evicted:
            meta["deletionTimestamp"] = "2026-12-03T00:00:00Z"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": self.node, "containers": [
            {"name": "main", "image": "busybox"}]}, "status": {"phase": self.phase}}


@dataclass
class ClusterState:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[FakePod] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_node(self, name: str, *, unschedulable: bool = False, labels: dict[str, str] | None = None) -> None:
        spec: dict[str, Any] = {"unschedulable": True} if unschedulable else {}
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name, "uid": f"node-{name}", "labels": dict(labels or {})},
                            "spec": spec}

    def calls(self) -> list[str]:
        with self.lock:
            return [r.call for r in self.requests]


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """The subset of strategic merge fleetctl's patches use: maps merge key by key, ``null`` deletes."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, dict):
            target[key] = {}
            strategic_merge(target[key], value)
        else:
            target[key] = value


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def _discovery(path: str) -> dict[str, Any] | None:
    if path == "/version":
        return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-recorded"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = [gv.split("/")[0] for gv in RESOURCES if "/" in gv]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]}
    group_version = path.removeprefix("/api/").removeprefix("/apis/")
    if path.startswith(("/api/", "/apis/")) and group_version in RESOURCES:
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
            {"name": name, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
            for name, kind, namespaced in RESOURCES[group_version]]}
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type", "")
        body = json.loads(raw) if raw else None
        with state.lock:
            state.requests.append(Recorded(self.command, parts.path, parse_qs(parts.query), content_type, body))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            code, answer = self._route(state, parts.path, parse_qs(parts.query), content_type, body)
        self._send(code, answer)

    def _route(self, state: ClusterState, path: str, query: dict[str, list[str]], content_type: str,
               body: Any) -> tuple[int, dict[str, Any]]:
        found = _discovery(path)
        if found is not None:
            return 200, found
        segments = path.strip("/").split("/")
        if segments[:3] == ["api", "v1", "nodes"] and len(segments) == 4:
            node = state.nodes.get(segments[3])
            if node is None:
                return 404, _status(404, "NotFound", f'nodes "{segments[3]}" not found')
            if self.command == "GET":
                return 200, node
            if self.command == "PATCH":
                if content_type != "application/strategic-merge-patch+json" or not isinstance(body, dict):
                    return 400, _status(400, "BadRequest",
                                        "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
                strategic_merge(node, body)
                return 200, node
        if path == "/api/v1/pods" and self.command == "GET":
            selector = query.get("fieldSelector", [""])[0]
            node_name = selector.removeprefix("spec.nodeName=")
            items = []
            for pod in list(state.pods):
                if pod.node != node_name:
                    continue
                if pod.evicted:
                    if pod.terminating_lists <= 0:
                        state.pods.remove(pod)
                        continue
                    pod.terminating_lists -= 1
                items.append(pod.to_json())
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if (len(segments) == 7 and segments[:3] == ["api", "v1", "namespaces"] and segments[4] == "pods"
                and segments[6] == "eviction" and self.command == "POST"):
            ns, name = segments[3], segments[5]
            if not isinstance(body, dict) or body.get("kind") != "Eviction" or body.get("apiVersion") != "policy/v1":
                return 400, _status(400, "BadRequest", "Object 'Kind' is missing in the request body")
            target = next((p for p in state.pods if p.namespace == ns and p.name == name), None)
            if target is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            if target.refusals > 0:
                target.refusals -= 1
                return 429, _status(429, "TooManyRequests",
                                    "Cannot evict pod as it would violate the pod's disruption budget.")
            target.evicted = True
            return 201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}
        return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _handle


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1 (the server's own CA, as kubeadm's is for a cluster)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver (recorded)")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = directory / "apiserver.key", directory / "apiserver.crt"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ClusterState, key_file: Path, cert_file: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.socket = context.wrap_socket(self.socket, server_side=True)


@dataclass
class RunningApiServer:
    url: str
    state: ClusterState
    ca_file: Path

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this server, as ``kubectl config view --raw`` would write it."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca_file.read_bytes()).decode()}}],
            "users": [{"name": "fleetctl", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "fleetctl"}}]}))
        return path

    def node(self, name: str) -> dict[str, Any]:
        with self.state.lock:
            return copy.deepcopy(self.state.nodes[name])


@contextmanager
def running_apiserver(state: ClusterState, directory: Path) -> Iterator[RunningApiServer]:
    """The server on a free loopback port, its key and certificate written to ``directory``."""
    key_file, cert_file = self_signed(directory)
    server = _Server(state, key_file, cert_file)
    thread = threading.Thread(target=server.serve_forever, name="recorded-kube-apiserver", daemon=True)
    thread.start()
    try:
        yield RunningApiServer(f"https://127.0.0.1:{server.server_address[1]}", state, cert_file)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
