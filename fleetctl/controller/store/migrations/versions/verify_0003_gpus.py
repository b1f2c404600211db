"""verification: the GPU indices each verification measured (verifications.gpus; fleetctl verify --gpus, the
agent's busy check picks idle GPUs — issue 18). Older rows keep NULL: not reported.

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe).

Revision ID: verify_0003
Revises: ha_0002
Create Date: 2026-12-03 14:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "verify_0003"
down_revision: str | None = "ha_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpus", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_column("gpus")
