"""dashboard: users and the denormalised dashboard_nodes index

Revision ID: web_0001
Revises: 0001
Create Date: 2026-11-25 03:40:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "web_0001"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = [
    ("ix_dashboard_nodes_rank_host", ["rank", "hostname"]),
    ("ix_dashboard_nodes_status", ["status"]),
    ("ix_dashboard_nodes_gpu", ["gpu_model"]),
    ("ix_dashboard_nodes_fa", ["fa_variant", "fa_version"]),
    ("ix_dashboard_nodes_verify", ["verify_result"]),
    ("ix_dashboard_nodes_driver", ["driver"]),
    ("ix_dashboard_nodes_torch", ["torch"]),
    ("ix_dashboard_nodes_verify_at", ["verify_at"]),
]


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=512), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "dashboard_nodes",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("compute_capability", sa.String(length=8), nullable=False),
        sa.Column("driver", sa.String(length=32), nullable=False),
        sa.Column("cuda_max", sa.String(length=16), nullable=False),
        sa.Column("nvcc", sa.String(length=16), nullable=False),
        sa.Column("torch", sa.String(length=64), nullable=False),
        sa.Column("torch_cuda", sa.String(length=16), nullable=False),
        sa.Column("cxx11abi", sa.Boolean(), nullable=True),
        sa.Column("python", sa.String(length=32), nullable=False),
        sa.Column("fa_version", sa.String(length=32), nullable=False),
        sa.Column("fa_variant", sa.String(length=32), nullable=False),
        sa.Column("verify_result", sa.String(length=16), nullable=False),
        sa.Column("verify_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verify_tflops", sa.Float(), nullable=True),
        sa.Column("src_facts_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("src_verify_key", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id"),
        sa.UniqueConstraint("hostname"),
    )
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name, cols in _INDEXES:
            batch_op.create_index(name, cols, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name, _cols in _INDEXES:
            batch_op.drop_index(name)
    op.drop_table("dashboard_nodes")
    op.drop_table("users")
