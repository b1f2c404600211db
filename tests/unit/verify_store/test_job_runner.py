"""agent/verify/job.py: the real agent's verify job (run_verification in the target python) and the
composite runner (verify → bench, playbooks → the playbook runner)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from fleetctl.agent.verify.job import CompositeRunner, VerifyJobRunner
from fleetctl.agent.verify.simulated import simulate_verification
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus


def fake_python(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[2:]\n"
                    "out = args[args.index('--out') + 1]\n"
                    "open(tmp := out + '.args', 'w').write(json.dumps(args))\n"
                    f"open(out, 'w').write({json.dumps(json.dumps(doc))})\n")
    path.chmod(0o755)
    return str(path)


class Playbooks:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
        self.kinds.append(job.kind)
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={"stats": {}})


def test_verify_job_runs_bench_in_target_python(tmp_path: Path) -> None:
    doc = simulate_verification("NVIDIA H100 80GB HBM3", node="n1", mode="full").to_json()
    doc["simulated"] = False
    for name in ("correctness", "speed", "e2e"):
        for e in doc[name]:
            e["simulated"] = False
    py = fake_python(tmp_path, doc)
    events: list[dict[str, Any]] = []
    playbooks = Playbooks()
    runner = CompositeRunner({"verify": VerifyJobRunner(lambda: py, tmp_path / "verify")}, playbooks)
    job = JobSpec("j1", "verify", {"mode": "full", "expect": "flash_attn", "model_path": "/models/qwen"}, 600)
    out = asyncio.run(asyncio.wait_for(runner.run(job, events.append), 60))
    assert out.status == "successful" and out.result["status"] == "pass" and out.result["passed"]
    assert out.result["verification"]["mode"] == "full"
    args = json.loads(next((tmp_path / "verify" / "j1").glob("*.args")).read_text())
    assert args[args.index("--mode") + 1] == "full" and args[args.index("--model") + 1] == "/models/qwen"
    assert [e["event"] for e in events] == ["fleet_verify_started", "fleet_verify_finished"]
    # playbook kinds go to the playbook runner
    asyncio.run(runner.run(JobSpec("j2", "install-wheel", {}, 60), events.append))
    assert playbooks.kinds == ["install-wheel"]


def test_verify_job_without_interpreter_reports_error_result(tmp_path: Path) -> None:
    runner = VerifyJobRunner(lambda: str(tmp_path / "missing-python"))
    out = asyncio.run(asyncio.wait_for(runner.run(JobSpec("j", "verify", {"mode": "quick"}, 60), lambda e: None),
                                       60))
    assert out.status == "successful"  # the run happened; its verdict is in the result
    assert out.result["status"] == "error" and not out.result["passed"]


def test_bench_timeout_stays_below_the_job_timeout() -> None:
    req = VerifyJobRunner(lambda: "/usr/bin/python3").request(JobSpec("j", "verify", {"mode": "full"}, 100))
    assert req.total_timeout == 90.0 and req.mode == "full" and req.expect == "flash_attn"
