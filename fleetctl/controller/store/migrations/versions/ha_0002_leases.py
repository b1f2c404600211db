"""leases: leader leases of background duties (holder, expiry on the database's clock, fencing token)

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe).
A lease row is created by its first ``acquire`` (controller/leases.py); nothing to fill in here.

Revision ID: ha_0002
Revises: rollout_0002
Create Date: 2026-12-03 14:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "ha_0002"
down_revision: str | None = "rollout_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("leases")
