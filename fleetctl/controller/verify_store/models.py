"""Tables of verification storage, schedules and per-node verification state.

``verifications`` is the one table of verification results, written only by
``controller.verify_store.store.record``; everyone else (dashboard, /metrics, API) reads it
through ``controller.verify_store.views``.

Two clocks: ``recorded_at`` is the controller's (set when the result is stored) and orders
results; ``measured_at`` is the agent's (the result's ``finished_at``), kept to show the
node's clock skew, never used for ordering.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleetctl.controller.store.models import Base


class Verification(Base):
    """One verification result of one node (a ``verify`` job, or an imported result)."""

    __tablename__ = "verifications"
    __table_args__ = (
        Index("ix_verifications_host_at", "hostname", "recorded_at"),
        Index("ix_verifications_gpu_at", "gpu_model", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    hostname: Mapped[str] = mapped_column(String(253))
    gpu_model: Mapped[str] = mapped_column(String(128), default="")
    # the controller's clock when it stored the result: the one that orders results (agents' clocks drift)
    recorded_at: Mapped[dt.datetime]
    measured_at: Mapped[dt.datetime | None]  # the agent's clock: when the run finished on the node
    passed: Mapped[bool] = mapped_column(Boolean)
    # pass | fail | regression | no-gpu | no-torch | timeout | error (+ job states for jobs without a result)
    status: Mapped[str] = mapped_column(String(16), default="")
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    tflops: Mapped[float | None] = mapped_column(Float)  # median flash_attn fwd TFLOP/s
    sdpa_tflops: Mapped[float | None] = mapped_column(Float)  # median SDPA flash (else efficient/cuDNN)
    peak_mem_mib: Mapped[float | None] = mapped_column(Float)  # max flash_attn peak memory
    detail: Mapped[str] = mapped_column(String(500), default="")
    # the full record
    mode: Mapped[str] = mapped_column(String(8), default="")
    expect: Mapped[str] = mapped_column(String(16), default="")
    trigger: Mapped[str] = mapped_column(String(16), default="")  # manual | schedule | drift | rollout | import
    schedule_id: Mapped[int | None] = mapped_column(Integer)
    fa_version: Mapped[str | None] = mapped_column(String(64))
    fa_variant: Mapped[str | None] = mapped_column(String(32))
    bench_status: Mapped[str] = mapped_column(String(16), default="")  # evaluate() alone, before the fleet check
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    warnings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    regression: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # score, threshold, worst shapes
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the facts snapshot it ran on
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the fleet.verification result
    started_at: Mapped[dt.datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    # the GPU indices measured (the agent's busy check chose idle ones: fleetctl verify --gpus); None: not reported
    gpus: Mapped[list[Any] | None] = mapped_column(JSON)


class VerifySchedule(Base):
    """A re-verification schedule: a cron expression over a node selector."""

    __tablename__ = "verify_schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cron: Mapped[str] = mapped_column(String(128))
    selector: Mapped[str] = mapped_column(String(1000))
    mode: Mapped[str] = mapped_column(String(8), default="full")
    created_at: Mapped[dt.datetime]
    created_by: Mapped[str] = mapped_column(String(253), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class VerifyScheduleRun(Base):
    """One claimed run of a schedule. The unique (schedule_id, due_at) makes the claim atomic: of two
    controllers on one database, exactly one inserts the row for a due time, and only it submits jobs."""

    __tablename__ = "verify_schedule_runs"
    __table_args__ = (UniqueConstraint("schedule_id", "due_at", name="uq_verify_schedule_runs_due"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("verify_schedules.id", ondelete="CASCADE"))
    due_at: Mapped[dt.datetime]
    claimed_at: Mapped[dt.datetime]
    claimed_by: Mapped[str] = mapped_column(String(128), default="")
    jobs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {hostname: job id}
    error: Mapped[str | None] = mapped_column(Text)


class NodeVerifyState(Base):
    """A node's verification health: ``degraded`` with the diagnosis and the re-plan that would fix it."""

    __tablename__ = "node_verify_state"

    hostname: Mapped[str] = mapped_column(String(253), primary_key=True)
    degraded: Mapped[bool] = mapped_column(Boolean, default=False)
    since: Mapped[dt.datetime | None]
    reason: Mapped[str] = mapped_column(Text, default="")
    diagnosis: Mapped[list[Any]] = mapped_column(JSON, default=list)  # controller.diagnose entries
    replan: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # resolver decision on the current facts
    verification_id: Mapped[int | None] = mapped_column(Integer)  # the result that set this state
    updated_at: Mapped[dt.datetime]


class DriftCheck(Base):
    """A pending drift re-verification of one node (controller/verify_store/drift.py): recorded by whichever
    controller heard the facts change, submitted by the holder of the ``drift-checks`` lease once ``due_at`` (the
    database's clock) has come. A row, not a timer, so that it outlives the controller that recorded it."""

    __tablename__ = "drift_checks"

    hostname: Mapped[str] = mapped_column(String(253), primary_key=True)  # one pending check per node
    first_changed_at: Mapped[dt.datetime]  # the first change it covers: a verify job since then makes it moot
    due_at: Mapped[dt.datetime] = mapped_column(index=True)  # the last change + the debounce (database clock)
    paths: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the relevant facts paths that changed, sorted
    recorded_by: Mapped[str] = mapped_column(String(128), default="")  # the controller that heard the last change
