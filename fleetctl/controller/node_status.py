"""A node's status and the one liveness rule (pure: no I/O, no clock, no database).

Below both the registry (which keeps the status of every node and applies ``liveness``) and the rollout core
(which selects nodes by status), so that neither copies the list of statuses.
"""

from __future__ import annotations

from enum import StrEnum


class NodeStatus(StrEnum):
    """A node's status as stored in ``nodes.status`` and shown everywhere (StrEnum: the strings stay the same)."""

    ONLINE = "online"
    OFFLINE = "offline"
    DEGRADED = "degraded"  # set by other components (a failed verification), not by liveness


#: The statuses that put a node among the failing ones (first in the dashboard's node table).
NOT_ONLINE = frozenset({NodeStatus.OFFLINE, NodeStatus.DEGRADED})


def liveness(status: NodeStatus, last_seen: float, now: float, offline_after: float) -> NodeStatus:
    """The one liveness rule: a node silent for longer than ``offline_after`` seconds is offline; contact
    (``last_seen`` within the window) brings an offline node back online; ``degraded`` is kept while the
    node is heard from (only a passing verification or ``set_status`` clears it)."""
    if now - last_seen > offline_after:
        return NodeStatus.OFFLINE
    return NodeStatus.ONLINE if status is NodeStatus.OFFLINE else status
