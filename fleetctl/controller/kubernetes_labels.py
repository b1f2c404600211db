"""The controller's verdicts as Kubernetes node labels (``kubernetes_labels`` setting; docs/deploy.md, "Kubernetes").

After each recorded verification the node's ``fleetctl.io/*`` labels are patched: the installed flash-attn version
(its latest facts), the verification's stored status and whether it passed, the recommended attention for the
default workload, and ``simulated``. The controller writes them, not the agent: the verdict (with the fleet
regression comparison) and the recommendation exist only here. The fleet hostname is the Kubernetes node name (the
agent DaemonSet enrolls as ``spec.nodeName``). Publishing never holds up or fails a verification: an API error is
logged with its hint, and the next verification publishes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from fleetctl.controller import attention
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.registry import Registry
from fleetctl.controller.store.db import Store
from fleetctl.controller.verify_store.views import latest_by_node
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.kube_nodes import KubernetesNode, node_labels

log = logging.getLogger(__name__)

#: the workload whose recommendation the label carries (the dashboard's and /metrics' default)
LABEL_WORKLOAD = "prefill"


class NodeLabels:
    """Publishes nodes' labels through ``credentials`` (``in-cluster`` or a kubeconfig path)."""

    def __init__(self, store: Store, registry: Registry, state_dir: Path, credentials: str, *,
                 connect: Callable[[str, str], KubernetesNode] = KubernetesNode.connect) -> None:
        self.store = store
        self.registry = registry
        self.state_dir = state_dir
        self.credentials = credentials
        self._connect = connect

    def labels_for(self, hostname: str) -> dict[str, str | None]:
        """What the node's labels should say now (blocking: database reads and a recommendation)."""
        record = self.registry.record(hostname)
        facts = record.facts
        with self.store.session() as s:
            latest = latest_by_node(s, [hostname]).get(hostname)
            recommended = None
            if facts is not None:
                (rec,) = attention.node_recommendations(s, facts, record.simulated,
                                                        controller_catalog(s, self.state_dir), (LABEL_WORKLOAD,))
                recommended = rec.choice.impl if rec.choice is not None else None
        installed = facts.flash_attn.version if facts is not None and facts.flash_attn is not None else None
        return node_labels(flash_attn_version=installed, verification=latest.status if latest else None,
                           recommended_attention=recommended, simulated=record.simulated)

    def publish(self, hostname: str) -> None:
        """Patch ``hostname``'s labels (blocking)."""
        labels = self.labels_for(hostname)
        self._connect(hostname, self.credentials).set_labels(labels)
        log.info("labels of Kubernetes node %s: %s", hostname,
                 ", ".join(f"{k}={v}" for k, v in labels.items() if v is not None))

    async def published(self, hostname: str) -> None:
        """``publish`` in a worker thread; a failure is logged, never raised (the verification is recorded)."""
        try:
            await asyncio.to_thread(self.publish, hostname)
        except FleetError as exc:
            log.warning("labels of Kubernetes node %s not published: %s (%s)", hostname, exc.message, exc.hint)
