"""verification: the controller's clock orders results (verifications.at → recorded_at, the agent's time kept
as measured_at); dashboard_nodes follows verifications by their id (verify_id replaces src_verify_key)

Revision ID: verify_0002
Revises: web_0005
Create Date: 2027-01-12 10:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "verify_0002"
down_revision: str | None = "web_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_FINISHED = "(SELECT jobs.finished_at FROM jobs WHERE jobs.id = verifications.job_id)"


def upgrade() -> None:
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.alter_column("at", new_column_name="recorded_at", existing_type=sa.DateTime(timezone=True),
                              existing_nullable=False)
        batch_op.add_column(sa.Column("measured_at", sa.DateTime(timezone=True), nullable=True))
    # ``at`` was the agent's finish time where a full result was stored (else the job's finish on the controller):
    # keep it as the agent's time, and order by the job's finish on the controller where there is one
    op.execute("UPDATE verifications SET measured_at = recorded_at WHERE result IS NOT NULL")
    op.execute(f"UPDATE verifications SET recorded_at = {_JOB_FINISHED} "
               f"WHERE job_id IS NOT NULL AND {_JOB_FINISHED} IS NOT NULL")
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verify_id", sa.Integer(), nullable=True))
        batch_op.drop_column("src_verify_key")
    # the node table's copy of each node's latest verification is rebuilt from verifications by nodeindex.sync
    op.execute("UPDATE dashboard_nodes SET verify_result = '', verify_at = NULL, verify_tflops = NULL")


def downgrade() -> None:
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("src_verify_key", sa.String(length=64), nullable=False, server_default=""))
        batch_op.drop_column("verify_id")
    op.execute("UPDATE verifications SET recorded_at = measured_at WHERE measured_at IS NOT NULL")
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_column("measured_at")
        batch_op.alter_column("recorded_at", new_column_name="at", existing_type=sa.DateTime(timezone=True),
                              existing_nullable=False)
