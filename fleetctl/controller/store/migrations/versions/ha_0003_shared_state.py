"""ha_0003: the CA, admin token hashes and artifact content shared through PostgreSQL (tables ca, admin_tokens,
artifact_content; docs/ha.md, "What is shared")

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe). The rows
are written by the controllers at start (controller/shared_ca.py) and on each artifact upload
(controller/artifacts.py); on SQLite the tables stay empty.

Revision ID: ha_0003
Revises: verify_0003
Create Date: 2026-12-03 14:45:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "ha_0003"
down_revision: str | None = "verify_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ca",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("key_data", sa.LargeBinary(), nullable=False),
        sa.Column("key_encryption", sa.String(length=16), nullable=False),
        sa.Column("kek_id", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=512), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("controller", sa.String(length=512), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "artifact_content",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("oid", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sha256"),
    )


def downgrade() -> None:
    op.drop_table("artifact_content")
    op.drop_table("admin_tokens")
    op.drop_table("ca")
