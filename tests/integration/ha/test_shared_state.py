"""What used to be per-controller state is shared through PostgreSQL (issue 17; controller/shared_ca.py,
controller/artifacts.py ``LargeObjects``): two controller processes on one database of this test's own, the
second started with an EMPTY state dir — nothing copied.

- B signs with the CA A created: an agent given A's ``ca.pem`` enrolls with B and holds its session there;
- an artifact uploaded to A is served by B (FetchArtifact) to that agent, byte for byte, from the database;
- each controller accepts the other's admin token;
- a controller that ran on files before has its CA (and its enrolled agents) carried into the database at its
  first start on PostgreSQL, and a second controller then signs with that CA;
- with a key-encryption key the CA key is sealed in the database, and a controller without that key refuses to
  start, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509

from fleetctl.agent.client import Agent, AgentConfig
from tests.integration.rollout.controller_proc import ControllerProc, api, until
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@contextlib.contextmanager
def shared_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards: its SQLAlchemy URL."""
    name = f"fleet_shared_state_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(db_url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3) as conn:
        return conn.execute(sql).fetchall()


async def start_agent(via: ControllerProc, host: str, ca_file: Path, tmp: Path) -> tuple[Agent, asyncio.Event,
                                                                                          asyncio.Task[None]]:
    """A real agent (gRPC over mutual TLS, simulated executor) enrolling with ``via``, trusting ``ca_file``."""
    token = (await api(via, "POST", "/tokens", {"ttl_seconds": 600, "hostname": host}))["token"]
    runner = SimRunner.for_profile(host, "a100", Script(), tmp / "work" / host)
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{via.ports['grpc']}",
                              enroll_address=f"127.0.0.1:{via.ports['enroll']}", state_dir=tmp / "agents" / host,
                              facts=runner.current_facts, ca_file=ca_file, token=token, runner=runner,
                              backoff_initial=0.1, backoff_max=0.5))
    runner.agent = agent
    stop = asyncio.Event()
    return agent, stop, asyncio.create_task(agent.run(stop))


async def online(cp: ControllerProc, host: str) -> bool:
    nodes = (await api(cp, "GET", "/nodes"))["nodes"]
    return any(n["hostname"] == host and n["status"] == "online" for n in nodes)


async def upload(cp: ControllerProc, data: bytes, filename: str) -> str:
    token = (cp.state / "admin.token").read_text().strip()
    async with httpx.AsyncClient(base_url=cp.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as c:
        resp = await c.post("/api/v1/artifacts", params={"filename": filename, "kind": "other"}, content=data)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["sha256"])


async def test_b_started_empty_enrolls_with_as_ca_and_serves_as_artifacts(tmp_path: Path) -> None:
    with shared_database() as db:
        a = ControllerProc(tmp_path / "a" / "controller", db=db)
        b = ControllerProc(tmp_path / "b" / "controller", db=db)
        handle = None
        try:
            a.start()
            await a.ready()
            b.start()  # an empty state dir: no ca/ copied
            await b.ready()
            a_ca = (a.state / "ca" / "ca.pem").read_bytes()
            assert (b.state / "ca" / "ca.pem").read_bytes() == a_ca  # one CA, written from the database
            assert not (b.state / "ca" / "ca.key").exists()  # B never wrote the key to disk
            [(origin, sealing, cert_pem)] = query(db, "SELECT origin, key_encryption, cert_pem FROM ca")
            assert origin.startswith("created by ") and str(a.state / "ca") in origin and sealing == "none"
            assert cert_pem.encode() == a_ca

            # every controller accepts the other's admin token
            async with httpx.AsyncClient(base_url=b.url, timeout=5) as c:
                a_token = (a.state / "admin.token").read_text().strip()
                assert (await c.get("/api/v1/nodes", headers={"Authorization": f"Bearer {a_token}"})).status_code \
                    == 200
                assert (await c.get("/api/v1/nodes", headers={"Authorization": "Bearer x" + a_token})).status_code \
                    == 401

            # an artifact uploaded to A, 3.5 MiB (several large-object chunks), then asked of B by an agent on B
            data = os.urandom(3 * 1024 * 1024 + 512 * 1024)
            sha = await upload(a, data, "payload.bin")
            assert hashlib.sha256(data).hexdigest() == sha
            assert not (b.state / "artifacts" / "sha256" / sha[:2] / sha).exists()

            handle = await start_agent(b, "node-b", a.state / "ca" / "ca.pem", tmp_path)  # A's CA file
            await until(lambda: online(b, "node-b"), 30)
            [(holder,)] = query(db, "SELECT s.controller_id FROM agent_sessions s JOIN nodes n ON n.id = s.node_id "
                                    "WHERE n.hostname = 'node-b'")
            assert b.proc is not None and int(holder.split(":")[1]) == b.proc.pid  # its session is B's
            fetched = await handle[0].fetch_artifact(sha, tmp_path / "fetched")
            assert fetched.name == "payload.bin" and fetched.read_bytes() == data
            assert (b.state / "artifacts" / "sha256" / sha[:2] / sha).read_bytes() == data  # B's cache now
            a.stop()  # served by B alone from now on: its cache, and the database behind it
            shutil.rmtree(b.state / "artifacts" / "sha256")
            again = await handle[0].fetch_artifact(sha, tmp_path / "again")
            assert again.read_bytes() == data
        finally:
            if handle is not None:
                handle[1].set()
                await asyncio.wait([handle[2]], timeout=10)
            b.stop()
            a.stop()


