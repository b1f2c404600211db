"""A node's status and the one liveness rule (pure: no I/O, no clock, no database).

Below both the registry (which keeps the status of every node and applies ``liveness``) and the rollout core
(which selects nodes by status), so that neither copies the list of statuses.

With several controllers on one database the silence is judged there: the controller that hears a node's agent
renews the node's agent-session lease to ``lease_expiry`` (the end of the offline window, on the database's
clock), and a node whose lease has expired — by the database's clock — is offline for every controller
(controller/registry.py applies both).
"""

from __future__ import annotations

import datetime as dt
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


def lease_expiry(db_now: dt.datetime, heard_ago: float, offline_after: float) -> dt.datetime:
    """When a node's agent-session lease ends, on the database's clock: ``offline_after`` seconds after the last
    heartbeat, which the controller heard ``heard_ago`` seconds ago by its own clock. Only a difference of the
    controller's clock goes in, so a controller whose clock is off still writes the right expiry."""
    return db_now + dt.timedelta(seconds=offline_after - max(0.0, heard_ago))


def lease_expired(expires_at: dt.datetime | None, db_now: dt.datetime) -> bool:
    """The liveness rule on the database's clock: a node whose lease is missing or has ended is silent."""
    return expires_at is None or expires_at <= db_now
