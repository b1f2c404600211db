"""Enrollment at scale: reusable join tokens, the approval queue, certificate renewal

enrollment_tokens: ``max_uses`` (1 for every existing token: they stay one-time), ``uses`` (1 where the token was
used), ``hostname_pattern`` and ``source_network`` (optional limits on who may use it), ``approval`` (enrollments
with it wait for an operator). identities: ``state`` (active | pending | denied; existing rows are active),
``csr_pem``/``cert_pem``/``pending_hash`` for a request waiting for approval, ``source`` (the address it enrolled
from), ``cert_not_after`` (NULL: issued before this revision, a year after ``created_at``) and
``prev_cert_serial`` (the certificate a renewal replaced, accepted until it expires).

Revision ID: enroll_0001
Revises: ha_0001
Create Date: 2026-12-03 13:40:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "enroll_0001"
down_revision: str | None = "ha_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_uses", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("uses", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("hostname_pattern", sa.String(length=253), nullable=True))
        batch_op.add_column(sa.Column("source_network", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("approval", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE enrollment_tokens SET uses = 1 WHERE used_at IS NOT NULL")
    with op.batch_alter_table("identities", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", sa.String(length=16), nullable=False, server_default="active"))
        batch_op.add_column(sa.Column("csr_pem", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("cert_pem", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("pending_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("source", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("prev_cert_serial", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_identities_pending_hash", ["pending_hash"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("identities", schema=None) as batch_op:
        batch_op.drop_index("ix_identities_pending_hash")
        for column in ("prev_cert_serial", "cert_not_after", "source", "pending_hash", "cert_pem", "csr_pem",
                       "state"):
            batch_op.drop_column(column)
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        for column in ("approval", "source_network", "hostname_pattern", "uses", "max_uses"):
            batch_op.drop_column(column)
