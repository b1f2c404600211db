"""Alembic environment: run programmatically by controller.store.db.migrate (connection passed in)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

# Every module that declares tables, so that Alembic sees the whole schema: a table missing here would be
# rendered as a drop by `alembic revision --autogenerate` (tests/integration/store/test_alembic_check.py).
import fleetctl.controller.dashboard_sessions
import fleetctl.controller.leases
import fleetctl.controller.rollout.models
import fleetctl.controller.users
import fleetctl.controller.verify_store.models
import fleetctl.controller.web.models  # noqa: F401
from fleetctl.controller.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` CLI use: sqlalchemy.url from the ini / -x
        engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                    poolclass=pool.NullPool)
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
