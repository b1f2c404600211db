"""dashboard: dashboard_verifications (charted verification results) + jobs(kind, finished_at) index

Revision ID: web_0002
Revises: rollout_0001
Create Date: 2026-11-25 03:50:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "web_0002"
down_revision: str | None = "rollout_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_kind_finished", ["kind", "finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_kind_finished")
    with op.batch_alter_table("dashboard_verifications", schema=None) as batch_op:
        batch_op.drop_index("ix_dashboard_verifications_gpu_at")
        batch_op.drop_index("ix_dashboard_verifications_host_at")
    op.drop_table("dashboard_verifications")
