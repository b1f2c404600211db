"""The HA fault soak, short (issue 17; benchmarks/ha_chaos.py is the long run): three controller processes on one
PostgreSQL database of a server of the test's own (tests/integration/harness/pgserver.py), 20 ``fleet-agent run
--controller A,B,C`` processes, a rollout with simulated source builds; while it runs, three ``kill -9`` of a random
controller (each restarted), one ``pg_terminate_backend`` of a controller's backends, and PostgreSQL stopped for 3 s
twice — ``pg_ctl stop -m fast``, then ``-m immediate`` (a crash, recovery at the start) — while the controllers hold
connections. Afterwards: the rollout succeeded with every node ``done``, no node lost or stuck, exactly one
successful job per node and step kind, no job executed twice (agents' logs), the audit log has the rollout's start
and finish, no controller exited, and after each stop every controller was healthy and every node's heartbeat
written again. The network cut through a relay stays in the soak (``--outages``), out of the suite's time."""

from __future__ import annotations

import pytest

from benchmarks.ha_chaos import parser, problems, run

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]


def test_rollout_survives_controller_kills_backend_kills_and_postgres_stops() -> None:
    args = parser().parse_args([
        "--seed", "17", "--agents", "20", "--kills", "3", "--terminates", "1", "--outages", "0",
        "--pg-stops", "2", "--pg-stop-seconds", "3", "--build-seconds", "20", "--step-seconds", "1",
        "--min-interval", "1", "--max-interval", "3", "--max-down", "2", "--duration", "90", "--settle", "90",
        "--resumes", "0"])
    r = run(args)
    print(f"\nfaults {dict(r['faults'])}; agents moved after a kill {r['agents_moved_s']} s; rollout moved "
          f"{r['rollout_moved_s']} s; database faults {r['database_faults']}; {r['successful_steps']} steps; "
          f"wall {r['wall_s']} s after setup {r['setup_s']} s; load {r['load_1m']}")
    assert problems(r) == [], r
    assert r["kills"] == 3 and r["pg_stops"] == 2 and r["resumes"] == 0
    assert r["faults"]["pg-stop-fast"] == 1 and r["faults"]["pg-stop-immediate"] == 1
    assert r["states"] == {"done": 20}
    assert r["agents_moved_s"] is not None and r["agents_moved_s"]["max"] < 15
