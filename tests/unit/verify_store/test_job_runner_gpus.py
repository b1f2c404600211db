"""agent/verify/job.py on several GPUs: one bench per GPU the busy check chose, the worst one's verdict stored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fleetctl.agent.verify.job import VerifyJobRunner
from fleetctl.agent.verify.simulated import simulate_verification
from fleetctl.fleet.jobs import JobSpec
from tests.unit.verify_store.test_job_runner import fake_python


def test_each_chosen_gpu_is_measured_in_pci_order(tmp_path: Path) -> None:
    doc = simulate_verification("NVIDIA H100 80GB HBM3", node="n1", mode="quick").to_json()
    py = fake_python(tmp_path, doc)
    events: list[dict[str, Any]] = []
    job = JobSpec("j1", "verify", {"mode": "quick", "gpu_indices": [1, 3]}, 300)
    out = asyncio.run(asyncio.wait_for(VerifyJobRunner(lambda: py, tmp_path / "verify").run(job, events.append), 60))
    assert out.ok and out.result["gpus"] == [1, 3] and out.result["passed"]
    assert [(g["index"], g["status"]) for g in out.result["per_gpu"]] == [(1, "pass"), (3, "pass")]
    devices = []
    for gpu in (1, 3):
        args = json.loads(next((tmp_path / "verify" / "j1" / f"gpu{gpu}").glob("*.args")).read_text())
        devices.append(args[args.index("--device") + 1])
        assert float(args[args.index("--timeout") + 1]) < 145  # two benches fit in the job's 300 s
    assert devices == ["cuda:1", "cuda:3"]
    assert [e["event_data"].get("gpu") for e in events] == [1, 1, 3, 3]


def test_without_chosen_gpus_the_default_device_and_no_gpu_list(tmp_path: Path) -> None:
    doc = simulate_verification("NVIDIA H100 80GB HBM3", node="n1", mode="quick").to_json()
    job = JobSpec("j2", "verify", {"mode": "quick", "gpu_indices": "0; rm -rf /"}, 300)
    out = asyncio.run(VerifyJobRunner(lambda: fake_python(tmp_path, doc), tmp_path / "v").run(job, lambda e: None))
    assert out.ok and "gpus" not in out.result
    args = json.loads(next((tmp_path / "v" / "j2").glob("*.args")).read_text())
    assert args[args.index("--device") + 1] == "cuda:0"
