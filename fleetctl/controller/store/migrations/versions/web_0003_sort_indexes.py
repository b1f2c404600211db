"""dashboard: (column, hostname) indexes for every sortable node-table column

Sorting a page of the node table by a column, ties broken by hostname in the same direction, reads
these indexes in order instead of sorting 10,000 rows.

Revision ID: web_0003
Revises: verify_0001
Create Date: 2026-11-25 04:10:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "web_0003"
down_revision: str | None = "verify_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = {"ix_dashboard_nodes_status": ["status"], "ix_dashboard_nodes_gpu": ["gpu_model"],
        "ix_dashboard_nodes_verify": ["verify_result"], "ix_dashboard_nodes_driver": ["driver"],
        "ix_dashboard_nodes_torch": ["torch"], "ix_dashboard_nodes_verify_at": ["verify_at"]}
_NEW = {"ix_dashboard_nodes_status": ["status", "hostname"], "ix_dashboard_nodes_gpu": ["gpu_model", "hostname"],
        "ix_dashboard_nodes_verify": ["verify_result", "rank", "hostname"],
        "ix_dashboard_nodes_driver": ["driver", "hostname"], "ix_dashboard_nodes_torch": ["torch", "hostname"],
        "ix_dashboard_nodes_verify_at": ["verify_at", "hostname"]}
_ADDED = {"ix_dashboard_nodes_fa_host": ["fa_version", "hostname"],
          "ix_dashboard_nodes_cuda_max": ["cuda_max", "hostname"], "ix_dashboard_nodes_nvcc": ["nvcc", "hostname"],
          "ix_dashboard_nodes_python": ["python", "hostname"]}


def upgrade() -> None:
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name in _OLD:
            batch_op.drop_index(name)
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name, cols in (_NEW | _ADDED).items():
            batch_op.create_index(name, cols, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name in _NEW | _ADDED:
            batch_op.drop_index(name)
    with op.batch_alter_table("dashboard_nodes", schema=None) as batch_op:
        for name, cols in _OLD.items():
            batch_op.create_index(name, cols, unique=False)
