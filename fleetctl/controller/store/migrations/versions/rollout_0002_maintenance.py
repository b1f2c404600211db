"""rollout: maintenance policy — the awaiting-approval status, who approved, why nothing starts, last notified

``rollouts.status`` grows to 32 characters (``awaiting-approval`` has 17); ``approved_by``/``approved_at``
record `fleetctl rollout approve` after the canary batch; ``hold`` is the engine's reason for starting no new
node (window, bake, max-unavailable: controller/rollout/core.py ``Hold``); ``notified_status`` is the last
status whose webhook notification was queued (docs/rollout.md, "Notifications"). Written by hand.

Revision ID: rollout_0002
Revises: enroll_0001
Create Date: 2026-12-03 13:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "rollout_0002"
down_revision: str | None = "enroll_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("approved_by", sa.String(length=128), nullable=True))
    op.add_column("rollouts", sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("rollouts", sa.Column("hold", sa.JSON(), nullable=True))
    op.add_column("rollouts", sa.Column("notified_status", sa.String(length=32), nullable=True))
    # SQLite enforces no VARCHAR length, but the declared type must match the model (`alembic check`): batch mode
    # recreates ``rollouts`` there, which store.db.migrate runs with foreign keys off so its nodes are kept
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.alter_column("status", existing_type=sa.String(length=16), type_=sa.String(length=32),
                              existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.alter_column("status", existing_type=sa.String(length=32), type_=sa.String(length=16),
                              existing_nullable=False)
    for column in ("notified_status", "hold", "approved_at", "approved_by"):
        op.drop_column("rollouts", column)
