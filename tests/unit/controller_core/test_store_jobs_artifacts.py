"""Store migrations, enrollment tokens, the job dispatcher and the artifact store, without gRPC."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from pathlib import Path

import pytest
from sqlalchemy import inspect, update

from fleetctl.controller.artifacts import ArtifactStore, Provenance, safe_filename
from fleetctl.controller.ca import CertAuthority, cert_identity, make_csr, new_key
from fleetctl.controller.enrollment import Enrollment
from fleetctl.controller.jobs import JobDispatcher, JobEventRecord
from fleetctl.controller.registry import Registry
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import EnrollmentToken
from fleetctl.fleet.errors import AuthError, ConflictError, InputError, NotFoundError
from fleetctl.fleet.jobs import JobOutcome, JobStatus
from tests.unit.controller_core.util import add_identity, facts


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'c.db'}")


def test_migrations_create_tables_and_are_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    s1 = open_store(url)
    tables = set(inspect(s1.engine).get_table_names())
    assert {"nodes", "facts_history", "identities", "enrollment_tokens", "audit_log", "jobs", "job_events",
            "artifacts", "node_events", "alembic_version"} <= tables
    s1.close()
    open_store(url).close()  # second start: nothing to do
    with open_store(url).engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_token_lifecycle(store: Store, tmp_path: Path) -> None:
    enr = Enrollment(store, CertAuthority(tmp_path / "ca"))
    token, listing = enr.create_token(dt.timedelta(minutes=5), "n1")
    assert listing["state"] == "active" and token not in str(enr.list_tokens())
    key = new_key()
    with pytest.raises(AuthError, match="for host n1"):
        enr.enroll(token, "n2", make_csr(key, "n2"))
    res = enr.enroll(token, "n1", make_csr(key, "n1"))
    assert cert_identity(res.certificate_pem)[0] == res.agent_id
    assert enr.list_tokens()[0]["state"] == "used"
    with pytest.raises(AuthError, match="already used"):
        enr.enroll(token, "n1", make_csr(key, "n1"))
    t2, _ = enr.create_token()
    with store.session() as s:
        s.execute(update(EnrollmentToken).where(EnrollmentToken.prefix == t2[:12])
                  .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert enr.list_tokens()[1]["state"] == "expired"
    with pytest.raises(InputError):
        enr.create_token(dt.timedelta(seconds=0))
    with pytest.raises(NotFoundError):
        enr.revoke_token("nope")
    ident = enr.identities.authenticate(res.agent_id, cert_identity(res.certificate_pem)[1])
    assert ident.hostname == "n1"
    with pytest.raises(AuthError, match="serial"):
        enr.identities.authenticate(res.agent_id, "abc")
    enr.revoke_agent("n1")
    with pytest.raises(AuthError, match="revoked"):
        enr.identities.authenticate(res.agent_id, None)


def test_server_certificate_covers_requested_names(tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "ca")
    _, cert1 = ca.server_credentials(["10.1.0.1"])
    _, again = ca.server_credentials(["10.1.0.1"])
    assert cert1 == again
    _, cert2 = ca.server_credentials(["10.1.0.1", "ctl.example"])
    assert cert2 != cert1
    assert CertAuthority(tmp_path / "ca").ca_pem == ca.ca_pem  # reloaded, not recreated
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0


async def test_dispatcher_submit_stream_complete(store: Store) -> None:
    ident = add_identity(store, "n1")
    Registry(store).report_facts(ident, facts("n1"))
    jobs = JobDispatcher(store)
    with pytest.raises(NotFoundError):
        await jobs.submit_job("ghost", "verify")
    first = await jobs.submit_job("n1", "install-wheel", {"x": 1}, timeout=60)
    stream = jobs.stream_for("n1")
    spec = await asyncio.wait_for(stream.__anext__(), 2)
    assert spec.job_id == first and jobs.get(first)["status"] == "dispatched"
    second = await jobs.submit_job("n1", "verify", {}, timeout=60)
    assert (await asyncio.wait_for(stream.__anext__(), 2)).job_id == second
    now = utcnow()
    assert jobs.record_events("n1", [JobEventRecord(first, 1, "runner_on_ok", {}, now)]) == 1
    assert jobs.record_events("n1", [JobEventRecord(first, 1, "runner_on_ok", {}, now)]) == 0  # duplicate
    with pytest.raises(NotFoundError):
        jobs.record_events("other", [JobEventRecord(first, 2, "x", {}, now)])
    assert jobs.get(first)["status"] == "running"
    waiter = asyncio.create_task(jobs.wait(first, timeout=5))
    jobs.complete("n1", JobOutcome(first, JobStatus.SUCCESSFUL, 0, {"ok": True}))
    assert (await waiter).result == {"ok": True}
    jobs.complete("n1", JobOutcome(first, JobStatus.FAILED, 1))  # late duplicate: ignored
    assert jobs.get(first)["status"] == "successful"
    with pytest.raises(InputError):
        jobs.complete("n1", JobOutcome(second, JobStatus.RUNNING))
    jobs.expire(utcnow() + dt.timedelta(hours=2))
    assert jobs.get(second)["status"] == "timeout"
    with pytest.raises(ConflictError):
        jobs.cancel(second)
    await stream.aclose()


async def _running_job(jobs: JobDispatcher, node: str, counter_events: int = 1) -> str:
    """A job the node's agent took and reported events for (status ``running``)."""
    job_id = await jobs.submit_job(node, "build-from-source", {}, timeout=5400)
    stream = jobs.stream_for(node)
    assert (await asyncio.wait_for(stream.__anext__(), 2)).job_id == job_id
    await stream.aclose()
    jobs.record_events(node, [JobEventRecord(job_id, i + 1, "runner_on_ok", {}, utcnow())
                              for i in range(counter_events)])
    assert jobs.get(job_id)["status"] == "running"
    return job_id


