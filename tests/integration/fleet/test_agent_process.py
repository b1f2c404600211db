"""`fleet-agent run` as a real process: SIGTERM honoured in every phase (enrolling, waiting for approval,
connected, running a job), one clear error and a non-zero exit for a bad --ca or an unreachable controller,
and JSON log lines. Real signals, real sockets, a real controller on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from fleetctl.controller.app import RunningController
from fleetctl.controller.ca import CertAuthority
from fleetctl.controller.enrollment import TokenLimits
from fleetctl.fleet.jobs import JobStatus
from tests.integration.fleet_support import AgentProcess, wait_for

pytestmark = pytest.mark.timeout(120)

SIM = ["--simulate", "a100", "--executor", "simulated"]


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes


def agent(rc: RunningController, tmp_path: Path, *args: str, host: str = "node-p") -> AgentProcess:
    return AgentProcess(rc, host, tmp_path / "state", tmp_path / "logs", [*SIM, *args],
                        env={"GRPC_VERBOSITY": "NONE"})


async def exits(proc: AgentProcess, within: float) -> tuple[int, float]:
    assert proc.proc is not None
    started = time.monotonic()
    code = await asyncio.wait_for(proc.proc.wait(), within)
    return code, time.monotonic() - started


async def terminate(proc: AgentProcess, within: float = 10) -> int:
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    code, _ = await exits(proc, within)
    return code


async def wait_log(proc: AgentProcess, text: str, timeout: float = 30) -> None:
    await wait_for(lambda: text in proc.log_tail(400), timeout=timeout)


@pytest.mark.parametrize("phase", ["enrolling", "approval", "connected"])
async def test_sigterm_in_every_phase_exits_zero_promptly(controller: RunningController, tmp_path: Path,
                                                          phase: str) -> None:
    args: list[str] = []
    if phase == "enrolling":  # the enrollment port is unreachable: the agent is in its retry loop
        port = closed_port()
        args = ["--enroll-address", port, "--controller", port]
    if phase == "approval":  # --token wins over the plain token AgentProcess puts in the environment
        args = ["--token", controller.ctx.enrollment.create_token(limits=TokenLimits(approval=True))[0]]
    proc = agent(controller, tmp_path, *args)
    await proc.start()
    try:
        if phase == "approval":
            await wait_log(proc, "waiting for approval on controller")
            assert "fleetctl agents approve node-p" in proc.log_tail(400)
        elif phase == "enrolling":
            await wait_log(proc, "enrollment failed: UNAVAILABLE")
        else:
            await wait_for(lambda: controller.ctx.registry.status_of("node-p") == "online", timeout=40)
        assert await terminate(proc, within=10) == 0, proc.log_tail()
        assert "SIGTERM received: stopping" in proc.log_tail(400)
        if phase == "approval":  # a restart goes on waiting with the same request
            assert (tmp_path / "state" / "pending.json").exists()
    finally:
        await proc.close()


async def test_sigterm_while_a_job_runs_cancels_reports_and_exits_zero(controller: RunningController,
                                                                      tmp_path: Path) -> None:
    proc = agent(controller, tmp_path, "--stop-grace", "10")
    proc.env["FLEET_SIM_JOB_SECONDS"] = json.dumps({"build-from-source": 600, "*": 0.2})
    await proc.start()
    try:
        await wait_for(lambda: controller.ctx.registry.status_of("node-p") == "online", timeout=40)
        job_id = await controller.ctx.jobs.submit_job("node-p", "build-from-source", {"flash_attn_version": "2.8.3"})
        await wait_for(lambda: controller.ctx.jobs.get(job_id)["status"] == "running", timeout=20)
        code = await terminate(proc, within=15)
        assert code == 0, proc.log_tail()
        job = controller.ctx.jobs.get(job_id)
        assert job["status"] == JobStatus.CANCELED, job
        assert "agent was stopped (SIGTERM/SIGINT)" in job["error"]
    finally:
        await proc.close()


async def test_garbage_ca_is_one_clear_error(controller: RunningController, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    proc = agent(controller, tmp_path, "--ca", str(garbage))
    await proc.start()
    code, _ = await exits(proc, 30)
    log = proc.log_tail(400)
    assert code == 3, log
    assert log.count("error[bad-input]") == 1 and "is not a PEM certificate" in log and "hint:" in log, log


async def test_wrong_ca_is_one_clear_error(controller: RunningController, tmp_path: Path) -> None:
    other = CertAuthority(tmp_path / "other-ca")
    proc = agent(controller, tmp_path, "--ca", str(other.ca_path))
    await proc.start()
    code, _ = await exits(proc, 30)
    log = proc.log_tail(400)
    assert code == 6, log
    assert log.count("error[tls]") == 1 and "TLS handshake with the controller failed" in log, log
    assert "--ca" in log


async def test_unreachable_controller_gives_up_after_the_connect_timeout(controller: RunningController,
                                                                         tmp_path: Path) -> None:
    port = closed_port()
    proc = agent(controller, tmp_path, "--enroll-address", port, "--controller", port, "--connect-timeout", "3")
    await proc.start()
    code, took = await exits(proc, 40)
    log = proc.log_tail(400)
    assert code == 7, log
    assert log.count("error[controller-unavailable]") == 1 and "was not reachable for 3s" in log, log
    assert took < 30
    retries = log.count("enrollment failed: UNAVAILABLE")
    assert 1 <= retries <= 8, log  # backoff, not a busy loop


async def test_json_log_format(controller: RunningController, tmp_path: Path) -> None:
    port = closed_port()
    proc = agent(controller, tmp_path, "--enroll-address", port, "--controller", port, "--connect-timeout", "2",
                 "--log-format", "json")
    await proc.start()
    code, _ = await exits(proc, 40)
    assert code == 7
    lines = [line for line in proc.log_tail(400).splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["level"] == "WARNING" and "enrollment failed" in r["message"] for r in records)


async def test_used_up_token_is_one_error_with_the_controllers_hint(controller: RunningController,
                                                                   tmp_path: Path) -> None:
    token, _ = controller.ctx.enrollment.create_token(limits=TokenLimits(uses=1))
    controller.ctx.enrollment.revoke_token(token)  # spent otherwise: the same refusal path
    spent, _ = controller.ctx.enrollment.create_token(limits=TokenLimits(uses=2, hostname_pattern="gpu-*"))
    proc = agent(controller, tmp_path, "--token", spent)  # enrolls as node-p: outside the pattern
    await proc.start()
    code, _ = await exits(proc, 30)
    log = proc.log_tail(400)
    assert code == 6, log
    assert log.count("error[auth]") == 1 and "hostnames matching 'gpu-*', not node-p" in log, log
    assert "hint: enroll with a matching --hostname" in log, log
