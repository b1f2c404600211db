"""What shared liveness costs the database (issue 17, docs/ha.md): N nodes on a fresh PostgreSQL schema, then the
registry's database work of one flush interval, timed — the heartbeat batch of every node (agent-session leases +
``last_seen``), the lease upsert alone, and a liveness round (``Registry.judge``: expired leases, every status).

    .venv/bin/python benchmarks/liveness_rounds.py 1000 10000      # PostgreSQL at 127.0.0.1:5432, db "test"

Results go to docs/ha.md by hand (one line per measurement).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

import psycopg
from sqlalchemy import insert

from fleetctl.controller.registry import Heard, Registry
from fleetctl.controller.store import open_store, utcnow
from fleetctl.controller.store.models import Node

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def measure(nodes: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        store = open_store(f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}")
        now = utcnow()
        with store.session() as s:
            s.execute(insert(Node), [{"hostname": f"n{i:05d}", "status": "online", "last_seen": now, "facts": {},
                                      "extra": {}, "simulated": True, "registered_at": now, "facts_updated_at": now}
                                     for i in range(nodes)])
        reg = Registry(store, heartbeat_interval=10, missed_heartbeats=3, flush_interval=2)
        heard = time.time()
        batch = [Heard(live.node_id, heard, uuid.uuid4().hex[:16]) for live in reg._live.values()]

        def leases_only() -> None:
            with store.session() as s:
                reg._renew_sessions(s, batch)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("heartbeat batch, first (lease inserts)", lambda: reg.write_last_seen(batch)),
            ("heartbeat batch (lease updates + last_seen)", lambda: reg.write_last_seen(batch)),
            ("lease upsert alone", leases_only),
            ("liveness round (judge)", lambda: reg.judge(expire=True)),
            ("liveness round again", lambda: reg.judge(expire=True))]
        for label, step in steps:
            started = time.perf_counter()
            step()
            print(f"{nodes} nodes: {label}: {(time.perf_counter() - started) * 1000:.0f} ms", flush=True)
        store.close()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [1000, 10000]:
        measure(n)
