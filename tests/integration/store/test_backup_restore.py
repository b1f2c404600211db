"""docs/operations.md, "Backup and restore", run as written: a running controller's database is backed up (SQLite:
``sqlite3 .backup``; PostgreSQL: ``pg_dump``) and its artifact store, CA and admin token with ``rsync`` while it
serves agents; the backup is checked (integrity, every artifact file its own sha256), restored into a new state
directory (and, on PostgreSQL, with ``createdb`` + ``pg_restore`` into a new database), and a second controller
started on it lists the same nodes, rollouts and artifacts — and an agent enrolled with the first controller
connects to the restored one with the certificate it already has."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.agent.client import Agent, AgentConfig
from tests.integration.fleet_support import PG_ADMIN
from tests.integration.rollout.controller_proc import (
    ControllerProc,
    all_online,
    api,
    controller_proc,
    start_agents,
    stop_agents,
    until,
)
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(180)

NODES = [("a100-1", "a100"), ("t4-1", "t4")]


PG = "postgresql://postgres@127.0.0.1:5432"


def run(*argv: str) -> str:
    missing = [tool for tool in ("sqlite3", "rsync", "pg_dump") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not installed: ./scripts/bootstrap installs them"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


async def upload(cp: ControllerProc, filename: str, data: bytes) -> dict[str, Any]:
    token = (cp.state / "admin.token").read_text().strip()
    async with httpx.AsyncClient(base_url=cp.url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
        resp = await c.post("/api/v1/artifacts", params={"filename": filename, "kind": "wheel"}, content=data)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def last_seen(cp: ControllerProc, host: str) -> dt.datetime:
    node = next(n for n in (await api(cp, "GET", "/nodes"))["nodes"] if n["hostname"] == host)
    return dt.datetime.fromisoformat(node["last_seen"])


async def inventory(cp: ControllerProc) -> dict[str, Any]:
    nodes = (await api(cp, "GET", "/nodes"))["nodes"]
    rollouts = (await api(cp, "GET", "/rollouts"))["rollouts"]
    artifacts = (await api(cp, "GET", "/artifacts"))["artifacts"]
    return {"nodes": sorted(n["hostname"] for n in nodes),
            "rollouts": sorted((r["id"], r["status"]) for r in rollouts),
            "artifacts": sorted((a["sha256"], a["filename"], a["size"]) for a in artifacts)}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def databases(request: pytest.FixtureRequest, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str] | None]:
    """None for SQLite (the state dir's file); on PostgreSQL the names of the running controller's database and of
    the one the restore creates (our own, dropped afterwards). The controller subprocess reads its database URL
    from the config file that FLEET_CONFIG names."""
    if request.param == "sqlite":
        yield None
        return
    psycopg = pytest.importorskip("psycopg")
    suffix = uuid.uuid4().hex[:10]
    source, restored = f"fleetctl_backup_{suffix}", f"fleetctl_restored_{suffix}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{source}"')
    use_database(tmp_path, monkeypatch, source)
    try:
        yield source, restored
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in (source, restored):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def use_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    config = tmp_path / f"{name}.toml"
    config.write_text(f'db = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"\n')
    monkeypatch.setenv("FLEET_CONFIG", str(config))


async def test_backup_while_running_then_restore_into_a_new_state_dir(
        tmp_path: Path, databases: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = b"PK\x03\x04 not really a wheel, but content-addressed all the same " * 1000
    backup = tmp_path / "backup"
    async with controller_proc(tmp_path) as cp:
        agents = await start_agents(cp, NODES, Script(delays={}), tmp_path)
        try:
            await until(lambda: all_online(cp, len(NODES)), 30)
            stored = await upload(cp, "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
                                  wheel)
            rollout = await api(cp, "POST", "/rollouts", {"canary": 0, "batch": "100%", "actor": "tester"})

            async def finished() -> bool:
                status = (await api(cp, "GET", f"/rollouts/{rollout['id']}"))["status"]
                return status not in ("running", "aborting", "rolling-back")

            await until(finished, 60)
            before = await inventory(cp)
            assert before["nodes"] == ["a100-1", "t4-1"] and before["rollouts"] and before["artifacts"]

            # the documented backup, while the controller runs and the agents heartbeat into the database
            state = cp.state
            backup.mkdir(mode=0o700)
            if databases is None:
                run("sqlite3", str(state / "controller.db"), f".backup '{backup / 'controller.db'}'")
            else:
                run("pg_dump", "--format=custom", f"--file={backup / 'fleetctl.dump'}", f"{PG}/{databases[0]}")
            run("rsync", "-a", f"{state / 'artifacts'}/", f"{backup / 'artifacts'}/")
            run("rsync", "-a", str(state / "ca"), str(state / "admin.token"), f"{backup}/")
            # written after the backup: must not come back
            late = await upload(cp, "late-0.1-py3-none-any.whl", b"after the backup" * 100)
        finally:
            await stop_agents(agents)

    if databases is None:
        assert run("sqlite3", str(backup / "controller.db"), "PRAGMA integrity_check").strip() == "ok"
    else:
        assert "TABLE DATA" in run("pg_restore", "--list", str(backup / "fleetctl.dump"))
    files = [p for p in (backup / "artifacts").rglob("*") if p.is_file() and "sha256" in p.parts]
    assert files and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in files)
    assert stored["sha256"] in {p.name for p in files} and late["sha256"] not in {p.name for p in files}

    restored = tmp_path / "restored" / "controller"
    restored.mkdir(parents=True, mode=0o700)
    if databases is None:
        shutil.copy(backup / "controller.db", restored / "controller.db")
    else:
        run("createdb", "--host=127.0.0.1", "--username=postgres", databases[1])
        run("pg_restore", f"--dbname={PG}/{databases[1]}", "--no-owner", str(backup / "fleetctl.dump"))
        use_database(tmp_path, monkeypatch, databases[1])
    run("rsync", "-a", f"{backup / 'artifacts'}/", f"{restored / 'artifacts'}/")
    run("rsync", "-a", str(backup / "ca"), str(backup / "admin.token"), f"{restored}/")

    second = ControllerProc(restored)
    second.start()
    agent_task = None
    stop = asyncio.Event()
    try:
        await second.ready()
        after = await inventory(second)
        assert after == before
        # an agent of the first controller: no token, only the certificate it enrolled with (checked against
        # the restored CA); it counts as back when it heartbeats into the restored database
        host, profile = NODES[0]
        seen_at_backup = await last_seen(second, host)
        runner = SimRunner.for_profile(host, profile, Script(delays={}), tmp_path / "work2" / host)
        agent = Agent(AgentConfig(controller=f"127.0.0.1:{second.ports['grpc']}",
                                  enroll_address=f"127.0.0.1:{second.ports['enroll']}",
                                  state_dir=tmp_path / "agents" / host, facts=runner.current_facts,
                                  runner=runner, backoff_initial=0.1, backoff_max=0.5))
        runner.agent = agent
        agent_task = asyncio.create_task(agent.run(stop))

        async def back_online() -> bool:
            return await last_seen(second, host) > seen_at_backup

        await until(back_online, 30)
    finally:
        stop.set()
        if agent_task is not None:
            await asyncio.wait([agent_task], timeout=10)
        second.stop()
