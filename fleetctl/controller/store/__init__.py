"""The controller's store: SQLAlchemy 2 models (one ``Base``) and Alembic migrations.

Usage::

    from fleetctl.controller.store import open_store, models
    store = open_store("sqlite:///state/controller/controller.db")   # migrates to head
    with store.session() as s:                 # commits on success, rolls back on error
        s.add(models.AuditLog(actor="admin", action="x", target="y"))
    store.close()

Later tables are new Alembic revisions in ``migrations/versions`` whose ``down_revision``
is the current head; add their models to ``models.py`` (same ``Base``).
"""

from fleetctl.controller.store.db import Store, open_store, utcnow

__all__ = ["Store", "open_store", "utcnow"]
