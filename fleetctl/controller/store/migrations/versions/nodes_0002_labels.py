"""node_labels: user labels on nodes (``fleetctl label NODE k=v``), owned by the registry

Revision ID: nodes_0002
Revises: nodes_0001
Create Date: 2026-12-03 13:40:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "nodes_0002"
down_revision: str | None = "nodes_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_labels",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=317), nullable=False),
        sa.Column("value", sa.String(length=63), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id", "key"),
    )


def downgrade() -> None:
    op.drop_table("node_labels")
