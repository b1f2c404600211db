"""deploy/kubernetes/agent-daemonset.yaml: the agent's DaemonSet, its RBAC and the enrollment Secret fit the code.

The RBAC rules are checked against what fleetctl/fleet/kube_nodes.py calls (``AGENT_RBAC``,
``CONTROLLER_RBAC``), the container's arguments are parsed by the real ``fleet-agent`` parser, and every path the
agent is told to use is a mounted host path. ``kubectl apply --dry-run=client`` against the recorded API server is
tests/integration/kubernetes/test_agent_manifest.py."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetctl.agent.main import COMMAND_MODULES
from fleetctl.fleet.cli import build_parser
from fleetctl.fleet.kube_nodes import AGENT_RBAC, CONTROLLER_RBAC

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "agent-daemonset.yaml"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict[str, Any]]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    for doc in loaded:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in loaded}
    assert len(by_key) == len(loaded), "two documents of one kind share a name"
    return by_key


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def bound_role(docs: dict[tuple[str, str], dict[str, Any]], account: str) -> dict[str, Any]:
    bindings = [d for (kind, _), d in docs.items() if kind == "ClusterRoleBinding"
                and {"kind": "ServiceAccount", "name": account, "namespace": "fleetctl"} in d["subjects"]]
    assert len(bindings) == 1, f"service account {account} should be bound to one ClusterRole"
    return docs[("ClusterRole", bindings[0]["roleRef"]["name"])]


def test_rbac_grants_exactly_what_the_code_calls(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert ("ServiceAccount", "fleet-agent") in docs and ("ServiceAccount", "fleet-controller") in docs
    assert rules_of(bound_role(docs, "fleet-agent")) == set(AGENT_RBAC)
    assert rules_of(bound_role(docs, "fleet-controller")) == set(CONTROLLER_RBAC)
    # a drain evicts (PodDisruptionBudgets apply); deleting pods outright would bypass them
    assert not any(res == "pods" and verb == "delete" for _, res, verb in rules_of(bound_role(docs, "fleet-agent")))


def test_daemonset_runs_the_agent_with_what_it_needs(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    ds = docs[("DaemonSet", "fleet-agent")]
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == "fleet-agent"
    assert pod["runtimeClassName"] == "nvidia" and pod["hostPID"] is True
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    # seeing the GPUs through the runtime, never by requesting them: a request would take them from workloads
    for section in ("requests", "limits"):
        assert not any(k.startswith("nvidia.com/") for k in container["resources"].get(section, {}))

    # the real fleet-agent parser accepts the arguments ($(VAR) expanded as the kubelet does)
    values = {name: e.get("value", f"<{name}>") for name, e in env.items()}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in [*container["command"][1:],
                                                                             *container["args"]]]
    parser = build_parser("fleet-agent", "", [importlib.import_module(m) for m in COMMAND_MODULES])
    args = parser.parse_args(argv)
    assert args.command == "run" and args.hostname == "<NODE_NAME>"
    assert args.scheduler == "kubernetes" and args.kubeconfig is None  # the pod's service account

    # every path the agent writes or reads is mounted, host paths at the same path as on the node
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (args.state_dir, args.node_state_dir, Path(args.python).parents[2]):
        volume = volumes[mounts[str(path)]]
        assert volume["hostPath"]["path"] == str(path), path
    secret_volume = volumes[mounts[str(args.ca.parent)]]["secret"]["secretName"]
    secret = docs[("Secret", secret_volume)]
    assert args.ca.name in secret["stringData"]
    assert env["FLEET_AGENT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_volume, "key": "token"}