async def test_restarted_agent_without_the_job_interrupts_it(store: Store) -> None:
    for host in ("n1", "n2"):
        Registry(store).report_facts(add_identity(store, host), facts(host))
    jobs = JobDispatcher(store)
    lost = await _running_job(jobs, "n1", counter_events=3)
    kept = await _running_job(jobs, "n1")
    other_node = await _running_job(jobs, "n2")
    queued = await jobs.submit_job("n1", "verify", {}, timeout=60)  # pending: sent on the new stream
    finished: list[tuple[str, str]] = []
    jobs.on_job_finished = lambda node, o: finished.append((node, o.status))
    callbacks: list[JobOutcome] = []
    jobs.add_done_callback(lost, callbacks.append)
    seen: list[JobEventRecord] = []
    jobs.add_event_listener(seen.append)
    waiter = asyncio.create_task(jobs.wait(lost, timeout=5))

    # the agent process restarted: it holds `kept` only (say, a job whose result it is still sending)
    stream = jobs.stream_for("n1", held={kept})
    assert (await asyncio.wait_for(stream.__anext__(), 2)).job_id == queued
    outcome = await waiter
    assert outcome.status == "failed" and outcome.result == {"interrupted": True}
    assert outcome.error and outcome.error.startswith("interrupted: the agent on n1 restarted")
    assert f"fleetctl job {lost}" in outcome.error
    assert callbacks == [outcome] and finished == [("n1", "failed")]
    shown = jobs.get(lost)
    assert shown["status"] == "failed" and shown["error"] == outcome.error and shown["finished_at"]
    last = shown["events"][-1]
    assert last["event"] == "fleet_job_interrupted" and last["counter"] == 4  # after the agent's own events
    assert last["data"]["node"] == "n1" and last["data"]["held_job_ids"] == [kept]
    assert [e.event for e in seen] == ["fleet_job_interrupted"]
    assert jobs.get(kept)["status"] == "running" and jobs.get(other_node)["status"] == "running"
    assert lost not in jobs._deadlines  # the watchdog has nothing left to do for it

    # a late result from the old process is ignored; the job stays failed
    jobs.complete("n1", JobOutcome(lost, JobStatus.SUCCESSFUL, 0, {"late": True}))
    assert jobs.get(lost)["status"] == "failed" and jobs.get(lost, events=False)["result"] == {"interrupted": True}
    # the kept job's result still lands
    jobs.complete("n1", JobOutcome(kept, JobStatus.SUCCESSFUL, 0, {}))
    assert jobs.get(kept)["status"] == "successful"
    await stream.aclose()


async def test_reconnect_holding_the_job_or_saying_nothing_interrupts_nothing(store: Store) -> None:
    Registry(store).report_facts(add_identity(store, "n1"), facts("n1"))
    jobs = JobDispatcher(store)
    running = await _running_job(jobs, "n1")
    dispatched = await jobs.submit_job("n1", "verify", {}, timeout=60)
    first = jobs.stream_for("n1")
    assert (await asyncio.wait_for(first.__anext__(), 2)).job_id == dispatched
    await first.aclose()
    assert jobs.get(dispatched)["status"] == "dispatched"

    # same agent process (a network blip, a controller restart): it holds its running job
    again = jobs.stream_for("n1", held={running})
    assert (await asyncio.wait_for(again.__anext__(), 2)).job_id == dispatched  # re-sent, as before
    await again.aclose()
    assert jobs.get(running)["status"] == "running"
    # an agent that predates held_job_ids says nothing: left to the watchdog, as before
    legacy = jobs.stream_for("n1", held=None)
    assert (await asyncio.wait_for(legacy.__anext__(), 2)).job_id == dispatched
    await legacy.aclose()
    assert jobs.get(running)["status"] == "running"
    # a restarted agent holding nothing: the running job is interrupted, the dispatched one is re-sent
    # (no event of it arrived, so the old process may never have received it)
    fresh = jobs.stream_for("n1", held=())
    assert (await asyncio.wait_for(fresh.__anext__(), 2)).job_id == dispatched
    assert jobs.get(running)["status"] == "failed" and jobs.get(dispatched)["status"] == "dispatched"
    await fresh.aclose()


USER = Provenance.user("admin")


def test_artifact_store(store: Store, tmp_path: Path) -> None:
    arts = ArtifactStore(tmp_path / "artifacts", store, max_bytes=1000)
    info = arts.put_bytes(b"hello", "a.whl", "wheel", provenance=USER)
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert arts.path_for(info.sha256).relative_to(tmp_path / "artifacts").parts[:2] == ("sha256", info.sha256[:2])
    assert b"".join(arts.iter_chunks(info.sha256, 2)) == b"hello"
    assert arts.put_bytes(b"hello", "a.whl", "wheel", provenance=USER) == info  # same content: same artifact
    for bad in ("../x", "a/b", ".hidden", "", "x" * 300, "a b"):
        with pytest.raises(InputError):
            safe_filename(bad)
    with pytest.raises(InputError, match="limit"):
        arts.put_bytes(b"x" * 1001, "big.bin", provenance=USER)
    with pytest.raises(InputError, match="announced"), \
            arts.writer("c.bin", provenance=USER, expected_sha256="0" * 64) as w:
        w.write(b"data")
    with pytest.raises(InputError):
        arts.writer("c.bin", kind="exe", provenance=USER)
    assert list((tmp_path / "artifacts" / "tmp").iterdir()) == []  # no leftovers
    with pytest.raises(NotFoundError):
        arts.get("f" * 64)
    assert [a.sha256 for a in arts.list_all()] == [info.sha256]
