"""Kubernetes nodes through the official Python client: cordon, drain, uncordon, and our node labels.

Both sides talk to the API server: the agent cordons and drains its own node around a disturbing step
(``agent/kubernetes_hook.py``), the controller publishes what it decided about a node as labels after a
verification (``controller/kubernetes_labels.py``). This module is the one place that speaks the API; the
``kubernetes`` package is an optional dependency (``pip install 'fleetctl[kubernetes]'``) imported only when a
``KubernetesNode`` is connected.

Drain follows ``kubectl drain``: every pod bound to the node is evicted through the Eviction API (so the API
server enforces PodDisruptionBudgets: a 429 answer means "not now", and the eviction is retried until the drain
timeout), except DaemonSet pods (their controller would put them straight back, and the fleet agent is one)
and static (mirror) pods (the kubelet owns them); pods that already finished are left alone. Then it waits until
the evicted pods are gone.

A node is cordoned by fleetctl only when it was schedulable: the annotation ``fleetctl.io/cordoned-by`` marks
that we did it, so ``uncordon`` (also after an agent restart in the middle of a step) never lifts a cordon an
operator set.

Labels follow the GPU Operator's style (``nvidia.com/gpu.product=…``) under our own prefix ``fleetctl.io/``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetctl.fleet.errors import FleetError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, V1Pod

log = logging.getLogger(__name__)

LABEL_PREFIX = "fleetctl.io/"
LABEL_FLASH_ATTN_VERSION = LABEL_PREFIX + "flash-attn-version"
LABEL_VERIFIED = LABEL_PREFIX + "verified"
LABEL_VERIFICATION = LABEL_PREFIX + "verification"
LABEL_RECOMMENDED_ATTENTION = LABEL_PREFIX + "recommended-attention"
LABEL_SIMULATED = LABEL_PREFIX + "simulated"
CORDONED_BY = LABEL_PREFIX + "cordoned-by"
# the API server decides by the body's content type how a PATCH merges; a dict with the client's default
# (application/json-patch+json, which wants a list of operations) is refused with 400
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
IN_CLUSTER = "in-cluster"
# one request's limit (connect and read): an API server that accepts and never answers must not hang a step
REQUEST_TIMEOUT_S = 30.0
# (API group, resource, verb) each side calls; deploy/kubernetes/agent-daemonset.yaml grants exactly these
# (tests/unit/controller_core/test_kubernetes_manifest.py)
AGENT_RBAC = (("", "nodes", "get"), ("", "nodes", "patch"), ("", "pods", "list"), ("", "pods/eviction", "create"))
CONTROLLER_RBAC = (("", "nodes", "patch"),)

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


class KubernetesError(FleetError):
    """The Kubernetes API refused or failed a request, or a drain did not finish in time."""

    code = "kubernetes"


def label_value(text: str) -> str:
    """``text`` as a valid label value: at most 63 characters of ``[A-Za-z0-9._-]``, alphanumeric at both
    ends. A local version's ``+`` (``2.7.1+cu126``) becomes ``_``; what cannot be kept is cut."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:63].strip("._-")
    if not _LABEL_VALUE.match(value):  # unreachable by construction; a wrong label must never reach the server
        raise KubernetesError(f"cannot turn {text!r} into a label value", hint="report this as a bug")
    return value


def node_labels(*, flash_attn_version: str | None, verification: str | None,
                recommended_attention: str | None, simulated: bool) -> dict[str, str | None]:
    """Our labels for one node; ``None`` removes a label (strategic merge), so a node whose flash-attn was
    uninstalled loses its version label instead of keeping a stale one. ``verification`` is the latest
    verification's status (``pass``, ``fail``, ``regression``…); ``verified`` is ``true`` only for ``pass``."""
    return {
        LABEL_FLASH_ATTN_VERSION: label_value(flash_attn_version) if flash_attn_version else None,
        LABEL_VERIFICATION: label_value(verification) if verification else None,
        LABEL_VERIFIED: ("true" if verification == "pass" else "false") if verification else None,
        LABEL_RECOMMENDED_ATTENTION: label_value(recommended_attention) if recommended_attention else None,
        LABEL_SIMULATED: "true" if simulated else None,
    }


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pods_to_evict(pods: Sequence[V1Pod]) -> list[PodRef]:
    """The pods a drain evicts (``kubectl drain``'s choice): not DaemonSet pods, not static (mirror) pods, not
    pods that already finished."""
    chosen = []
    for pod in pods:
        meta = pod.metadata
        if meta is None or meta.name is None:
            continue
        if any(ref.kind == "DaemonSet" for ref in meta.owner_references or ()):
            continue
        if "kubernetes.io/config.mirror" in (meta.annotations or {}):
            continue
        if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
            continue
        chosen.append(PodRef(meta.namespace or "default", meta.name, meta.uid or ""))
    return chosen


