"""agent_sessions: a lease per node's agent session, so that every controller judges liveness the same way

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe).
No rows are written: a node without a lease counts as silent, and a starting controller gives every node one
offline window before judging it (controller/registry.py), so the agents' next heartbeats create the leases.

Revision ID: ha_0001
Revises: nodes_0002
Create Date: 2026-12-03 14:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "ha_0001"
down_revision: str | None = "nodes_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_sessions",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("controller_id", sa.String(length=128), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id"),
    )
    with op.batch_alter_table("agent_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_agent_sessions_expires_at", ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("agent_sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_agent_sessions_expires_at")
    op.drop_table("agent_sessions")
