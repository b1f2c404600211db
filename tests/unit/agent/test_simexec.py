"""The simulated executor: durations and faults from the profile, facts that follow the jobs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetctl.agent.profiles import load_profile
from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.fleet.jobs import JobSpec


async def test_jobs_change_the_simulated_node(tmp_path: Path) -> None:
    facts = load_profile("l40s", "n1")
    facts = replace(facts, extra={**facts.extra, "job_seconds": {"*": 0}, "job_faults": {"cuda-toolkit": "E: boom"}})
    runner = SimulatedJobRunner(lambda: facts, tmp_path)
    events: list[dict[str, Any]] = []
    uploaded: list[tuple[Path, str]] = []

    async def upload(path: Path, kind: str = "other", *, job_id: str = "") -> str:
        uploaded.append((path, job_id))  # the controller accepts a build's wheel only with its job id
        return "ab" * 32

    runner.uploader = upload
    failed = await runner.run(JobSpec("j0", "cuda-toolkit", {}), events.append)
    assert failed.status == "failed" and failed.error == "E: boom"
    built = await runner.run(JobSpec("j1", "build-from-source", {"flash_attn_version": "2.8.3", "variant": "fa2-source",
                                                                "build_key": "k"}), events.append)
    assert built.ok and built.result["built_wheel"]["sha256"] == "ab" * 32 and uploaded[0][0].exists()
    assert uploaded[0][1] == "j1"
    fa = runner.current_facts().flash_attn
    assert fa is not None and fa.version == "2.8.3"
    verified = await runner.run(JobSpec("j2", "verify", {}), events.append)
    assert verified.result["verification"]["simulated"] is True
    assert verified.result["verification"]["passed"] is True
    await runner.run(JobSpec("j3", "rollback", {"previous": None}), events.append)
    assert runner.current_facts().flash_attn is None
    assert all(e["event_data"].get("simulated", True) for e in events if e["event"] == "playbook_on_task_start")


async def test_installed_flash_attn_survives_an_agent_restart(tmp_path: Path) -> None:
    facts = load_profile("t4", "n1")
    facts = replace(facts, flash_attn=None, extra={**facts.extra, "job_seconds": {"*": 0}})
    runner = SimulatedJobRunner(lambda: facts, tmp_path)
    await runner.run(JobSpec("j1", "install-wheel", {"flash_attn_version": "2.8.3", "variant": "fa2"}), lambda e: None)
    # kill -9 and restart: a new runner on the same work dir, facts from the profile again
    again = SimulatedJobRunner(lambda: facts, tmp_path)
    fa = again.current_facts().flash_attn
    assert fa is not None and (fa.version, fa.variant) == ("2.8.3", "fa2")
    await again.run(JobSpec("j2", "rollback", {"previous": None}), lambda e: None)  # its record survived too
    assert again.current_facts().flash_attn is None
    assert SimulatedJobRunner(lambda: facts, tmp_path).current_facts().flash_attn is None