@dataclass(frozen=True)
class DrainPolicy:
    """``timeout_s``: the longest a drain may take (evictions a PodDisruptionBudget refuses are retried every
    ``retry_s`` until then). Evicted pods get their own termination grace period."""

    timeout_s: float = 600.0
    retry_s: float = 5.0


def _api_error(what: str, exc: Exception) -> KubernetesError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or exc.__class__.__name__
    hint = {401: "the service account token or kubeconfig credentials are not accepted",
            403: "grant this account the RBAC rules of deploy/kubernetes/agent-daemonset.yaml (ClusterRole "
                 "fleetctl:agent for the agent, fleetctl:controller-labels for the controller)",
            404: "check that the node name (the agent's --hostname, spec.nodeName) is the Kubernetes node's"}
    return KubernetesError(f"Kubernetes API: {what} failed ({status or ''} {reason})".replace("( ", "("),
                           hint=hint.get(status or 0, "check that the API server is reachable from this host"))


class KubernetesNode:
    """One Kubernetes node, by name, through an ``ApiClient`` (``connect`` builds one)."""

    def __init__(self, api_client: ApiClient, node_name: str) -> None:
        from kubernetes import client

        self.name = node_name
        self._core = client.CoreV1Api(api_client)
        self._client = client

    @classmethod
    def connect(cls, node_name: str, credentials: str = IN_CLUSTER) -> KubernetesNode:
        """``credentials``: ``in-cluster`` (the pod's service account) or the path of a kubeconfig file."""
        try:
            from kubernetes import client, config
        except ImportError as exc:
            raise KubernetesError("the Kubernetes client is not installed",
                                  hint="pip install 'fleetctl[kubernetes]'") from exc
        configuration = client.Configuration()
        try:
            # the client's config loaders carry no annotations (the generated API and models do)
            if credentials == IN_CLUSTER:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                config.load_kube_config(config_file=str(Path(credentials)),  # type: ignore[no-untyped-call]
                                        client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise KubernetesError(f"cannot load Kubernetes credentials ({credentials}): {exc}",
                                  hint="in a pod: mount the service account token (automountServiceAccountToken);"
                                       " elsewhere: name a readable kubeconfig file") from exc
        return cls(client.ApiClient(configuration), node_name)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except (ApiException, HTTPError, OSError) as exc:
            raise _api_error(what, exc) from exc

    def _patch(self, what: str, body: dict[str, Any]) -> Any:
        return self._call(what, self._core.patch_node, self.name, body, _content_type=STRATEGIC_MERGE)

    def cordon(self, reason: str) -> bool:
        """Mark the node unschedulable; True when the cordon is ours to lift. A cordon of ours left by an agent that
        stopped before its uncordon is taken over (True, nothing written); anyone else's is left alone (False)."""
        node = self._call(f"read node {self.name}", self._core.read_node, self.name)
        if node.spec is not None and node.spec.unschedulable:
            annotations = (node.metadata.annotations if node.metadata else None) or {}
            if CORDONED_BY in annotations:
                log.info("node %s: taking over fleetctl's cordon (%s)", self.name, annotations[CORDONED_BY])
                return True
            log.info("node %s is already cordoned (not by fleetctl): leaving the cordon alone", self.name)
            return False
        self._patch(f"cordon {self.name}", {"spec": {"unschedulable": True},
                                            "metadata": {"annotations": {CORDONED_BY: reason}}})
        log.info("cordoned node %s (%s)", self.name, reason)
        return True

    def uncordon(self) -> bool:
        """Lift the cordon if fleetctl set it (the annotation says so); False when there was none of ours."""
        node = self._call(f"read node {self.name}", self._core.read_node, self.name)
        annotations = (node.metadata.annotations if node.metadata else None) or {}
        if CORDONED_BY not in annotations:
            return False
        self._patch(f"uncordon {self.name}", {"spec": {"unschedulable": None},
                                              "metadata": {"annotations": {CORDONED_BY: None}}})
        log.info("uncordoned node %s", self.name)
        return True

    def pods(self) -> list[V1Pod]:
        listed = self._call(f"list pods on {self.name}", self._core.list_pod_for_all_namespaces,
                            field_selector=f"spec.nodeName={self.name}")
        return list(listed.items or ())

    def drain(self, policy: DrainPolicy = DrainPolicy(),
              progress: Callable[[str], None] = lambda line: None) -> list[PodRef]:
        """Evict the node's pods (``pods_to_evict``) and wait until they are gone; returns them. A pod its
        PodDisruptionBudget protects is retried every ``policy.retry_s``; past ``policy.timeout_s`` the drain
        fails naming the pods still there (the node stays cordoned: the caller decides). ``progress`` gets a line
        for each wait."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        deadline = time.monotonic() + policy.timeout_s
        targets = pods_to_evict(self.pods())
        pending = list(targets)
        while pending:
            refused: list[PodRef] = []
            for pod in pending:
                body = self._client.V1Eviction(
                    api_version="policy/v1", kind="Eviction",
                    metadata=self._client.V1ObjectMeta(name=pod.name, namespace=pod.namespace),
                    delete_options=self._client.V1DeleteOptions())
                try:
                    self._core.create_namespaced_pod_eviction(pod.name, pod.namespace, body,
                                                              _request_timeout=REQUEST_TIMEOUT_S)
                    log.info("evicting %s from %s", pod, self.name)
                except (HTTPError, OSError) as exc:
                    raise _api_error(f"evict {pod}", exc) from exc
                except ApiException as exc:
                    if exc.status == 404:  # gone already
                        continue
                    if exc.status == 429:  # a PodDisruptionBudget says not now
                        refused.append(pod)
                        continue
                    raise _api_error(f"evict {pod}", exc) from exc
            pending = refused
            if pending:
                if time.monotonic() >= deadline:
                    raise KubernetesError(
                        f"drain of {self.name} timed out after {policy.timeout_s:g}s: the PodDisruptionBudget of "
                        f"{', '.join(map(str, pending))} refuses the eviction",
                        hint="scale the workload up or relax its PodDisruptionBudget, then retry the step")
                progress(f"eviction of {', '.join(map(str, pending))} refused by a PodDisruptionBudget; "
                         f"retrying in {policy.retry_s:g}s")
                time.sleep(policy.retry_s)
        if targets:
            progress(f"evicted {', '.join(map(str, targets))}; waiting until they are gone")
        self._wait_gone(targets, deadline, policy)
        return targets

    def _wait_gone(self, evicted: Sequence[PodRef], deadline: float, policy: DrainPolicy) -> None:
        uids = {pod.uid for pod in evicted}
        while True:
            left = [PodRef(p.metadata.namespace or "default", p.metadata.name or "", p.metadata.uid or "")
                    for p in self.pods() if p.metadata is not None and p.metadata.uid in uids]
            if not left:
                return
            if time.monotonic() >= deadline:
                raise KubernetesError(
                    f"drain of {self.name} timed out after {policy.timeout_s:g}s: "
                    f"{', '.join(map(str, left))} still terminating",
                    hint="check the pods' terminationGracePeriodSeconds and finalizers, then retry the step")
            time.sleep(min(policy.retry_s, 1.0))

    def set_labels(self, labels: Mapping[str, str | None]) -> None:
        """Set (or, for ``None``, remove) labels on the node in one strategic-merge PATCH."""
        self._patch(f"label node {self.name}", {"metadata": {"labels": dict(labels)}})
