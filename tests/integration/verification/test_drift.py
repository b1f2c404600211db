"""Drift end to end: a real controller, a simulated H100 node (real agent over gRPC/mTLS, simulated
executor: its verify jobs come from the GPU model, agent/verify/simulated.py). A torch upgrade that breaks
flash-attn's ABI (fault knob ``verify_faults.import_error``) triggers a re-verification; the failure marks
the node degraded with the diagnosis and the re-plan; reinstalling makes the next verification pass and
clears it. Also ``fleetctl verify`` and ``fleetctl node`` against that controller."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.store.models import Job
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.verify_store.service import VerificationService
from fleetctl.fleet.facts import FlashAttnFacts
from tests.integration.fleet_support import SimAgents, profile_facts, wait_for

pytestmark = pytest.mark.timeout(120)
HOST = "h100-drift"


def _service(rc: RunningController) -> VerificationService:
    return rc.ctx.verification


def _verify_jobs(rc: RunningController) -> list[tuple[str, dict[str, Any], str]]:
    with rc.ctx.store.session() as s:
        rows = s.scalars(select(Job).where(Job.kind == "verify", Job.node == HOST).order_by(Job.created_at))
        return [(j.id, dict(j.vars), j.status) for j in rows]


def _health(rc: RunningController) -> dict[str, Any]:
    with rc.ctx.store.session() as s:
        return vs.health_json(s, HOST)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = fleetctl(args)
    return rc, capsys.readouterr().out


async def test_drift_degrades_then_clears(controller: RunningController, fleet: SimAgents, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    svc = _service(controller)
    svc.drift_delay = 0.3
    base = profile_facts("h100", HOST)
    facts = replace(base, flash_attn=FlashAttnFacts("2.8.3", "fa2"))
    runner = SimulatedJobRunner(lambda: facts, tmp_path / "jobs")
    runner.seconds = {"*": 0.05}
    await fleet.start(HOST, "h100", runner=runner, facts=runner.current_facts)
    state = ["--state-dir", str(controller.ctx.settings.state_dir)]

    # 1. fleetctl verify: one quick verification, stored, passing
    code, out = await asyncio.to_thread(_run_cli, ["verify", HOST, "--quick", "--json", *state], capsys)
    assert code == 0, out
    (v,) = json.loads(out)["verifications"]
    assert v["status"] == "pass" and v["simulated"] and v["trigger"] == "manual" and v["mode"] == "quick"
    assert v["flash_attn"]["version"] == "2.8.3"
    assert controller.ctx.registry.status_of(HOST) == "online"

    # 2. drift: torch upgraded under flash-attn (its extension now fails with an undefined symbol)
    assert runner.facts.torch is not None
    runner.facts = replace(runner.facts, torch=replace(runner.facts.torch, version="2.8.0+cu128"),
                           extra={**runner.facts.extra, "verify_faults": {"import_error": True}})
    controller.ctx.registry.request_facts(HOST)
    await wait_for(lambda: controller.ctx.registry.status_of(HOST) == "degraded", timeout=30)
    jobs = _verify_jobs(controller)
    assert [j[1]["trigger"] for j in jobs] == ["manual", "drift"]
    health = _health(controller)
    assert health["degraded"] and "undefined symbol" in json.dumps(health["diagnosis"])
    assert health["replan"]["variant"].startswith("fa2") and "torch2.8" in json.dumps(health["replan"])
    assert health["latest"][0]["status"] == "fail" and health["latest"][0]["trigger"] == "drift"

    code, out = await asyncio.to_thread(_run_cli, ["node", HOST, *state], capsys)
    assert code == 0 and "DEGRADED" in out and "re-plan" in out and "diagnosis" in out, out

    # 3. debounced: a burst of changes gives one job, none while one is running or after it covered them
    before = len(svc.drift_submitted)
    for _ in range(3):
        svc.facts_changed(HOST, ["driver.version"])
    await asyncio.sleep(svc.drift_delay + 0.5)
    await wait_for(lambda: all(j[2] in ("successful", "failed") for j in _verify_jobs(controller)), timeout=20)
    assert len(svc.drift_submitted) == before + 1
    svc.facts_changed(HOST, ["gpus[0].uuid"])  # not a change that matters
    svc.facts_changed(HOST, ["*"])
    await asyncio.sleep(svc.drift_delay + 0.3)
    assert len(svc.drift_submitted) == before + 1

    # 4. the fix (flash-attn rebuilt for the new torch): the drift re-verification passes, degraded clears
    runner.facts = replace(runner.facts, flash_attn=FlashAttnFacts("2.8.3.post1", "fa2"),
                           extra={k: v for k, v in runner.facts.extra.items() if k != "verify_faults"})
    controller.ctx.registry.request_facts(HOST)
    await wait_for(lambda: controller.ctx.registry.status_of(HOST) == "online" and not _health(controller)["degraded"],
                   timeout=30)
    await svc.idle()
    latest = _health(controller)["latest"][0]
    assert latest["status"] == "pass" and latest["flash_attn"]["version"] == "2.8.3.post1"
    assert latest["trigger"] == "drift"

    code, out = await asyncio.to_thread(_run_cli, ["verifications", "--node", HOST, "--json", *state], capsys)
    assert code == 0 and len(json.loads(out)["verifications"]) == len(_verify_jobs(controller))


async def test_schedule_cli_round_trip(controller: RunningController, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(controller.ctx.settings.state_dir)]
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "add", "0 3 * * *", "--nodes", "gpu=H100", "--quick",
                                                   "--json", *state], capsys)
    assert code == 0, out
    made = json.loads(out)
    assert made["cron"] == "0 3 * * *" and made["mode"] == "quick" and made["next_run_at"].endswith("03:00:00+00:00")
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "list", *state], capsys)
    assert code == 0 and "gpu=H100" in out and "0 3 * * *" in out
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "add", "0 3 * * 9", *state], capsys)
    assert code == 2
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "remove", str(made["id"]), *state], capsys)
    assert code == 0 and "removed schedule" in out
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "list", "--json", *state], capsys)
    assert json.loads(out) == {"schedules": []}
    code, out = await asyncio.to_thread(_run_cli, ["schedule", "remove", "999", *state], capsys)
    assert code == 4




async def test_each_verification_expects_what_the_node_has_or_would_get(
        controller: RunningController, fleet: SimAgents, tmp_path: Path) -> None:
    """``expect``: flash_attn where installed or where a rollout would install it, sdpa where it never would."""
    nodes = {"h100-fa": ("h100", FlashAttnFacts("2.8.3", "fa2")), "h100-bare": ("h100", None),
             "v100-bare": ("v100", None)}
    for host, (profile, fa) in nodes.items():
        facts = replace(profile_facts(profile, host), flash_attn=fa)
        runner = SimulatedJobRunner(lambda: facts, tmp_path / host)  # noqa: B023 (called once, at init)
        runner.seconds = {"*": 0.05}
        await fleet.start(host, profile, runner=runner, facts=runner.current_facts)
    jobs = (await _service(controller).submit(list(nodes), mode="quick")).jobs
    with controller.ctx.store.session() as s:
        expected = {host: s.get_one(Job, job_id).vars["expect"] for host, job_id in jobs.items()}
    assert expected == {"h100-fa": "flash_attn", "h100-bare": "flash_attn", "v100-bare": "sdpa"}


async def test_a_clean_rollback_to_no_flash_attn_is_not_degraded(
        controller: RunningController, fleet: SimAgents, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rollout installs flash-attn on a node that had none; rolling it back removes it. A verification after
    that (``fleetctl verify``, a schedule, drift) expects what the rollback recorded — no flash-attn: ``sdpa`` —
    so the node passes and stays online instead of turning degraded for lacking flash-attn."""
    host = "h100-rb"
    facts = profile_facts("h100", host)
    assert facts.flash_attn is None
    runner = SimulatedJobRunner(lambda: facts, tmp_path / "jobs")
    runner.seconds = {"*": 0.05}
    await fleet.start(host, "h100", runner=runner, facts=runner.current_facts)
    state = ["--state-dir", str(controller.ctx.settings.state_dir)]

    code, out = await asyncio.to_thread(_run_cli, ["rollout", "flash-attn", "--nodes", host, "--canary", "0",
                                                   "--batch", "100%", *state], capsys)
    assert code == 0, out
    rid = out.split()[1]
    assert runner.facts.flash_attn is not None
    code, out = await asyncio.to_thread(_run_cli, ["rollout", "rollback", rid, *state], capsys)
    assert code == 0, out
    assert runner.facts.flash_attn is None
    controller.ctx.registry.request_facts(host)

    def flash_attn_gone() -> bool:
        facts = controller.ctx.registry.record(host).facts
        return facts is not None and facts.flash_attn is None

    await wait_for(flash_attn_gone, 10)

    code, out = await asyncio.to_thread(_run_cli, ["verify", host, "--quick", "--json", *state], capsys)
    assert code == 0, out
    (v,) = json.loads(out)["verifications"]
    assert v["status"] == "pass", v
    with controller.ctx.store.session() as s:
        job = s.scalars(select(Job).where(Job.kind == "verify", Job.node == host).order_by(Job.created_at.desc())
                        ).first()
        assert job is not None and job.vars["trigger"] == "manual" and job.vars["expect"] == "sdpa"
        assert not vs.health_json(s, host)["degraded"]
    assert controller.ctx.registry.status_of(host) == "online"
