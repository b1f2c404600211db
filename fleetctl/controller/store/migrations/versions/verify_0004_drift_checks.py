"""drift_checks: pending drift re-verifications as rows (one per node, due on the database's clock), so that a
check outlives the controller that recorded it and one controller (the ``drift-checks`` lease holder) submits it

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe). Nothing
to fill in: checks pending in the memory of a controller that ran the previous version are lost with it, as
before; the next relevant facts change records one.

Revision ID: verify_0004
Revises: web_0006
Create Date: 2026-12-03 18:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "verify_0004"
down_revision: str | None = "web_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_checks",
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("first_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paths", sa.JSON(), nullable=False),
        sa.Column("recorded_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("hostname"),
    )
    with op.batch_alter_table("drift_checks", schema=None) as batch_op:
        batch_op.create_index("ix_drift_checks_due_at", ["due_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("drift_checks", schema=None) as batch_op:
        batch_op.drop_index("ix_drift_checks_due_at")
    op.drop_table("drift_checks")
