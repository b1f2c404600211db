"""Enrollment and identity over real gRPC + TLS: the happy path and every refusal."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import grpc.aio
import pytest
from sqlalchemy import select, update

from fleetctl.agent.client import Credentials, channel_options
from fleetctl.controller.app import RunningController
from fleetctl.controller.ca import CertAuthority, cert_identity, key_pem, make_csr, new_key
from fleetctl.controller.store.models import AuditLog, EnrollmentToken, Identity
from fleetctl.fleet.errors import AuthError, ConflictError, InputError
from fleetctl.fleet.v1 import fleet_pb2 as pb
from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc
from tests.integration.fleet_support import enroll_creds, mtls_stub, new_token, profile_facts

pytestmark = pytest.mark.timeout(60)


def refusals(rc: RunningController) -> list[str]:
    with rc.ctx.store.session() as s:
        rows = s.scalars(select(AuditLog).where(AuditLog.action == "enroll.refused").order_by(AuditLog.id))
        return [str(r.detail.get("reason")) for r in rows]


async def raw_enroll(rc: RunningController, token: str, hostname: str = "node-x") -> pb.EnrollResponse:
    assert rc.ctx.enroll_address
    creds = grpc.ssl_channel_credentials(root_certificates=rc.ctx.ca.ca_pem)
    async with grpc.aio.secure_channel(rc.ctx.enroll_address, creds, options=channel_options()) as ch:
        stub = pb_grpc.AgentServiceStub(ch)
        return await stub.Enroll(pb.EnrollRequest(token=token, hostname=hostname,
                                                  csr_pem=make_csr(new_key(), hostname)), timeout=5)


async def test_enroll_issues_client_certificate_bound_to_hostname(controller: RunningController,
                                                                  db_url: str) -> None:
    creds = await enroll_creds(controller, "node-1")
    cn, serial, _ = cert_identity(creds.cert_pem)
    assert cn == creds.agent_id and creds.hostname == "node-1"
    with controller.ctx.store.session() as s:
        ident = s.get(Identity, creds.agent_id)
        assert ident is not None and ident.hostname == "node-1" and ident.cert_serial == serial
        token = s.scalar(select(EnrollmentToken))
        assert token is not None and token.used_by == creds.agent_id
        assert len(token.token_hash) == 64  # only the hash is stored
        actions = [a.action for a in s.scalars(select(AuditLog))]
    assert "enroll" in actions and "token.create" in actions
    # the certificate works for mTLS calls
    async with mtls_stub(controller, creds) as stub:
        facts = profile_facts("a100", "node-1")
        from fleetctl.agent.wire import facts_to_proto

        resp = await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(facts)), timeout=5)
        assert list(resp.changed) == ["*"]


@pytest.mark.parametrize("case", ["no token", "wrong token", "expired", "revoked", "replayed", "other host"])
async def test_enrollment_refusals_are_refused_and_logged(controller: RunningController, case: str) -> None:
    token = new_token(controller, hostname="node-a" if case == "other host" else None)
    if case == "no token":
        token = ""
    elif case == "wrong token":
        token = "fleet_" + "x" * 43
    elif case == "expired":
        with controller.ctx.store.session() as s:
            s.execute(update(EnrollmentToken).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    elif case == "revoked":
        controller.ctx.enrollment.revoke_token(token[:12])
    elif case == "replayed":
        await raw_enroll(controller, token, "node-first")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_enroll(controller, token, "node-b")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    expected = {"no token": "no enrollment token", "wrong token": "wrong token", "expired": "token expired",
                "revoked": "token revoked", "replayed": "already used", "other host": "token is for host node-a"}[case]
    assert expected in (err.value.details() or "")
    assert any(expected in r for r in refusals(controller))
    with controller.ctx.store.session() as s:  # nothing was enrolled as node-b
        assert s.scalar(select(Identity).where(Identity.hostname == "node-b")) is None


async def test_duplicate_hostname_enrollment_refused_until_revoked(controller: RunningController) -> None:
    first = await enroll_creds(controller, "node-1")
    with pytest.raises(ConflictError, match="already enrolled"):
        await enroll_creds(controller, "node-1")
    assert any("hostname held" in r for r in refusals(controller))
    controller.ctx.revoke_agent("node-1")
    second = await enroll_creds(controller, "node-1")
    assert second.agent_id != first.agent_id


async def test_bad_hostname_and_bad_csr_refused(controller: RunningController) -> None:
    with pytest.raises(InputError):
        await enroll_creds(controller, "bad host!")
    assert controller.ctx.enroll_address
    creds = grpc.ssl_channel_credentials(root_certificates=controller.ctx.ca.ca_pem)
    async with grpc.aio.secure_channel(controller.ctx.enroll_address, creds) as ch:
        stub = pb_grpc.AgentServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enroll(pb.EnrollRequest(token=new_token(controller), hostname="n1", csr_pem=b"junk"),
                              timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_identity_refused(controller: RunningController) -> None:
    # a certificate really signed by the controller's CA, for an identity the store does not know
    key = new_key()
    issued = controller.ctx.ca.sign_csr(make_csr(key, "ghost"), "ghost-agent-id")
    creds = Credentials("ghost-agent-id", "ghost", key_pem(key), issued.pem, controller.ctx.ca.ca_pem)
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sequence=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown agent identity" in (err.value.details() or "")


async def test_certificate_with_the_identitys_cn_but_another_serial_refused(controller: RunningController) -> None:
    # a second certificate really signed by the controller's CA with the enrolled agent's CN (a replaced or
    # mis-issued one): TLS accepts it, the identity check must not, and the current certificate still works
    creds = await enroll_creds(controller, "node-1")
    key = new_key()
    other = controller.ctx.ca.sign_csr(make_csr(key, "node-1"), creds.agent_id)
    assert cert_identity(other.pem)[0] == creds.agent_id and other.serial != cert_identity(creds.cert_pem)[1]
    stale = Credentials(creds.agent_id, "node-1", key_pem(key), other.pem, controller.ctx.ca.ca_pem)
    async with mtls_stub(controller, stale) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sequence=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"certificate serial {other.serial} is not the one issued" in (err.value.details() or "")
    from fleetctl.agent.wire import facts_to_proto

    async with mtls_stub(controller, creds) as stub:
        await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("a100", "node-1"))),
                               timeout=5)


async def test_revoked_identity_refused_on_next_call(controller: RunningController) -> None:
    creds = await enroll_creds(controller, "node-1")
    from fleetctl.agent.wire import facts_to_proto

    async with mtls_stub(controller, creds) as stub:
        await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("a100", "node-1"))),
                               timeout=5)
        await stub.Heartbeat(pb.HeartbeatRequest(sequence=1), timeout=5)
        controller.ctx.revoke_agent("node-1")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sequence=2), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.value.details() or "")
    assert controller.ctx.registry.status_of("node-1") == "offline"


async def test_agent_port_requires_a_client_certificate_from_our_ca(controller: RunningController,
                                                                    tmp_path: Path) -> None:
    assert controller.ctx.grpc_address
    # no client certificate: the TLS handshake fails
    plain = grpc.ssl_channel_credentials(root_certificates=controller.ctx.ca.ca_pem)
    async with grpc.aio.secure_channel(controller.ctx.grpc_address, plain) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.AgentServiceStub(ch).Heartbeat(pb.HeartbeatRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA: refused too
    other = CertAuthority(tmp_path / "other-ca")
    key = new_key()
    issued = other.sign_csr(make_csr(key, "x"), "x")
    creds = Credentials("x", "x", key_pem(key), issued.pem, controller.ctx.ca.ca_pem)
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_enrollment_port_serves_nothing_but_enroll(controller: RunningController) -> None:
    creds = await enroll_creds(controller, "node-1")
    async with mtls_stub(controller, creds, address=controller.ctx.enroll_address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in (err.value.details() or "")


async def test_agent_without_token_or_ca_fails_clearly(controller: RunningController, tmp_path: Path) -> None:
    from fleetctl.agent.client import Agent, AgentConfig

    assert controller.ctx.grpc_address
    agent = Agent(AgentConfig(controller=controller.ctx.grpc_address, state_dir=tmp_path / "a",
                              facts=lambda: profile_facts("a100", "n1"), ca_file=controller.ctx.ca.ca_path))
    with pytest.raises(AuthError, match="no token"):
        await agent.ensure_enrolled()
