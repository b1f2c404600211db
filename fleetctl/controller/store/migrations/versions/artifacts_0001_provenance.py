"""artifacts: provenance of every stored artifact (artifact_provenance); existing artifacts become ``legacy``

Written by hand (store/migrations/env.py does not give Alembic every table, so autogenerate is unsafe).
Every artifact stored before this revision gets one ``legacy`` row: nobody knows who put it there, so it is
not trusted for the catalog or a plan (controller/artifacts.py) unless it is a succeeded build's output — an
operator who knows it re-adds it with `fleetctl artifact add` (same bytes: a ``user`` row is added).

Revision ID: artifacts_0001
Revises: web_0004
Create Date: 2026-11-25 06:00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "artifacts_0001"
down_revision: str | None = "web_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "artifact_provenance",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=2048), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("artifact_provenance", schema=None) as batch_op:
        batch_op.create_index("ix_artifact_provenance_sha256", ["sha256"], unique=False)
        batch_op.create_index("ix_artifact_provenance_source_ref", ["source", "ref"], unique=False)
    # In Python, not INSERT … SELECT: the JSON column's literal differs between SQLite and PostgreSQL.
    artifacts = sa.table("artifacts", sa.column("sha256", sa.String(64)),
                         sa.column("created", sa.DateTime(timezone=True)))
    rows = op.get_bind().execute(sa.select(artifacts.c.sha256, artifacts.c.created)).all()
    if rows:
        op.bulk_insert(table, [{"sha256": sha, "source": "legacy", "ref": "", "created": created,
                                "detail": {"note": "stored before provenance was recorded"}}
                               for sha, created in rows])


def downgrade() -> None:
    with op.batch_alter_table("artifact_provenance", schema=None) as batch_op:
        batch_op.drop_index("ix_artifact_provenance_source_ref")
        batch_op.drop_index("ix_artifact_provenance_sha256")
    op.drop_table("artifact_provenance")
