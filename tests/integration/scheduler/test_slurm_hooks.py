"""Scheduler hooks against a real Slurm (munged, slurmctld, slurmd from Debian's packages, started here:
tests/integration/harness/slurm.py) and real shell commands.

- A real ``fleet-agent run --executor ansible --scheduler slurm`` process (GPU facts simulated, labelled so; target
  venv, pip and playbooks real) gets an install-wheel job while a real ``sbatch --wrap "sleep …"`` job runs on its
  node: the node goes DRAINING (MIXED+DRAIN), then DRAINED (IDLE+DRAIN) once the sleep ends, the playbook runs,
  the node is resumed; then a verify job drains and resumes it again. A watcher polling ``scontrol show node``
  and the job's events show that order; a failing step still resumes; the dashboard's node page shows each hook's
  line. The agent's --pre/--post-step-hook commands ran around every step.
- In this process, with the real hooks: a node an operator drained beforehand stays drained (with their reason),
  a fleetctl drain left by a dead agent is taken over, an operator's drain during the step wins, a refused resume
  fails the job with the command to run; a wrong node name, a missing scontrol, a slurmctld that does not answer,
  a drain timeout (the drain undone), and the command hook's order and environment; hook flags with an executor
  that runs no playbooks are refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.agent.command_hook import CommandHook
from fleetctl.agent.scheduler_hooks import HOOK_FAILED_RC, HookedJobRunner, SchedulerHookError, Step
from fleetctl.agent.slurm_hook import SlurmHook
from fleetctl.controller.app import RunningController
from fleetctl.controller.artifacts import Provenance
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from tests.integration.fleet_support import AgentProcess, wait_for
from tests.integration.harness.slurm import SlurmCluster, free_port, parse_show, slurm_cluster
from tests.integration.harness.upstream import torch_wheel
from tests.integration.harness.wheels import build_wheel
from tests.integration.realnode.rig import TargetVenv, require_ansible

pytestmark = pytest.mark.timeout(150)

NODE = "gpu-slurm-1"
#: flags of scontrol's State that come and go on their own (a resume pings the node; a job's end is cleaned up)
TRANSIENT = ("+NOT_RESPONDING", "+COMPLETING")


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """One cluster for the module (tests that use it are marked ``root``: slurmd runs as root)."""
    with slurm_cluster(NODE) as c:
        yield c


@pytest.fixture
def slurm(cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The cluster with no job and its node idle; scontrol in this process (the in-process hooks) finds it."""
    cluster.cancel_all()
    if "DRAIN" in cluster.state():
        cluster.resume()
    cluster.wait_state("IDLE")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


class Watcher:
    """Polls the node's state and reason from a shell loop of its own (a process: nothing in this one, which runs
    the controller, can hold it up); ``seen`` is every change, with the time it was seen."""

    SCRIPT = ('while :; do out=$(scontrol show node -o "$1") && printf "%s|%s\\n" "$(date +%s.%N)" "$out"; '
              'sleep "$2"; done')

    def __init__(self, cluster: SlurmCluster, period: float = 0.15) -> None:
        self.cluster = cluster
        self.period = period
        self.seen: list[tuple[float, str, str]] = []
        self._out = cluster.root / "watch.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Watcher:
        with self._out.open("wb") as out:
            self._proc = subprocess.Popen(["sh", "-c", self.SCRIPT, "watch", self.cluster.node, str(self.period)],
                                          stdout=out, stderr=subprocess.DEVNULL, env=self.cluster.env,
                                          start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        for line in self._out.read_text(errors="replace").splitlines():
            stamp, _, shown = line.partition("|")
            state, reason = parse_show(shown)
            for flag in TRANSIENT:
                state = state.replace(flag, "")
            if state and (not self.seen or self.seen[-1][1:] != (state, reason)):
                self.seen.append((float(stamp), state, reason))

    def states(self) -> list[str]:
        out: list[str] = []
        for _, state, _ in self.seen:
            if not out or out[-1] != state:
                out.append(state)
        return out

    def first(self, state: str, after: float = 0.0) -> float:
        return next(t for t, s, _ in self.seen if s == state and t >= after)


def hook_events(job: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["data"]["phase"], e["data"]["msg"]) for e in job["events"] if e["event"] == "fleet_scheduler_hook"]


def event_time(job: dict[str, Any], name: str, last: bool = False) -> float:
    times = [dt.datetime.fromisoformat(e["created"]).timestamp() for e in job["events"] if e["event"] == name]
    assert times, f"no {name} event in job {job['id']}: {[e['event'] for e in job['events']]}"
    return times[-1] if last else times[0]


