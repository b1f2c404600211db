"""The HA fault soak, short (issue 17; benchmarks/ha_chaos.py is the long run): three controller processes on one
PostgreSQL database of the test's own, 20 ``fleet-agent run --controller A,B,C`` processes, a rollout with simulated
source builds; while it runs, three ``kill -9`` of a random controller (each restarted), one
``pg_terminate_backend`` of a controller's backends and a 2 s database outage (the controllers' relay to
PostgreSQL goes dark). Afterwards: the rollout succeeded with every node ``done``, no node lost or stuck, exactly one
successful job per node and step kind, no job executed twice (agents' logs), the audit log has the rollout's start
and finish."""

from __future__ import annotations

import pytest

from benchmarks.ha_chaos import parser, problems, run

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(280)]


def test_rollout_survives_controller_kills_backend_kills_and_a_db_outage(pg_url: str) -> None:
    args = parser().parse_args([
        "--seed", "17", "--agents", "20", "--kills", "3", "--terminates", "1", "--outages", "1",
        "--outage-seconds", "2", "--build-seconds", "20", "--step-seconds", "1", "--min-interval", "1",
        "--max-interval", "3", "--max-down", "2", "--duration", "60", "--settle", "90", "--resumes", "0"])
    r = run(args)
    print(f"\nfaults {dict(r['faults'])}; agents moved after a kill {r['agents_moved_s']} s; rollout moved "
          f"{r['rollout_moved_s']} s; {r['successful_steps']} steps; wall {r['wall_s']} s after setup {r['setup_s']} s")
    assert problems(r) == [], r
    assert r["kills"] == 3 and r["resumes"] == 0
    assert r["states"] == {"done": 20}
    assert r["agents_moved_s"] is not None and r["agents_moved_s"]["max"] < 15
