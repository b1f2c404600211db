"""The pure parts of benchmarks/ha_throughput.py: quantiles, the offered schedule, how jobs are routed over the
controllers, the machine's CPU and starvation verdict, a job window's figures, and the controllers' database URL."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from benchmarks.ha_throughput import (
    CpuTicks,
    Postgres,
    job_routes,
    job_stats,
    offered_times,
    percentile,
    starvation,
)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_offered_times_keep_a_fixed_rate_inside_the_window() -> None:
    times = offered_times(20.0, 100.0, 3.0)
    assert len(times) == 60
    assert times[0] == 100.0 and times[-1] == pytest.approx(102.95)
    assert all(b - a == pytest.approx(0.05) for a, b in pairwise(times))
    with pytest.raises(ValueError, match="above 0"):
        offered_times(0.0, 0.0, 1.0)


@pytest.mark.parametrize("controllers", [1, 2, 3, 4])
def test_job_routes_submit_round_robin_and_take_every_pair_alike(controllers: int) -> None:
    routes = job_routes(controllers, controllers * controllers * 5)
    assert [on for on, _ in routes[:controllers]] == list(range(controllers))
    pairs = Counter(routes)
    assert len(pairs) == controllers * controllers and set(pairs.values()) == {5}
    other = sum(on != agent for on, agent in routes) / len(routes)
    assert other == pytest.approx((controllers - 1) / controllers)


def test_cpu_ticks_from_proc_stat() -> None:
    ticks = CpuTicks.parse("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n")
    assert ticks == CpuTicks(busy=160, steal=10, total=990)


def test_starvation_says_why() -> None:
    assert starvation(1.2, 16, 0.40, 0.0) == ""
    assert starvation(2.5, 2, 0.50, 0.0) == "load average 2.5 on 2 cores"
    assert starvation(0.5, 2, 0.95, 0.06) == "CPUs 95% busy, 6% stolen"


def record(k: int, on: int, agent_on: int, job: str | None, error: str | None = None) -> dict[str, Any]:
    return {"scheduled": 10.0 + k, "sent": 10.0 + k, "answered": 10.05 + k, "on": on, "agent_on": agent_on,
            "node": f"load-{agent_on}-{k}", "job": job, "error": error}


def test_job_stats_of_a_window() -> None:
    records = [record(0, 0, 0, "a"), record(1, 1, 0, "b"), record(2, 0, 1, "c"), record(3, 1, 1, "c"),
               record(4, 0, 0, None, "HTTP 503"), record(5, 1, 0, "d"), record(6, 0, 1, "e")]
    rows = {"a": ("successful", 10.02, 10.03, 10.1), "b": ("successful", 11.02, 11.9, 12.0),
            "c": ("successful", 12.02, 12.8, 13.0), "d": ("failed", 15.02, 15.5, 15.6),
            "e": ("dispatched", 16.02, 16.5, None)}
    stats = job_stats(records, rows, 10.0, 17.0, 1.0)
    assert stats["submitted"] == 7
    assert stats["error_kinds"] == {"node still busy (job reused)": 1, "HTTP 503": 1, "job failed": 1,
                                    "unfinished after the drain": 1}
    assert stats["errors"] == 4
    assert stats["p50_ms"] == 1000.0 and stats["max_ms"] == 1000.0  # b and c: 1 s; a: 100 ms
    assert stats["same_p50_ms"] == 100.0 and stats["other_p50_ms"] == 1000.0
    assert stats["completed_per_s"] == pytest.approx(4 / 7, abs=0.05)  # a, b, c, d finished inside the window
    assert stats["saturated"]  # e never finished
    assert stats["other_controller_fraction"] == pytest.approx(round(4 / 7, 2))


def test_job_stats_keep_up() -> None:
    records = [record(k, k % 2, (k + k // 2) % 2, f"j{k}") for k in range(10)]
    rows = {f"j{k}": ("successful", 10.0 + k, 10.1 + k, 10.2 + k) for k in range(10)}
    stats = job_stats(records, rows, 10.0, 20.0, 1.0)
    assert not stats["saturated"] and stats["errors"] == 0 and stats["completed_per_s"] == 1.0
    assert stats["post_p99_ms"] == 50.0


def test_postgres_url_for_the_controllers() -> None:
    url = make_url(Postgres("host=db.example port=6432 user=fleet password='p@ss word' sslmode=require")
                   .url("fleet_tp_1", "fleet-tp-ctl-0"))
    assert (url.drivername, url.host, url.port, url.username, url.password, url.database) == \
        ("postgresql+psycopg", "db.example", 6432, "fleet", "p@ss word", "fleet_tp_1")
    assert dict(url.query) == {"sslmode": "require", "application_name": "fleet-tp-ctl-0"}
    socket = make_url(Postgres("host=/var/run/postgresql user=postgres").url("x"))
    assert socket.host is None and dict(socket.query) == {"host": "/var/run/postgresql"}
    assert "dbname=admin" in Postgres("host=/tmp user=me dbname=admin").admin.split()  # where databases are made
    assert "dbname=postgres" in Postgres("host=127.0.0.1").admin.split()
