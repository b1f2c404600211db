"""Adapters onto the other parts of the controller (verification, rollouts, schedules, resolver).

The dashboard reads those parts through these few functions only. A part that is not there
(module missing, table not migrated yet) makes its function return ``None``, and the page
says so instead of failing.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatestVerification:
    result: str  # passed | failed
    at: dt.datetime | None
    tflops: float | None
    key: Any


def latest_verifications(session: Session, since: Any) -> tuple[Any, dict[str, LatestVerification]] | None:
    """(new watermark, {hostname: latest verification}) for verifications newer than ``since``."""
    return None


def verification_history(session: Session, hostname: str, limit: int = 200) -> list[dict[str, Any]] | None:
    """A node's verification results, oldest first: at, passed, tflops, sdpa_tflops, simulated, detail."""
    return None


def fleet_median(session: Session, gpu_model: str, limit: int = 200) -> list[dict[str, Any]] | None:
    """Median TFLOP/s per day over the nodes with the same GPU model: [{at, tflops}]."""
    return None


def plan_for(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The resolver's current decision for these facts (DESIGN §3.2 decision), or None."""
    return None


def rollouts(session: Session, limit: int = 50) -> list[dict[str, Any]] | None:
    return None


def rollout_detail(session: Session, rollout_id: str) -> dict[str, Any] | None:
    return None


def rollout_action(ctx: Any, rollout_id: str, action: str, actor: str) -> str:
    from fleet.errors import ConflictError
    raise ConflictError("rollouts are not available in this controller", hint="update the controller")


def schedules(session: Session) -> list[dict[str, Any]] | None:
    return None


def verification_metrics(session: Session) -> list[dict[str, Any]] | None:
    """[{gpu, passed, failed, tflops_median}] for /metrics."""
    return None
