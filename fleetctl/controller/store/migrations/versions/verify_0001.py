"""verification: one verifications table (replaces dashboard_verifications), schedules, schedule runs,
node verification state

Revision ID: verify_0001
Revises: web_0002
Create Date: 2026-11-25 04:20:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "verify_0001"
down_revision: str | None = "web_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SHARED = ("job_id", "hostname", "gpu_model", "at", "passed", "status", "simulated", "tflops", "sdpa_tflops",
           "peak_mem_mib", "detail")


def upgrade() -> None:
    op.create_table(
        "verifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("tflops", sa.Float(), nullable=True),
        sa.Column("sdpa_tflops", sa.Float(), nullable=True),
        sa.Column("peak_mem_mib", sa.Float(), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False, server_default=""),
        sa.Column("expect", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("trigger", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("schedule_id", sa.Integer(), nullable=True),
        sa.Column("fa_version", sa.String(length=64), nullable=True),
        sa.Column("fa_variant", sa.String(length=32), nullable=True),
        sa.Column("bench_status", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("reasons", sa.JSON(), nullable=False, server_default="[]"),
        sa.Column("warnings", sa.JSON(), nullable=False, server_default="[]"),
        sa.Column("regression", sa.JSON(), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=False, server_default="{}"),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", name="uq_verifications_job_id"),
    )
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.create_index("ix_verifications_host_at", ["hostname", "at"], unique=False)
        batch_op.create_index("ix_verifications_gpu_at", ["gpu_model", "at"], unique=False)
    # the dashboard's summary rows become rows of the one table
    cols = ", ".join(_SHARED)
    op.execute(f"INSERT INTO verifications ({cols}) SELECT {cols} FROM dashboard_verifications")
    with op.batch_alter_table("dashboard_verifications", schema=None) as batch_op:
        batch_op.drop_index("ix_dashboard_verifications_gpu_at")
        batch_op.drop_index("ix_dashboard_verifications_host_at")
    op.drop_table("dashboard_verifications")

    op.create_table(
        "verify_schedules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("selector", sa.String(length=1000), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=253), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "verify_schedule_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=False),
        sa.Column("jobs", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["schedule_id"], ["verify_schedules.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "due_at", name="uq_verify_schedule_runs_due"),
    )
    op.create_table(
        "node_verify_state",
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("degraded", sa.Boolean(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("diagnosis", sa.JSON(), nullable=False),
        sa.Column("replan", sa.JSON(), nullable=True),
        sa.Column("verification_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hostname"),
    )


def downgrade() -> None:
    op.drop_table("node_verify_state")
    op.drop_table("verify_schedule_runs")
    op.drop_table("verify_schedules")
    op.create_table(
        "dashboard_verifications",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("tflops", sa.Float(), nullable=True),
        sa.Column("sdpa_tflops", sa.Float(), nullable=True),
        sa.Column("peak_mem_mib", sa.Float(), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("dashboard_verifications", schema=None) as batch_op:
        batch_op.create_index("ix_dashboard_verifications_host_at", ["hostname", "at"], unique=False)
        batch_op.create_index("ix_dashboard_verifications_gpu_at", ["gpu_model", "at"], unique=False)
    cols = ", ".join(_SHARED)
    op.execute(f"INSERT INTO dashboard_verifications ({cols}) SELECT {cols} FROM verifications "
               "WHERE job_id IS NOT NULL")
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_index("ix_verifications_gpu_at")
        batch_op.drop_index("ix_verifications_host_at")
    op.drop_table("verifications")
