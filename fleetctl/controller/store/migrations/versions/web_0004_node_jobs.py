"""dashboard: each node's latest finished job in dashboard_nodes (failed installs rank first) + jobs(finished_at)

Revision ID: web_0004
Revises: web_0003
Create Date: 2026-11-25 04:20:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "web_0004"
down_revision: str | None = "web_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_kind", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("job_status", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("job_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_finished", ["finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_finished")
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        batch_op.drop_column("job_at")
        batch_op.drop_column("job_status")
        batch_op.drop_column("job_kind")
