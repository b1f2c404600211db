"""What a node is expected to have after a rollback: recorded in one place, read in one place.

A rollback that finishes cleanly leaves the node with exactly the flash-attn it had before the rollout — a
version, or none at all. The engine records that on the node's row of the rollout (``record_after_rollback``,
``rollout_nodes.result["expected"]``); verification reads it (``expected_after_rollback``) so a node whose
flash-attn a rollback removed on purpose is verified as an SDPA node, not marked degraded for lacking
flash-attn. Only the node's most recent *touched* rollout counts (done, failed or rolled back; a rollout that
skipped the node changed nothing there): a later rollout that installs again, or a rollback that failed,
replaces the expectation with "whatever the resolver would install" (None here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.rollout.core import State
from fleetctl.controller.rollout.models import RolloutNode

EXPECTED_KEY = "expected"
_TOUCHED = (str(State.DONE), str(State.FAILED), str(State.ROLLED_BACK))


@dataclass(frozen=True)
class Expected:
    """The flash-attn a node must have: ``flash_attn`` None means none at all (SDPA only)."""

    flash_attn: str | None
    rollout_id: str

    @property
    def verify_expect(self) -> str:
        """The verify job's ``expect`` (agent/verify): ``flash_attn`` or ``sdpa``."""
        return "sdpa" if self.flash_attn is None else "flash_attn"


def record_after_rollback(result: dict[str, Any], playbook_result: Mapping[str, Any] | None,
                          previous: Mapping[str, Any] | None) -> None:
    """Write the expectation into a rollout node's ``result`` after its rollback job succeeded: the version
    rollback.yml reports restored (``rollback.restored_version``; null when it removed flash-attn), else — a
    node where fleetctl had recorded no install, so nothing changed — the flash-attn the node had before the
    rollout (``previous``)."""
    rb = (playbook_result or {}).get("rollback")
    version: Any
    if isinstance(rb, Mapping) and rb.get("action") in ("removed", "restored"):
        version = rb.get("restored_version") if rb.get("action") == "restored" else None
    else:
        version = (previous or {}).get("version")
    result[EXPECTED_KEY] = {"flash_attn": str(version) if version else None}


def expected_after_rollback(s: Session, hostname: str) -> Expected | None:
    """The expectation a rollback recorded for ``hostname``, if the node's most recent touched rollout was a
    clean rollback; None otherwise (no rollback, or something happened since)."""
    row = s.scalars(select(RolloutNode).where(RolloutNode.hostname == hostname, RolloutNode.state.in_(_TOUCHED))
                    .order_by(RolloutNode.updated_at.desc(), RolloutNode.id.desc()).limit(1)).first()
    if row is None or row.state != str(State.ROLLED_BACK):
        return None
    rec = (row.result or {}).get(EXPECTED_KEY)
    if not isinstance(rec, Mapping):
        return None
    version = rec.get("flash_attn")
    return Expected(str(version) if version else None, row.rollout_id)