async def test_a_file_ca_is_migrated_into_the_database_on_first_start(tmp_path: Path) -> None:
    with shared_database() as db:
        # A runs on SQLite first (its CA in its state dir) and enrolls an agent
        a = ControllerProc(tmp_path / "a" / "controller")
        b = ControllerProc(tmp_path / "b" / "controller", db=db)
        handle = None
        try:
            a.start()
            await a.ready()
            file_ca = (a.state / "ca" / "ca.pem").read_bytes()
            file_key = (a.state / "ca" / "ca.key").read_bytes()
            handle = await start_agent(a, "node-old", a.state / "ca" / "ca.pem", tmp_path)
            await until(lambda: online(a, "node-old"), 30)
            handle[1].set()
            await asyncio.wait([handle[2]], timeout=10)
            handle = None
            a.stop()

            # the same state dir, now on PostgreSQL: its CA goes into the database, unchanged
            a.db = db
            a.start()
            await a.ready()
            [(origin, key_data, cert_pem)] = query(db, "SELECT origin, key_data, cert_pem FROM ca")
            assert origin.startswith("migrated from ") and str(a.state / "ca") in origin
            assert bytes(key_data) == file_key and cert_pem.encode() == file_ca
            assert (a.state / "ca" / "ca.pem").read_bytes() == file_ca

            # B, empty, signs with the migrated CA: an agent trusting the old file enrolls with B
            b.start()
            await b.ready()
            assert (b.state / "ca" / "ca.pem").read_bytes() == file_ca
            handle = await start_agent(b, "node-new", a.state / "ca" / "ca.pem", tmp_path)
            await until(lambda: online(b, "node-new"), 30)
        finally:
            if handle is not None:
                handle[1].set()
                await asyncio.wait([handle[2]], timeout=10)
            b.stop()
            a.stop()


