"""rollouts, rollout_nodes, rollout_transitions, builds

Revision ID: rollout_0001
Revises: web_0001
Create Date: 2026-11-25 03:45:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'rollout_0001'
down_revision: str | None = 'web_0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'rollouts',
        sa.Column('id', sa.String(32), primary_key=True),
        sa.Column('version', sa.String(64), nullable=False),
        sa.Column('selector', sa.Text(), nullable=False),
        sa.Column('options', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('created_by', sa.String(253), nullable=False),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('updated_at', TS, nullable=False),
        sa.Column('finished_at', TS, nullable=True),
        sa.Column('current_batch', sa.Integer(), nullable=False),
        sa.Column('batches', sa.Integer(), nullable=False),
        sa.Column('canary_ack', sa.Boolean(), nullable=False),
        sa.Column('lease_owner', sa.String(128), nullable=True),
        sa.Column('lease_expiry', TS, nullable=True),
    )
    op.create_index('ix_rollouts_status', 'rollouts', ['status'])
    op.create_table(
        'rollout_nodes',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('rollout_id', sa.String(32), sa.ForeignKey('rollouts.id', ondelete='CASCADE'), nullable=False),
        sa.Column('hostname', sa.String(253), nullable=False),
        sa.Column('batch', sa.Integer(), nullable=False),
        sa.Column('canary', sa.Boolean(), nullable=False),
        sa.Column('plan', sa.JSON(), nullable=False),
        sa.Column('previous', sa.JSON(), nullable=True),
        sa.Column('build_key', sa.String(512), nullable=True),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('step', sa.String(64), nullable=True),
        sa.Column('job_id', sa.String(64), nullable=True),
        sa.Column('step_started_at', TS, nullable=True),
        sa.Column('step_deadline', TS, nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('cause', sa.Text(), nullable=False),
        sa.Column('diagnosis', sa.JSON(), nullable=True),
        sa.Column('result', sa.JSON(), nullable=False),
        sa.Column('lease_owner', sa.String(128), nullable=True),
        sa.Column('lease_expiry', TS, nullable=True),
        sa.Column('updated_at', TS, nullable=False),
        sa.UniqueConstraint('rollout_id', 'hostname', name='uq_rollout_nodes_rollout_host'),
    )
    op.create_index('ix_rollout_nodes_host_state', 'rollout_nodes', ['hostname', 'state'])
    op.create_index('ix_rollout_nodes_build_key', 'rollout_nodes', ['build_key'])
    op.create_table(
        'rollout_transitions',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('rollout_id', sa.String(32), sa.ForeignKey('rollouts.id', ondelete='CASCADE'), nullable=False),
        sa.Column('hostname', sa.String(253), nullable=False),
        sa.Column('from_state', sa.String(16), nullable=False),
        sa.Column('to_state', sa.String(16), nullable=False),
        sa.Column('at', TS, nullable=False),
        sa.Column('cause', sa.Text(), nullable=False),
        sa.Column('job_id', sa.String(64), nullable=True),
        sa.Column('actor', sa.String(128), nullable=False),
    )
    op.create_index('ix_rollout_transitions_rollout_at', 'rollout_transitions', ['rollout_id', 'at'])
    op.create_table(
        'builds',
        sa.Column('build_key', sa.String(512), primary_key=True),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('rollout_id', sa.String(32), nullable=True),
        sa.Column('builder', sa.String(253), nullable=True),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('artifact_sha256', sa.String(64), nullable=True),
        sa.Column('artifact_filename', sa.String(255), nullable=True),
        sa.Column('job_id', sa.String(64), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', TS, nullable=False),
        sa.Column('finished_at', TS, nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('builds')
    op.drop_index('ix_rollout_transitions_rollout_at', table_name='rollout_transitions')
    op.drop_table('rollout_transitions')
    op.drop_index('ix_rollout_nodes_build_key', table_name='rollout_nodes')
    op.drop_index('ix_rollout_nodes_host_state', table_name='rollout_nodes')
    op.drop_table('rollout_nodes')
    op.drop_index('ix_rollouts_status', table_name='rollouts')
    op.drop_table('rollouts')
