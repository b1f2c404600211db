"""Rollout tables (same ``Base`` as controller/store/models.py; migrations ``rollout_0001`` to ``rollout_0003``).

* ``rollouts`` — one row per ``fleetctl rollout flash-attn``: options, status. The engine that drives it holds its
  lease ``rollout:<id>`` in the ``leases`` table (controller/leases.py; migration ``rollout_0003``).
* ``rollout_nodes`` — per node: plan, batch, state, current step + its job, attempt.
* ``rollout_transitions`` — every state change of a node: from, to, at, cause (append-only).
* ``builds`` — one row per build key (global, reused across rollouts): builder node, artifact.

Audit entries go to the core's ``audit_log`` table.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleetctl.controller.store.models import Base


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "r-20261125-0342-ab12"
    version: Mapped[str] = mapped_column(String(64))
    selector: Mapped[str] = mapped_column(Text, default="all")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # batch, canary, budget, max_parallel…
    # core.RolloutStatus: running | paused | awaiting-approval | aborting | aborted | succeeded | partial | …
    status: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")  # why paused / aborted / finished
    created_by: Mapped[str] = mapped_column(String(253))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    current_batch: Mapped[int] = mapped_column(Integer, default=0)
    batches: Mapped[int] = mapped_column(Integer, default=0)
    canary_ack: Mapped[bool] = mapped_column(Boolean, default=False)
    # maintenance policy (migration rollout_0002): `rollout approve` after the canaries, the engine's reason for
    # starting no new node (core.Hold.to_json), the last status a webhook notification was queued for
    approved_by: Mapped[str | None] = mapped_column(String(128))
    approved_at: Mapped[dt.datetime | None]
    hold: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    notified_status: Mapped[str | None] = mapped_column(String(32))


class RolloutNode(Base):
    __tablename__ = "rollout_nodes"
    __table_args__ = (UniqueConstraint("rollout_id", "hostname", name="uq_rollout_nodes_rollout_host"),
                      Index("ix_rollout_nodes_host_state", "hostname", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    hostname: Mapped[str] = mapped_column(String(253))
    batch: Mapped[int] = mapped_column(Integer)
    canary: Mapped[bool] = mapped_column(Boolean, default=False)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)  # NodePlan + the resolver's decision
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # flash_attn facts before the rollout
    build_key: Mapped[str | None] = mapped_column(String(512), index=True)
    state: Mapped[str] = mapped_column(String(16))
    step: Mapped[str | None] = mapped_column(String(64))  # job kind of the current step, if in one
    job_id: Mapped[str | None] = mapped_column(String(64))  # job of the current step, once submitted
    step_started_at: Mapped[dt.datetime | None]
    step_deadline: Mapped[dt.datetime | None]
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    cause: Mapped[str] = mapped_column(Text, default="")  # of the last transition
    diagnosis: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # per-step results (sha256, verify…)
    updated_at: Mapped[dt.datetime]


class RolloutTransition(Base):
    __tablename__ = "rollout_transitions"
    __table_args__ = (Index("ix_rollout_transitions_rollout_at", "rollout_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    hostname: Mapped[str] = mapped_column(String(253))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime]
    cause: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128), default="engine")


class Build(Base):
    __tablename__ = "builds"

    build_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # pending | building | succeeded | failed
    rollout_id: Mapped[str | None] = mapped_column(String(32))  # the rollout that built it
    builder: Mapped[str | None] = mapped_column(String(253))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_filename: Mapped[str | None] = mapped_column(String(255))
    job_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