def serve(state: Path, db: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``fleet-controller serve`` expected to stop at start (a port 0 would do: it never gets to listen)."""
    return subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(state),
                           "--db", db, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                           "--http-insecure", *extra], capture_output=True, text=True, timeout=60)


async def test_the_ca_key_is_sealed_with_the_key_encryption_key(tmp_path: Path) -> None:
    kek = tmp_path / "kek"
    kek.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    kek.chmod(0o600)
    other = tmp_path / "other-kek"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    with shared_database() as db:
        a = ControllerProc(tmp_path / "a" / "controller", db=db)
        try:
            os.environ["FLEET_CA_KEK_FILE"] = str(kek)  # ControllerProc passes the environment on
            try:
                a.start()
            finally:
                del os.environ["FLEET_CA_KEK_FILE"]
            await a.ready()
        finally:
            a.stop()
        [(sealing, key_data, kek_id)] = query(db, "SELECT key_encryption, key_data, kek_id FROM ca")
        assert sealing == "aes-256-gcm" and b"PRIVATE KEY" not in bytes(key_data) and len(kek_id) == 16

        no_key = serve(tmp_path / "b" / "controller", db)
        assert no_key.returncode != 0 and "sealed" in no_key.stderr and "ca_kek_file" in no_key.stderr, no_key.stderr
        wrong = serve(tmp_path / "c" / "controller", db, "--ca-kek-file", str(other))
        assert wrong.returncode != 0 and kek_id in wrong.stderr, wrong.stderr
        bad = tmp_path / "short-kek"
        bad.write_text("c2hvcnQ=")
        short = serve(tmp_path / "d" / "controller", db, "--ca-kek-file", str(bad))
        assert short.returncode == 2 and "not base64 of 32 bytes" in short.stderr, short.stderr
        # nothing written by the refused starts: still one CA, sealed as before
        assert query(db, "SELECT key_encryption, kek_id FROM ca") == [("aes-256-gcm", kek_id)]


async def test_ca_import_with_db_replaces_the_shared_ca_for_every_controller(tmp_path: Path) -> None:
    from fleetctl.controller.ca import new_ca

    key_pem, cert_pem = new_ca()  # the operator's own root
    (tmp_path / "op.key").write_bytes(key_pem)
    (tmp_path / "op.pem").write_bytes(cert_pem)
    with shared_database() as db:
        a = ControllerProc(tmp_path / "a" / "controller", db=db)
        try:
            a.start()
            await a.ready()
        finally:
            a.stop()
        first = (a.state / "ca" / "ca.pem").read_bytes()
        imported = subprocess.run(
            [sys.executable, "-m", "fleetctl.controller.main", "ca", "import", "--cert", str(tmp_path / "op.pem"),
             "--key", str(tmp_path / "op.key"), "--state-dir", str(tmp_path / "ops" / "controller"), "--db", db],
            capture_output=True, text=True, timeout=60)
        assert imported.returncode == 0, imported.stderr
        [(origin, stored)] = query(db, "SELECT origin, cert_pem FROM ca")
        assert origin.startswith("imported: ") and stored.encode() == cert_pem
        try:  # A, restarted, trusts and signs with the imported CA: its server certificate is re-issued by it
            a.start()
            await a.ready()
        finally:
            a.stop()
        assert (a.state / "ca" / "ca.pem").read_bytes() == cert_pem != first
        server = x509.load_pem_x509_certificates((a.state / "ca" / "server.pem").read_bytes())[0]
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(cert_pem))


async def test_two_controllers_starting_together_make_one_ca_and_old_files_are_published(tmp_path: Path) -> None:
    with shared_database() as db:
        a = ControllerProc(tmp_path / "a" / "controller", db=db)
        b = ControllerProc(tmp_path / "b" / "controller", db=db)
        try:
            a.start()
            b.start()  # at once, on an empty database: one CA insert wins, the other controller loads it
            await asyncio.gather(a.ready(), b.ready())
            assert (a.state / "ca" / "ca.pem").read_bytes() == (b.state / "ca" / "ca.pem").read_bytes()
            assert query(db, "SELECT count(*) FROM ca") == [(1,)]
            assert not (a.state / "ca" / "ca.key").exists() and not (b.state / "ca" / "ca.key").exists()
            data = os.urandom(300 * 1024)
            sha = await upload(a, data, "old.bin")
            a.stop()
            b.stop()
            # as if A had stored it before the store was shared: its bytes only in A's state dir
            query(db, "WITH gone AS (DELETE FROM artifact_content RETURNING oid) SELECT lo_unlink(oid) FROM gone")
            a.start()  # publishes what only it has
            await a.ready()
            a.stop()
            assert query(db, "SELECT sha256 FROM artifact_content") == [(sha,)]
            b.start()
            await b.ready()
            token = (b.state / "admin.token").read_text().strip()
            async with httpx.AsyncClient(base_url=b.url, timeout=10) as c:
                resp = await c.get(f"/api/v1/artifacts/{sha}/content", headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 200 and resp.content == data
        finally:
            b.stop()
            a.stop()
