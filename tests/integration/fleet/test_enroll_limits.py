"""Enrollment over gRPC is rate-limited per source address (and overall): a flood of enrollments is refused
with UNAVAILABLE "rate-limited" before any database work — agents retry such refusals with backoff — and
writes a bounded number of audit rows."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from fleetctl.agent.client import enroll
from fleetctl.controller.app import RunningController
from fleetctl.controller.store.models import AuditLog
from fleetctl.fleet.errors import AuthError, ControllerUnavailable

pytestmark = pytest.mark.timeout(120)


async def test_enrollment_flood_is_rate_limited_and_audited_once(controller: RunningController) -> None:
    assert controller.ctx.enroll_address is not None
    ca = controller.ctx.ca.ca_pem
    refused, limited = 0, []
    for i in range(40):
        try:
            await enroll(controller.ctx.enroll_address, ca, "fleet_wrong", f"node-{i}")
        except AuthError:
            refused += 1
        except ControllerUnavailable as exc:
            limited.append(exc.message)
    burst = int(controller.ctx.settings.enroll_per_source.burst)
    assert refused <= burst + 2 and len(limited) >= 40 - burst - 2
    assert "rate-limited" in limited[0] and "retry in" in limited[0]
    with controller.ctx.store.session() as s:
        rows = s.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.action == "enroll.refused"))
    assert rows == 1  # coalesced: one row for the source this minute
