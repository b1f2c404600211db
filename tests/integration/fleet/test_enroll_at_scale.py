"""Enrollment at scale over real gRPC + TLS: reusable tokens (uses counted atomically on SQLite and PostgreSQL,
hostname globs, source networks, clear refusals) and the approval queue driven through `fleetctl`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.agent.client import Agent, AgentConfig
from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.enrollment import IdentityState, TokenLimits
from fleetctl.controller.store.models import AuditLog, EnrollmentToken, Identity
from fleetctl.fleet.errors import AuthError, FleetError, InputError
from tests.integration.fleet_support import db_url, enroll_creds, profile_facts, wait_for

__all__ = ["db_url"]

pytestmark = pytest.mark.timeout(120)


def token_with(rc: RunningController, ttl: float = 300, **limits: Any) -> str:
    token, _ = rc.ctx.enrollment.create_token(dt.timedelta(seconds=ttl), limits=TokenLimits(**limits))
    return token


def token_row(rc: RunningController) -> EnrollmentToken:
    with rc.ctx.store.session() as s:
        row = s.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id.desc())).first()
        assert row is not None
        s.expunge(row)
        return row


async def cli(capsys: pytest.CaptureFixture[str], rc: RunningController, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(fleetctl, [*argv, "--state-dir", str(rc.ctx.settings.state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


async def test_reusable_token_enrolls_n_agents_then_says_used_up(controller: RunningController) -> None:
    token = token_with(controller, uses=3)
    for i in range(3):
        await enroll_creds(controller, f"gpu-{i}", token)
    with pytest.raises(AuthError) as err:
        await enroll_creds(controller, "gpu-3", token)
    assert "used up (all 3 uses spent)" in err.value.message
    assert "--uses" in (err.value.hint or "")  # the controller's hint, from the status details
    row = token_row(controller)
    assert (row.uses, row.max_uses) == (3, 3)


async def test_two_agents_racing_for_the_last_use_one_wins(db_url: str, tmp_path: Path) -> None:
    from fleetctl.controller.app import start_controller
    from tests.integration.fleet_support import controller_settings

    rc = await start_controller(controller_settings(tmp_path / "c", db_url))
    try:
        for round_ in range(3):  # a race may go either way each time; exactly one winner every time
            token = token_with(rc, uses=2)
            await enroll_creds(rc, f"first-{round_}", token)
            results = await asyncio.gather(enroll_creds(rc, f"racer-a-{round_}", token),
                                           enroll_creds(rc, f"racer-b-{round_}", token), return_exceptions=True)
            winners = [r for r in results if not isinstance(r, BaseException)]
            losers = [r for r in results if isinstance(r, BaseException)]
            assert len(winners) == 1, results
            assert isinstance(losers[0], AuthError) and "used up" in losers[0].message
            row = token_row(rc)
            assert row.uses == 2
            with rc.ctx.store.session() as s:  # the loser left no identity behind
                hosts = set(s.scalars(select(Identity.hostname).where(Identity.token_id == row.id)))
            assert hosts == {f"first-{round_}", winners[0].hostname}
    finally:
        await rc.stop(grace=0.2)


@pytest.mark.parametrize("case", ["pattern", "network", "expired"])
async def test_token_limits_refuse_with_a_hint_and_spend_nothing(controller: RunningController, case: str) -> None:
    cases: dict[str, dict[str, Any]] = {"pattern": {"hostname_pattern": "gpu-*", "uses": 5},
                                        "network": {"source_network": "10.0.0.0/8", "uses": 5},
                                        "expired": {"uses": 5}}
    limits = cases[case]
    token = token_with(controller, ttl=1 if case == "expired" else 300, **limits)
    if case == "expired":
        await asyncio.sleep(1.1)
    with pytest.raises(AuthError) as err:
        await enroll_creds(controller, "cpu-1", token)
    expected = {"pattern": ("hostnames matching 'gpu-*', not cpu-1", "--hostname-pattern"),
                "network": ("agents in 10.0.0.0/8, and this one connects from 127.0.0.1", "--source-network"),
                "expired": ("token expired at", "tokens create --ttl")}[case]
    assert expected[0] in err.value.message and expected[1] in (err.value.hint or ""), err.value
    assert token_row(controller).uses == 0
    if case == "pattern":
        assert (await enroll_creds(controller, "gpu-7", token)).hostname == "gpu-7"
    with controller.ctx.store.session() as s:
        refused = s.scalars(select(AuditLog).where(AuditLog.action == "enroll.refused")).all()
    assert refused and expected[0].split(",")[0] in json.dumps([r.detail for r in refused])


async def test_source_network_admits_its_own_addresses(controller: RunningController) -> None:
    token = token_with(controller, source_network="127.0.0.0/8", uses=2)
    assert (await enroll_creds(controller, "lo-1", token)).hostname == "lo-1"


@pytest.mark.parametrize("limits, message", [
    ({"uses": 0}, "token uses 0 out of range"),
    ({"source_network": "10.0.0/33"}, "--source-network"),
    ({"hostname_pattern": "gpu-*;rm"}, "is not a hostname pattern"),
])
async def test_bad_token_limits_create_nothing(controller: RunningController, limits: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(InputError) as err:
        token_with(controller, **limits)
    assert message in err.value.message
    assert controller.ctx.enrollment.list_tokens() == []


async def test_tokens_cli_creates_and_lists_reusable_tokens(controller: RunningController,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli(capsys, controller, "tokens", "create", "--uses", "3", "--ttl", "24h",
                             "--hostname-pattern", "gpu-*", "--source-network", "127.0.0.0/8", "--json")
    assert code == 0
    created = json.loads(out)
    assert (created["max_uses"], created["hostname_pattern"], created["source_network"]) == (3, "gpu-*",
                                                                                            "127.0.0.0/8")
    await enroll_creds(controller, "gpu-1", created["token"])
    code, out, _ = await cli(capsys, controller, "tokens", "list")
    assert code == 0 and "1/3" in out and "gpu-* from 127.0.0.0/8" in out
    code, _, err = await cli(capsys, controller, "tokens", "create", "--uses", "0")
    assert code == 3 and "out of range" in err


def approval_agent(rc: RunningController, state: Path, hostname: str, token: str | None,
                   approval_timeout: float = 60) -> Agent:
    assert rc.ctx.grpc_address and rc.ctx.enroll_address
    facts = profile_facts("a100", hostname)
    return Agent(AgentConfig(controller=rc.ctx.grpc_address, enroll_address=rc.ctx.enroll_address, state_dir=state,
                             facts=lambda: facts, ca_file=rc.ctx.ca.ca_path, token=token, backoff_initial=0.1,
                             backoff_max=0.5, approval_poll=0.2, approval_timeout=approval_timeout))


async def test_approval_queue_pending_approve_and_deny(controller: RunningController, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    token = token_with(controller, uses=2, approval=True)
    ok, no = (approval_agent(controller, tmp_path / h, h, token) for h in ("gpu-ok", "gpu-no"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in (ok, no)]
    try:
        await wait_for(lambda: len(controller.ctx.enrollment.pending()) == 2)
        assert (tmp_path / "gpu-ok" / "pending.json").exists()
        assert controller.ctx.registry.status_of("gpu-ok") is None  # nothing signed, nothing registered
        code, out, _ = await cli(capsys, controller, "agents", "pending")
        assert code == 0 and "gpu-ok" in out and "gpu-no" in out and "127.0.0.1" in out
        code, out, _ = await cli(capsys, controller, "agents", "approve", "gpu-ok")
        assert code == 0 and "approved" in out
        await wait_for(lambda: controller.ctx.registry.status_of("gpu-ok") == "online" and ok.heartbeats > 0,
                       timeout=20)
        assert not (tmp_path / "gpu-ok" / "pending.json").exists()
        code, _, _ = await cli(capsys, controller, "agents", "deny", "gpu-no")
        assert code == 0
        with pytest.raises(AuthError) as err:
            await asyncio.wait_for(tasks[1], 20)
        assert "denied by an operator" in err.value.message
        assert not (tmp_path / "gpu-no" / "pending.json").exists()  # a new token enrolls afresh
        code, _, err_text = await cli(capsys, controller, "agents", "approve", "gpu-no")  # nothing pending now
        assert code == 4 and "no enrollment of 'gpu-no' is waiting" in err_text
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    with controller.ctx.store.session() as s:
        actions = {(r.action, r.target, r.actor) for r in s.scalars(select(AuditLog))}
        states = dict(s.execute(select(Identity.hostname, Identity.state)).all())
    assert {("agent.approve", "gpu-ok", "admin"), ("agent.deny", "gpu-no", "admin")} <= actions
    assert ("enroll.pending", "gpu-ok") in {(a, t) for a, t, _ in actions}
    assert states == {"gpu-ok": IdentityState.ACTIVE, "gpu-no": IdentityState.DENIED}


async def test_waiting_for_approval_is_bounded_and_resumes_after_a_restart(controller: RunningController,
                                                                          tmp_path: Path) -> None:
    token = token_with(controller, approval=True)
    agent = approval_agent(controller, tmp_path / "a", "gpu-wait", token, approval_timeout=1.0)
    with pytest.raises(AuthError) as err:
        await asyncio.wait_for(agent.run(), 20)
    assert "not approved within 1s" in err.value.message and "agents approve gpu-wait" in (err.value.hint or "")
    first = controller.ctx.enrollment.pending()
    assert [p["hostname"] for p in first] == ["gpu-wait"]
    controller.ctx.enrollment.approve("gpu-wait")
    again = approval_agent(controller, tmp_path / "a", "gpu-wait", None)  # the same request, no token needed
    creds = await asyncio.wait_for(again.ensure_enrolled(), 20)
    assert creds is not None and creds.agent_id == first[0]["agent_id"]


async def test_controller_wide_approval_setting(tmp_path: Path) -> None:
    from fleetctl.controller.app import start_controller
    from tests.integration.fleet_support import controller_settings

    rc = await start_controller(controller_settings(tmp_path / "c", enroll_approval=True))
    try:
        token = token_with(rc)  # a plain token
        with pytest.raises(FleetError) as err:  # enroll() is for tokens without approval: it says so
            await enroll_creds(rc, "gpu-1", token)
        assert "waits for approval" in err.value.message
        assert [p["hostname"] for p in rc.ctx.enrollment.pending()] == ["gpu-1"]
    finally:
        await rc.stop(grace=0.2)


async def test_nodes_flag_agents_outside_the_supported_versions(controller: RunningController,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fleetctl.agent import wire as agent_wire
    from tests.integration.fleet_support import mtls_stub

    for host, version in (("old-1", "0.0.1"), ("cur-1", None)):
        creds = await enroll_creds(controller, host)
        request = agent_wire.report_facts_request(profile_facts("a100", host))
        if version:
            request.agent_version = version
        async with mtls_stub(controller, creds) as stub:
            await stub.ReportFacts(request, timeout=10)
    code, out, _ = await cli(capsys, controller, "nodes")
    assert code == 0 and "1 agent(s) outside the versions this controller supports (>=0.1.0" in out
    assert "old-1 0.0.1 (too-old)" in out and "cur-1" not in out.split("outside")[1]
    code, out, _ = await cli(capsys, controller, "nodes", "-o", "wide")
    assert "cert expires (utc)" in out.lower() and "0.0.1 (too-old)" in out
    expiry = (dt.datetime.now(dt.UTC) + dt.timedelta(days=365)).strftime("%Y-%m-%d")
    assert expiry in out  # a year from enrollment, the default lifetime
    code, out, _ = await cli(capsys, controller, "node", "old-1")
    assert code == 0 and "0.0.1 (too-old: outside the versions" in out and f"certificate expires {expiry}" in out
    code, out, _ = await cli(capsys, controller, "nodes", "-o", "json")
    rows = {n["hostname"]: n for n in json.loads(out)["nodes"]}
    assert rows["old-1"]["agent_support"] == "too-old" and rows["cur-1"]["agent_support"] in ("supported", "unknown")