async def dashboard_page(rc: RunningController, path: str) -> str:
    """``path`` of the dashboard as a viewer sees it, logged in through the login form."""
    add_user(rc.ctx.store, "vic", "viewer", "correct horse battery")
    assert rc.ctx.http_url is not None
    async with httpx.AsyncClient(base_url=rc.ctx.http_url, timeout=30) as web:
        token = re.search(r'name="csrf_token" value="([^"]+)"', (await web.get("/login")).text)
        assert token is not None
        await web.post("/login", data={"username": "vic", "password": "correct horse battery",
                                       "csrf_token": token.group(1), "next": "/"})
        page = await web.get(path)
        assert page.status_code == 200, page.text[:500]
        return html.unescape(page.text)


async def run_job(rc: RunningController, agent: AgentProcess, kind: str, vars: dict[str, Any]) -> dict[str, Any]:
    job_id = await rc.ctx.jobs.submit_job(NODE, kind, vars, timeout=120)
    try:
        await rc.ctx.jobs.wait(job_id, timeout=110)
    except TimeoutError:
        raise AssertionError(f"{kind} job did not finish; agent log:\n{agent.log_tail()}") from None
    return rc.ctx.jobs.get(job_id)


@pytest.mark.root
async def test_a_real_agent_drains_its_slurm_node_for_each_step_and_resumes_it(
        slurm: SlurmCluster, controller: RunningController, tmp_path: Path) -> None:
    require_ansible()
    venv = TargetVenv.make(tmp_path / "venv", torch_wheel(tmp_path / "torch"), with_pip=True)
    wheel = controller.ctx.artifacts.put_file(build_wheel(tmp_path / "wheels"), "wheel",
                                              provenance=Provenance.user("test"))
    hook_log = tmp_path / "hooks.log"
    line = 'echo "$FLEET_HOOK_PHASE $FLEET_JOB_KIND $FLEET_JOB_ID ${FLEET_STEP_STATUS:-}" >> ' + str(hook_log)
    agent = AgentProcess(controller, NODE, tmp_path / "agent", tmp_path / "logs", [
        "--simulate", "h200", "--executor", "ansible", "--python", str(venv.python),
        "--node-state-dir", str(tmp_path / "node"), "--scheduler", "slurm", "--slurm-node-name", NODE,
        "--drain-timeout", "60", "--pre-step-hook", line, "--post-step-hook", line],
        env={"SLURM_CONF": str(slurm.conf)})
    await agent.start()
    try:
        await wait_for(lambda: controller.ctx.registry.status_of(NODE) in ("online", "degraded"), 60)
        install_vars = {"wheel_sha256": wheel.sha256, "python": str(venv.python)}

        # 1. a user's job runs: drain, wait for it, install, resume; then verify: drain, verify, resume
        sleeper = await asyncio.to_thread(slurm.sbatch_sleep, 4)  # the controller runs on this loop
        with Watcher(slurm) as watch:
            install = await run_job(controller, agent, "install-wheel", install_vars)
            await asyncio.to_thread(slurm.wait_state, "IDLE")
            verify = await run_job(controller, agent, "verify", {"mode": "quick"})
            await asyncio.to_thread(slurm.wait_state, "IDLE")
        assert install["status"] == "successful", (install["error"], agent.log_tail())
        assert watch.states() == ["MIXED", "MIXED+DRAIN", "IDLE+DRAIN", "IDLE", "IDLE+DRAIN", "IDLE"], watch.seen
        assert sleeper not in slurm.jobs()
        reasons = {reason.split(" [")[0] for _, state, reason in watch.seen if "DRAIN" in state}
        assert reasons == {f"fleetctl: install-wheel {install['id']}", f"fleetctl: verify {verify['id']}"}
        # drained (the sleep over) before the playbook started; resumed after it ended
        drained = watch.first("IDLE+DRAIN")
        assert drained <= event_time(install, "playbook_on_start") + watch.period
        assert watch.first("IDLE", after=drained) >= event_time(install, "playbook_on_stats")
        phases = [p for p, _ in hook_events(install)]
        assert phases == ["acquire", "progress", "acquired", "acquire", "acquired", "released", "released"]
        events = [e["event"] for e in install["events"]]
        first_play, last_hook = events.index("playbook_on_start"), max(
            i for i, e in enumerate(events) if e == "fleet_scheduler_hook")
        assert events.index("fleet_scheduler_hook") < first_play < last_hook
        record = install["result"]["scheduler"]["slurm"]
        assert record["ours"] is True and record["released"] is True and record["waited_s"] >= 1.0
        assert record["release_note"].startswith(f"{NODE} drained for ") and "resumed" in record["release_note"]
        assert verify["result"]["scheduler"]["slurm"]["released"] is True
        assert venv.versions()["flash-attn"] == "2.8.3"

        # 2. a failing step: the node is resumed all the same
        failed = await run_job(controller, agent, "install-wheel", {**install_vars, "python": "/nowhere/python"})
        assert failed["status"] == "failed"
        assert [p for p, _ in hook_events(failed)][-1] == "released"
        await asyncio.to_thread(slurm.wait_state, "IDLE")

        # the generic hook ran around every step, with the step's kind, id and (after) status
        jobs = [install, verify, failed]
        assert hook_log.read_text().splitlines() == [
            x for j in jobs for x in (f"pre {j['kind']} {j['id']} ", f"post {j['kind']} {j['id']} {j['status']}")]

        # the dashboard's node page shows what the hooks did, job by job
        page = await dashboard_page(controller, f"/nodes/{NODE}")
        assert "scheduler hook: slurm" in page and f"{NODE} drained for " in page
        assert re.search(f"{NODE} drained for \\d+ s, resumed \\(install-wheel successful\\)", page)
    finally:
        await agent.close()


