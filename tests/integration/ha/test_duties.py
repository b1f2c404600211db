"""The ``drift-checks`` and ``cleanup`` leader duties with two real controller processes on one PostgreSQL database
of the test's own (issue 17; docs/ha.md). A drift re-verification recorded through controller A — the holder of
the drift-checks lease — outlives A's ``kill -9`` before it is due, and B, once it took the lease over, submits it
once, when due. The cleanup runs on the lease holder only and removes exactly the expired rows."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from fleetctl.agent.client import Agent, AgentConfig
from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.controller.store import open_store
from tests.integration.fleet_support import profile_facts
from tests.integration.ha.test_shared_liveness import _query
from tests.integration.rollout.controller_proc import ControllerProc, api, until
from tests.unit.controller_core import cleanup_rows

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

HOST = "h100-drift-ha"
DEBOUNCE = 20.0  # long enough for A to be killed and B to take the lease over (TTL 5 s) before the check is due


def _holder(url: str, lease: str) -> str | None:
    rows = _query(url, f"SELECT holder FROM leases WHERE name = '{lease}' AND expires_at > clock_timestamp()")
    return str(rows[0][0]) if rows and rows[0][0] else None


async def _held(url: str, lease: str) -> str | None:
    return _holder(url, lease)


def _pid(holder: str) -> int:
    return int(holder.split(":")[1])


def _log(cp: ControllerProc) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(cp.state.parent.glob("controller-*.log")))


def _drift_jobs(url: str) -> list[tuple[str, dt.datetime]]:
    return [(str(job_id), created) for job_id, created in _query(
        url, f"SELECT id, created_at FROM jobs WHERE node = '{HOST}' AND kind = 'verify' "
             "AND vars->>'trigger' = 'drift' ORDER BY created_at")]


async def test_a_drift_check_outlives_the_kill9_of_its_controller_and_is_submitted_once_by_the_other(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DRIFT_DEBOUNCE", str(DEBOUNCE))
    a, b = (ControllerProc(tmp_path / n / "controller", db=pg_url) for n in ("a", "b"))
    a.start()
    agent_task: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    try:
        await a.ready()
        assert a.proc is not None
        leader = await until(lambda: _held(pg_url, "drift-checks"), 30)
        assert _pid(leader) == a.proc.pid  # A leads: its death must move the duty too
        b.start()
        await b.ready()

        # a real agent of A (gRPC, mTLS) whose simulated node reports a torch upgrade after its next job
        facts = profile_facts("h100", HOST)
        runner = SimulatedJobRunner(lambda: facts, tmp_path / "jobs")
        runner.seconds = {"*": 0.05}
        token = (await api(a, "POST", "/tokens", {"ttl_seconds": 600, "hostname": HOST}))["token"]
        agent = Agent(AgentConfig(controller=f"127.0.0.1:{a.ports['grpc']}",
                                  enroll_address=f"127.0.0.1:{a.ports['enroll']}", state_dir=tmp_path / "agent",
                                  facts=lambda: runner.facts, ca_file=a.state / "ca" / "ca.pem", token=token,
                                  runner=runner, backoff_initial=0.1, backoff_max=0.5))
        agent_task = asyncio.create_task(agent.run(stop))

        async def online() -> bool:
            nodes = (await api(a, "GET", "/nodes"))["nodes"]
            return any(n["hostname"] == HOST and n["status"] == "online" for n in nodes)

        await until(online, 30)
        assert runner.facts.torch is not None
        runner.facts = replace(runner.facts, torch=replace(runner.facts.torch, version="2.8.0+cu128"))
        await api(a, "POST", "/verify", {"hosts": [HOST], "mode": "quick"})  # when it ends, A asks for facts

        async def recorded() -> tuple[dt.datetime, dt.datetime, str] | None:
            rows = _query(pg_url, f"SELECT first_changed_at, due_at, recorded_by FROM drift_checks "
                                  f"WHERE hostname = '{HOST}'")
            return (rows[0][0], rows[0][1], str(rows[0][2])) if rows else None

        changed_at, due_at, recorded_by = await until(recorded, 30, interval=0.05)
        assert _pid(recorded_by) == a.proc.pid
        assert (due_at - changed_at).total_seconds() == pytest.approx(DEBOUNCE)
        a.kill9()  # before it is due: nothing of the check is left in A's memory, nor anywhere but the database
        killed_at = _query(pg_url, "SELECT clock_timestamp()")[0][0]
        assert killed_at < due_at, "A was killed only after the check was due"

        async def submitted() -> list[tuple[str, dt.datetime]]:
            return _drift_jobs(pg_url)

        (job_id, created_at), *more = await until(submitted, DEBOUNCE + 30, interval=0.1)
        assert not more
        assert created_at >= due_at - dt.timedelta(seconds=0.05), "submitted before it was due"
        assert b.proc is not None and _pid(_holder(pg_url, "drift-checks") or "x:0") == b.proc.pid
        assert re.search(rf"node {HOST}: drift \(torch\.version\) → verify job {job_id}", _log(b))
        assert "→ verify job" not in _log(a)
        assert not _query(pg_url, "SELECT hostname FROM drift_checks")
        await asyncio.sleep(5)  # several rounds of B's duty later: still the one job
        assert [j for j, _ in _drift_jobs(pg_url)] == [job_id]
        print(f"\ndrift check recorded through A, A killed {(due_at - killed_at).total_seconds():.1f}s before it was "
              f"due; submitted by B {(created_at - due_at).total_seconds():.2f}s after its due time")
    finally:
        stop.set()
        if agent_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent_task, 15)
        a.stop()
        b.stop()


async def _metrics(cp: ControllerProc) -> dict[str, float]:
    token = (cp.state / "admin.token").read_text().strip()
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
        text = (await c.get(f"{cp.url}/metrics")).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("fleet_controller_cleanup_")}


def _removed(metrics: dict[str, float]) -> dict[str, int]:
    return {t: int(metrics.get(f'fleet_controller_cleanup_removed_rows_total{{table="{t}"}}', -1))
            for t in cleanup_rows.REMOVED}


async def test_cleanup_runs_on_the_lease_holder_only_and_removes_exactly_the_expired_rows(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CLEANUP_INTERVAL", "1")
    procs = [ControllerProc(tmp_path / n / "controller", db=pg_url) for n in ("a", "b")]
    for p in procs:
        p.start()
    try:
        for p in procs:
            await p.ready()
        holder = await until(lambda: _held(pg_url, "cleanup"), 30)
        pids = {p.proc.pid: p for p in procs if p.proc is not None}
        leader = pids[_pid(holder)]
        other = next(p for p in procs if p is not leader)
        store = open_store(pg_url)
        try:
            cleanup_rows.seed(store)

            async def cleaned() -> bool:
                return _removed(await _metrics(leader)) == cleanup_rows.REMOVED

            await until(cleaned, 30, interval=0.2)
            await asyncio.sleep(3)  # a few more rounds on both: nothing more removed, nothing by the other
            duty_leases = {name for name, lease_holder in _query(pg_url, "SELECT name, holder FROM leases")
                           if lease_holder and any(f":{pid}:" in lease_holder for pid in pids)}
            cleanup_rows.check_removed_exactly_the_expired(cleanup_rows.Left.read(store), duty_leases)
        finally:
            store.close()
        assert _removed(await _metrics(leader)) == cleanup_rows.REMOVED
        other_metrics = await _metrics(other)
        assert _removed(other_metrics) == dict.fromkeys(cleanup_rows.REMOVED, 0)
        assert other_metrics['fleet_controller_cleanup_rounds_total{outcome="done"}'] == 0
        assert (await _metrics(leader))['fleet_controller_cleanup_rounds_total{outcome="done"}'] >= 3
        assert "cleanup round: removed 2 enrollment_tokens" in _log(leader)
        assert "cleanup round" not in _log(other)
        assert _holder(pg_url, "cleanup") == holder  # held all along
    finally:
        for p in procs:
            p.stop()
