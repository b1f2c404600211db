"""Agent certificates over their life, with real gRPC + mutual TLS: renewal before expiry without downtime (a 30 s
certificate lifetime), and bring-your-own CA (`fleet-controller ca import`, a root or an intermediate made here with
the `cryptography` package)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from fleetctl.agent.client import Agent, AgentConfig, Credentials
from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.ca import CertAuthority, cert_identity
from fleetctl.controller.main import main as fleet_controller
from fleetctl.controller.store.models import AuditLog, Identity
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb
from tests.integration.fleet_support import controller_settings, mtls_stub, new_token, profile_facts, wait_for

pytestmark = pytest.mark.timeout(150)


class GatedRunner:
    """A job runner whose jobs run until the test opens the gate (a job spanning the renewal)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        self.started.set()
        emit_event({"event": "waiting"})
        await self.gate.wait()
        emit_event({"event": "done"})
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0)


def agent_for(rc: RunningController, state: Path, hostname: str, ca_file: Path | None = None,
              runner: GatedRunner | None = None) -> Agent:
    assert rc.ctx.grpc_address and rc.ctx.enroll_address
    facts = profile_facts("a100", hostname)
    cfg = AgentConfig(controller=rc.ctx.grpc_address, enroll_address=rc.ctx.enroll_address, state_dir=state,
                      facts=lambda: facts, ca_file=ca_file or rc.ctx.ca.ca_path, token=new_token(rc, hostname),
                      backoff_initial=0.1, backoff_max=0.5)
    if runner is not None:
        cfg.runner = runner
    return Agent(cfg)


def identity(rc: RunningController, hostname: str) -> Identity:
    with rc.ctx.store.session() as s:
        row = s.scalar(select(Identity).where(Identity.hostname == hostname))
        assert row is not None
        s.expunge(row)
        return row


async def test_agent_renews_a_short_lived_certificate_and_stays_online(tmp_path: Path) -> None:
    rc = await start_controller(controller_settings(tmp_path / "c", agent_cert_lifetime=30))
    runner = GatedRunner()
    agent = agent_for(rc, tmp_path / "agent", "node-r", runner=runner)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: rc.ctx.registry.status_of("node-r") == "online" and agent.heartbeats > 0, 20)
        first = identity(rc, "node-r")
        assert first.cert_not_after is not None
        lifetime = first.cert_not_after - first.created_at
        assert dt.timedelta(seconds=25) < lifetime < dt.timedelta(seconds=35)  # the setting, not a year
        old_creds = Credentials.load(tmp_path / "agent")
        assert old_creds is not None
        job_id = await rc.ctx.jobs.submit_job("node-r", "long-job", {}, timeout=120)
        await asyncio.wait_for(runner.started.wait(), 20)

        statuses: list[str | None] = []

        async def watch() -> None:  # the node's status all through the renewal
            while True:
                statuses.append(rc.ctx.registry.status_of("node-r"))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        await wait_for(lambda: agent.renewals >= 1, timeout=45)
        beats = agent.heartbeats
        await wait_for(lambda: agent.heartbeats >= beats + 2, timeout=10)  # heartbeats go on with the new one
        watcher.cancel()
        assert set(statuses) == {"online"}, statuses

        renewed = identity(rc, "node-r")
        on_disk = Credentials.load(tmp_path / "agent")
        assert on_disk is not None and on_disk.key_pem == old_creds.key_pem
        assert cert_identity(on_disk.cert_pem)[1] == renewed.cert_serial != first.cert_serial
        assert renewed.prev_cert_serial == first.cert_serial
        assert renewed.cert_not_after is not None and renewed.cert_not_after > first.cert_not_after
        async with mtls_stub(rc, old_creds) as stub:  # the replaced certificate works until it expires
            await stub.Heartbeat(pb.HeartbeatRequest(sequence=10_000), timeout=5)

        runner.gate.set()  # the job that ran across the renewal finishes and is reported
        await wait_for(lambda: rc.ctx.jobs.get(job_id)["status"] == "successful", timeout=20)
        summary = rc.ctx.registry.record("node-r")
        assert summary.agent is not None and summary.agent.cert_not_after == renewed.cert_not_after
        with rc.ctx.store.session() as s:
            assert s.scalar(select(AuditLog).where(AuditLog.action == "agent.renew")) is not None
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await rc.stop(grace=0.2)


# ---- bring your own CA ------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, key: Any, issuer: tuple[x509.Certificate, Any] | None = None, ca: bool = True) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer[0].subject if issuer else _name(cn)).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


async def ca_import(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(fleet_controller, ["ca", "import", "--state-dir", str(state), *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_bring_your_own_intermediate_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = make_ca("Example Root CA", root_key)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca("Example fleet intermediate", inter_key, (root, root_key))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    not_a_ca = make_ca("some server", leaf_key, (inter, inter_key), ca=False)
    files = {"root.pem": pem(root), "root.key": pem(root_key), "inter.pem": pem(inter), "inter.key": pem(inter_key),
             "leaf.pem": pem(not_a_ca), "leaf.key": pem(leaf_key), "garbage.pem": b"not pem\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    f = {name: str(tmp_path / name) for name in files}

    state = tmp_path / "state"
    CertAuthority(state / "ca")  # the controller's own CA, made at its first start
    before = tree_digest(state)
    refusals = [
        (["--cert", f["inter.pem"], "--key", f["root.key"], "--chain", f["root.pem"]], "is not the private key"),
        (["--cert", f["inter.pem"], "--key", f["inter.key"]], "not a self-signed root"),
        (["--cert", f["leaf.pem"], "--key", f["leaf.key"], "--chain", f["inter.pem"]], "is not a CA certificate"),
        (["--cert", f["garbage.pem"], "--key", f["inter.key"]], "is not a PEM certificate"),
        (["--cert", f["inter.pem"], "--key", f["garbage.pem"], "--chain", f["root.pem"]], "not a PEM private key"),
        (["--cert", f["inter.pem"], "--key", f["inter.key"], "--chain", f["inter.pem"]], "did not issue it"),
    ]
    for argv, message in refusals:
        code, _, err = await ca_import(capsys, state, *argv)
        assert code == 3 and message in err and "nothing was changed" in err, (argv, err)
        assert tree_digest(state) == before, argv  # nothing changed

    code, out, _ = await ca_import(capsys, state, "--cert", f["inter.pem"], "--key", f["inter.key"],
                                   "--chain", f["root.pem"])
    assert code == 0 and "imported intermediate CA" in out, out
    assert list(state.glob("ca/previous-*/ca.key"))  # the replaced CA is kept

    rc = await start_controller(controller_settings(state))
    agent = agent_for(rc, tmp_path / "agent", "node-byo", ca_file=tmp_path / "root.pem")  # trusts the root alone
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: rc.ctx.registry.status_of("node-byo") == "online" and agent.heartbeats > 0, 20)
        creds = Credentials.load(tmp_path / "agent")
        assert creds is not None
        chain = x509.load_pem_x509_certificates(creds.cert_pem)  # the client certificate, then the intermediate
        assert [c.subject for c in chain] == [chain[0].subject, inter.subject]
        assert chain[0].issuer == inter.subject
        served = x509.load_pem_x509_certificates((state / "ca" / "server.pem").read_bytes())
        assert [c.subject for c in served][1:] == [inter.subject]  # the served chain includes the intermediate
        assert x509.load_pem_x509_certificates(creds.ca_pem)[-1].subject == root.subject
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await rc.stop(grace=0.2)