class Recorder:
    """The inner runner of the in-process tests: notes what Slurm said while the step ran."""

    def __init__(self, cluster: SlurmCluster | None = None, log: Path | None = None) -> None:
        self.cluster = cluster
        self.log = log
        self.ran: list[str] = []

    async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
        self.ran.append(self.cluster.state() if self.cluster else job.kind)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write("step\n")
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0)


@pytest.mark.root
async def test_a_wrong_node_name_a_missing_scontrol_or_a_silent_slurmctld_stops_the_step_with_a_hint(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = Recorder(slurm)
    out = await HookedJobRunner(step, [SlurmHook("no-such-node")]).run(JobSpec("j1", "install-wheel"), lambda e: None)
    assert out.status == JobStatus.FAILED and out.rc == HOOK_FAILED_RC and step.ran == []
    assert "Node no-such-node not found" in (out.error or "") and "--slurm-node-name" in (out.error or "")

    missing = SlurmHook(NODE, scontrol="/nowhere/scontrol")
    with pytest.raises(FleetError) as err:
        await missing.acquire(Step("verify", "j2"), lambda line: None)
    assert isinstance(err.value, SchedulerHookError) and "cannot run /nowhere/scontrol" in err.value.message
    assert "slurm-client" in (err.value.hint or "")

    # slurmctld does not answer (nothing listens on its port): scontrol's own wait is cut at the hook's limit
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", f"SlurmctldPort={free_port()}", slurm.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    started = time.monotonic()
    out = await HookedJobRunner(step, [SlurmHook(NODE, command_timeout_s=2)]).run(JobSpec("j3", "verify"),
                                                                                 lambda e: None)
    assert time.monotonic() - started < 10 and step.ran == []
    assert f"`scontrol show node -o {NODE}` did not finish within 2 s" in (out.error or "")
    assert "scontrol ping" in (out.error or "")
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    assert slurm.state() == "IDLE"  # nothing was changed


@pytest.mark.root
async def test_a_drain_timeout_undoes_the_drain_and_names_the_jobs_command(slurm: SlurmCluster) -> None:
    slurm.sbatch_sleep(60)
    step = Recorder(slurm)
    started = time.monotonic()
    out = await HookedJobRunner(step, [SlurmHook(NODE, drain_timeout_s=1.5, poll_s=0.3)]).run(
        JobSpec("j3", "rollback"), lambda e: None)
    assert time.monotonic() - started < 15
    assert out.status == JobStatus.FAILED and step.ran == []
    assert "still run on gpu-slurm-1 after the drain timeout of 1.5 s" in (out.error or "")
    assert f"squeue -w {NODE}" in (out.error or "")
    slurm.wait_state("MIXED", timeout=10)  # the user's job runs on, and the node takes new ones again

    # the job's own timeout bounds the wait, leaving the step room (fleetctl.agent.busy_guard.wait_limit)
    out = await HookedJobRunner(step, [SlurmHook(NODE, poll_s=0.3)]).run(JobSpec("j4", "verify", timeout_s=4),
                                                                          lambda e: None)
    assert "after 2 s, as long as the job's timeout of 4 s allows" in (out.error or "") and step.ran == []
    slurm.wait_state("MIXED", timeout=10)


async def test_the_command_hook_runs_pre_step_post_with_the_steps_environment(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    show = f'echo "$FLEET_HOOK_PHASE $FLEET_JOB_KIND $FLEET_JOB_ID $FLEET_ROLLOUT_ID ${{FLEET_STEP_STATUS:-}}" >> {log}'
    step = Recorder(log=log)
    runner = HookedJobRunner(step, [CommandHook(show, show)])
    out = await runner.run(JobSpec("j4", "build-from-source", {"rollout_id": "r9"}), lambda e: None)
    assert out.status == JobStatus.SUCCESSFUL
    assert log.read_text().splitlines() == ["pre build-from-source j4 r9 ", "step",
                                            "post build-from-source j4 r9 successful"]
    assert out.result["scheduler"]["command"]["note"].startswith("--pre-step-hook succeeded")

    log.unlink()
    refusing = HookedJobRunner(step, [CommandHook(f"echo no >> {log}; echo busy >&2; exit 3", f"echo post >> {log}")])
    out = await refusing.run(JobSpec("j5", "verify"), lambda e: None)
    assert out.status == JobStatus.FAILED and log.read_text() == "no\n"  # no step, no post
    assert "--pre-step-hook exited 3: busy" in (out.error or "")

    failing_post = HookedJobRunner(step, [CommandHook(None, "exit 4")])
    out = await failing_post.run(JobSpec("j6", "verify"), lambda e: None)
    assert out.status == JobStatus.FAILED and out.result["step_status"] == "successful"
    assert "--post-step-hook exited 4" in (out.error or "") and "FLEET_STEP_STATUS=successful" in (out.error or "")

    slow = HookedJobRunner(step, [CommandHook("sleep 30", None, timeout_s=0.5)])
    started = time.monotonic()
    out = await slow.run(JobSpec("j7", "verify"), lambda e: None)
    assert time.monotonic() - started < 5 and "did not finish within 0.5 s" in (out.error or "")


@pytest.mark.root
async def test_an_operators_drain_is_kept_and_the_step_runs_without_draining_again(slurm: SlurmCluster) -> None:
    slurm.drain("operator: bad DIMM")
    step = Recorder(slurm)
    out = await HookedJobRunner(step, [SlurmHook(NODE, poll_s=0.3)]).run(JobSpec("j11", "verify"), lambda e: None)
    record = out.result["scheduler"]["slurm"]
    assert out.status == JobStatus.SUCCESSFUL and step.ran == ["IDLE+DRAIN"] and record["ours"] is False
    assert "was drained by an operator (reason: operator: bad DIMM) and stays so" in record["note"]
    assert record["release_note"] == f"{NODE} left as it was (not drained by fleetctl)"
    assert slurm.state().startswith("IDLE+DRAIN") and slurm.reason().startswith("operator: bad DIMM")


@pytest.mark.root
async def test_a_leftover_fleetctl_drain_is_taken_over_and_an_operators_drain_during_the_step_wins(
        slurm: SlurmCluster) -> None:
    hook = SlurmHook(NODE, poll_s=0.3)
    slurm.drain("fleetctl: install-wheel 0123 (an agent that died mid-step)")
    step = Recorder(slurm)
    out = await HookedJobRunner(step, [hook]).run(JobSpec("j8", "install-wheel"), lambda e: None)
    assert step.ran == ["IDLE+DRAIN"] and out.result["scheduler"]["slurm"]["ours"] is True
    assert "an earlier fleetctl drain, taken over" in out.result["scheduler"]["slurm"]["note"]
    slurm.wait_state("IDLE")  # resumed

    class OperatorDrains(Recorder):
        async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
            slurm.drain("operator: keep it out, fan broken")
            return await super().run(job, emit_event)

    out = await HookedJobRunner(OperatorDrains(slurm), [hook]).run(JobSpec("j9", "verify"), lambda e: None)
    assert out.status == JobStatus.SUCCESSFUL
    assert "left drained: an operator drained it during the step" in out.result["scheduler"]["slurm"]["release_note"]
    assert "DRAIN" in slurm.state() and slurm.reason().startswith("operator: keep it out")


@pytest.mark.root
async def test_a_resume_that_fails_fails_the_job_with_the_command_to_run(slurm: SlurmCluster, tmp_path: Path) -> None:
    refusing = tmp_path / "scontrol"  # the real scontrol, except that it refuses to resume
    refusing.write_text('#!/bin/sh\ncase "$*" in *state=resume*) echo "slurm_update error: Access denied" >&2; '
                        'exit 1;; esac\nexec scontrol "$@"\n')
    refusing.chmod(0o755)
    events: list[dict[str, Any]] = []
    out = await HookedJobRunner(Recorder(slurm), [SlurmHook(NODE, scontrol=str(refusing))]).run(
        JobSpec("j10", "install-wheel"), events.append)
    assert out.status == JobStatus.FAILED and out.result["step_status"] == "successful"
    assert "Access denied" in (out.error or "")
    assert (out.error or "").endswith(f"run: scontrol update nodename={NODE} state=resume")
    assert events[-1]["event_data"]["phase"] == "release-failed"
    assert slurm.state().startswith("IDLE+DRAIN")  # still drained, and the job says so


@pytest.mark.parametrize("executor", ["none", "simulated"])
def test_scheduler_hooks_need_the_ansible_executor(executor: str, tmp_path: Path) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "fleet-agent"), "run", "--controller", "127.0.0.1:1",
                           "--state-dir", str(tmp_path), "--simulate", "h200", "--executor", executor,
                           "--scheduler", "slurm"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "scheduler hooks need --executor ansible" in proc.stderr
