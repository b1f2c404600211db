"""Facts, heartbeats, liveness and bad input over real gRPC + mTLS, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json

import grpc
import grpc.aio
import pytest
from sqlalchemy import func, select

from fleetctl.agent.client import Credentials
from fleetctl.agent.wire import facts_to_proto
from fleetctl.controller.app import RunningController
from fleetctl.controller.store import utcnow
from fleetctl.controller.store.models import FactsHistory, Identity, Node, NodeEvent
from fleetctl.fleet.facts import DriverFacts
from fleetctl.fleet.v1 import fleet_pb2 as pb
from tests.integration.fleet_support import SimAgents, enroll_creds, mtls_stub, profile_facts, wait_for

pytestmark = pytest.mark.timeout(60)


def snapshot(rc: RunningController) -> tuple[int, int, list[tuple[str, str]]]:
    with rc.ctx.store.session() as s:
        nodes = s.scalar(select(func.count()).select_from(Node)) or 0
        hist = s.scalar(select(func.count()).select_from(FactsHistory)) or 0
        rows = [(n.hostname, json.dumps(n.facts, sort_keys=True)) for n in s.scalars(select(Node))]
    return nodes, hist, rows


async def registered(rc: RunningController, hostname: str = "node-1") -> Credentials:
    creds = await enroll_creds(rc, hostname)
    async with mtls_stub(rc, creds) as stub:
        await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("a100", hostname))),
                               timeout=5)
    return creds


async def test_facts_changes_are_kept_as_history(controller: RunningController, db_url: str) -> None:
    creds = await registered(controller)
    base = profile_facts("a100", "node-1")
    assert base.driver is not None
    changed = dataclasses.replace(base, driver=DriverFacts("560.35.03", "12.6"))
    async with mtls_stub(controller, creds) as stub:
        same = await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(base)), timeout=5)
        assert list(same.changed) == []
        resp = await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(changed)), timeout=5)
    assert sorted(resp.changed) == ["driver.cuda_max", "driver.version"]
    node = controller.ctx.registry.record("node-1")
    assert node.facts is not None and node.facts.driver == DriverFacts("560.35.03", "12.6")
    assert node.simulated is True
    history = controller.ctx.registry.history("node-1")["history"]
    latest = history[0]
    assert latest["changed"] == ["driver.cuda_max", "driver.version"]
    assert latest["old"]["driver.version"] == base.driver.version and latest["new"]["driver.version"] == "560.35.03"
    assert history[1]["changed"] == ["*"]
    assert len(history) == 2  # the identical report added nothing


async def test_offline_and_back_online(controller: RunningController, fleet: SimAgents, db_url: str) -> None:
    sim = await fleet.start("node-1", "h100")
    assert controller.ctx.registry.status_of("node-1") == "online"
    await sim.stop()
    # interval 1 s, 2 missed → offline within ~2-3 s
    await wait_for(lambda: controller.ctx.registry.status_of("node-1") == "offline", timeout=8)
    await fleet.start("node-1", "h100")  # same state dir: no re-enrollment
    assert controller.ctx.registry.status_of("node-1") == "online"
    history = controller.ctx.registry.history("node-1")
    transitions = [(e["old"], e["new"]) for e in reversed(history["status_history"])]
    assert transitions[:3] == [(None, "online"), ("online", "offline"), ("offline", "online")]
    with controller.ctx.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Identity)) == 1
        assert (s.scalar(select(func.count()).select_from(NodeEvent)) or 0) >= 3


async def test_heartbeats_are_batched_to_the_database(controller: RunningController, fleet: SimAgents) -> None:
    await fleet.start("node-1", "l4")
    before = controller.ctx.registry.db_writes
    await wait_for(lambda: controller.ctx.registry.heartbeats >= 3, timeout=8)
    await wait_for(lambda: controller.ctx.registry.db_writes > before, timeout=5)
    with controller.ctx.store.session() as s:
        node = s.scalar(select(Node).where(Node.hostname == "node-1"))
        assert node is not None and node.last_seen is not None
        assert (utcnow() - node.last_seen).total_seconds() < 5


async def test_hostname_in_facts_never_overrides_the_enrolled_one(controller: RunningController) -> None:
    creds = await registered(controller)
    before = snapshot(controller)
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("h100", "node-2"))),
                                   timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "enrolled as 'node-1'" in (err.value.details() or "")
    assert snapshot(controller) == before


def _bad(kind: str) -> pb.NodeFacts:
    msg = facts_to_proto(profile_facts("a100", "node-1"))
    if kind == "malformed extra_json":
        msg.extra_json = "{not json"
    elif kind == "extra_json not an object":
        msg.extra_json = "[1, 2]"
    elif kind == "bad compute capability":
        msg.gpus[0].compute_capability = "eight"
    elif kind == "bad arch":
        msg.os.arch = "sparc64"
    elif kind == "missing os":
        msg.ClearField("os")
    elif kind == "missing resources":
        msg.ClearField("resources")
    elif kind == "zero cpu cores":
        msg.resources.cpu_cores = 0
    elif kind == "bad torch version":
        msg.torch.version = "latest!"
    elif kind == "bad arch_list entry":
        msg.torch.arch_list.append("sm_9x!")  # neither sm_NN/compute_NN nor a gfx target
    elif kind == "oversized":
        msg.apt.errors.extend(["E: " + "x" * 1000] * 200)
        msg.extra_json = json.dumps({"blob": "y" * 100_000})
    elif kind == "no facts":
        return pb.NodeFacts()
    return msg


BAD = ["malformed extra_json", "extra_json not an object", "bad compute capability", "bad arch", "missing os",
       "missing resources", "zero cpu cores", "bad torch version", "bad arch_list entry", "oversized", "no facts"]


@pytest.mark.parametrize("kind", BAD)
async def test_bad_facts_refused_and_registry_unchanged(controller: RunningController, kind: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    creds = await registered(controller)
    before = snapshot(controller)
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportFacts(pb.ReportFactsRequest(facts=_bad(kind)), timeout=5)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    assert err.value.details()
    assert snapshot(controller) == before
    assert any("ReportFacts refused" in r.getMessage() for r in caplog.records)


async def test_message_beyond_grpc_limit_is_cut_off(controller: RunningController) -> None:
    creds = await registered(controller)
    before = snapshot(controller)
    msg = facts_to_proto(profile_facts("a100", "node-1"))
    msg.extra_json = json.dumps({"blob": "z" * 1_000_000})
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportFacts(pb.ReportFactsRequest(facts=msg), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert snapshot(controller) == before


async def test_unknown_fields_are_ignored(controller: RunningController) -> None:
    creds = await registered(controller)
    msg = facts_to_proto(profile_facts("a100", "node-1"))
    msg.extra_json = json.dumps({"future_field": {"x": 1}, "probe_errors": []})
    # an unknown protobuf field (number 99, varint 7) appended to the wire bytes
    facts_bytes = msg.SerializeToString() + _varint(99 << 3 | 0) + _varint(7)
    raw = bytes([1 << 3 | 2]) + _varint(len(facts_bytes)) + facts_bytes
    request = pb.ReportFactsRequest.FromString(raw)
    async with mtls_stub(controller, creds) as stub:
        resp = await stub.ReportFacts(request, timeout=5)
    assert list(resp.changed) == []  # the contract's fields did not change
    node = controller.ctx.registry.record("node-1")
    assert node.extra["future_field"] == {"x": 1}
    assert "future_field" not in node.facts_json


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_duplicate_hostname_from_another_identity_refused(controller: RunningController) -> None:
    await registered(controller)
    # a second live identity for the same hostname (e.g. a race between two controllers sharing a database)
    creds = await enroll_creds(controller, "node-1b")
    with controller.ctx.store.session() as s:
        ident = s.get(Identity, creds.agent_id)
        assert ident is not None
        ident.hostname = "node-1"
    controller.ctx.enrollment.identities._by_id.clear()
    before = snapshot(controller)
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("h100", "node-1"))),
                                   timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snapshot(controller) == before


async def test_heartbeat_before_facts_and_from_unknown_identity(controller: RunningController) -> None:
    creds = await enroll_creds(controller, "node-1")
    async with mtls_stub(controller, creds) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(pb.HeartbeatRequest(sequence=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "report its facts" in (err.value.details() or "")
    assert controller.ctx.registry.heartbeats == 0
