"""rollout: one leader lease per rollout, a row of ``leases`` with a fencing token (issue 17, docs/ha.md)

The engine driving a rollout holds lease ``rollout:<id>`` (controller/rollout/engine.py) and fences every write it
makes for the rollout with it. The lease columns of ``rollouts`` and ``rollout_nodes`` go: a node's step is the
leader's, so it needs no lease of its own. A rollout whose lease a controller held when this runs keeps that
holder until the expiry it had (its first token: 1), so that an upgrade mid-rollout does not let a second engine
in before the first one's lease ran out. Written by hand.

Revision ID: rollout_0003
Revises: verify_0004
Create Date: 2026-12-03 19:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "rollout_0003"
down_revision: str | None = "verify_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.execute("INSERT INTO leases (name, holder, token, acquired_at, expires_at) "
               "SELECT 'rollout:' || id, lease_owner, 1, NULL, lease_expiry FROM rollouts "
               "WHERE lease_owner IS NOT NULL AND lease_expiry IS NOT NULL")
    # batch mode recreates the tables on SQLite, which store.db.migrate runs with foreign keys off
    with op.batch_alter_table("rollout_nodes") as batch_op:
        batch_op.drop_column("lease_expiry")
        batch_op.drop_column("lease_owner")
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.drop_column("lease_expiry")
        batch_op.drop_column("lease_owner")


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expiry", TS, nullable=True))
    with op.batch_alter_table("rollout_nodes") as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expiry", TS, nullable=True))
    op.execute("UPDATE rollouts SET lease_owner = (SELECT holder FROM leases WHERE name = 'rollout:' || rollouts.id), "
               "lease_expiry = (SELECT expires_at FROM leases WHERE name = 'rollout:' || rollouts.id)")
    op.execute("DELETE FROM leases WHERE name LIKE 'rollout:%'")
