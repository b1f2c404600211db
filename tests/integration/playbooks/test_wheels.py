"""install-wheel, rollback and build-from-source into a venv inside a real Debian root."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from fleetctl.fleet.jobs import JobSpec
from tests.integration.harness import wheels
from tests.integration.harness.fixtures import TARGET_PYTHON, TORCH_VERSION, NodeDriver, skip_reason, tree_digest

pytestmark = [pytest.mark.root, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def wheel_vars(path: Path, sha: str | None = None) -> dict[str, Any]:
    return {"wheel_path": str(path), "wheel_sha256": sha or wheels.sha256_file(path), "python": TARGET_PYTHON}


def test_install_then_rollback(node: NodeDriver, tmp_path: Path) -> None:
    old = wheels.build_wheel(tmp_path / "w", version="2.7.4", local="cu12torch2.7cxx11abiFALSE")
    new = wheels.build_wheel(tmp_path / "w", version="2.8.3", local="cu12torch2.7cxx11abiFALSE")
    assert node.run("install-wheel", wheel_vars(old)).outcome.ok
    assert node.installed() == "2.7.4"

    first = node.run("install-wheel", wheel_vars(new))
    assert first.outcome.status == "successful", first.outcome.error
    assert first.outcome.changed > 0
    assert first.outcome.result["install_wheel"]["previous_version"] == "2.7.4"
    assert node.installed() == "2.8.3"
    assert node.installed("torch") == TORCH_VERSION.split("+")[0]  # --no-deps: torch untouched
    prev = json.loads(node.node.file("/var/lib/fleet-agent/flash-attn-previous.json").read_text())
    assert prev["version"] == "2.7.4+cu12torch2.7cxx11abiFALSE" and prev["sha256"] == wheels.sha256_file(old)

    second = node.run("install-wheel", wheel_vars(new))
    assert second.outcome.status == "successful", second.outcome.error
    assert second.outcome.changed == 0, second.outcome.result["stats"]

    rb = node.run("rollback", {"python": TARGET_PYTHON})
    assert rb.outcome.status == "successful", rb.outcome.error
    assert rb.outcome.changed > 0
    assert node.installed() == "2.7.4"
    rb2 = node.run("rollback", {"python": TARGET_PYTHON})
    assert rb2.outcome.status == "successful", rb2.outcome.error
    assert rb2.outcome.changed == 0, rb2.outcome.result["stats"]
    assert node.installed() == "2.7.4"


def test_rollback_to_nothing_uninstalls(node: NodeDriver, tmp_path: Path) -> None:
    w = wheels.build_wheel(tmp_path / "w", version="2.8.3")
    assert node.run("install-wheel", wheel_vars(w)).outcome.ok
    rb = node.run("rollback", {"python": TARGET_PYTHON})
    assert rb.outcome.status == "successful", rb.outcome.error
    assert node.installed() is None
    assert node.run("rollback", {"python": TARGET_PYTHON}).outcome.changed == 0


def test_sha256_mismatch_refused_nothing_installed(node: NodeDriver, tmp_path: Path) -> None:
    w = wheels.build_wheel(tmp_path / "w", version="2.8.3")
    before = tree_digest(node.root, "/opt/venv")
    job = node.run("install-wheel", wheel_vars(w, "0" * 64))
    assert job.outcome.status == "failed"
    assert job.outcome.error and "sha256 is" in job.outcome.error and "nothing installed" in job.outcome.error
    assert node.installed() is None
    assert tree_digest(node.root, "/opt/venv") == before
    assert not node.node.file("/var/lib/fleet-agent/wheels").exists()


@pytest.mark.parametrize("bad", [
    {"python": "/opt/venv/bin/python; touch /tmp/pwned"},
    {"python": "$(touch /tmp/pwned)"},
    {"wheel_sha256": "`touch /tmp/pwned`"},
])
def test_metacharacters_cannot_inject(node: NodeDriver, tmp_path: Path, bad: dict[str, str]) -> None:
    w = wheels.build_wheel(tmp_path / "w", version="2.8.3")
    job = node.run("install-wheel", {**wheel_vars(w), **bad})
    assert job.outcome.status == "failed"
    name = next(iter(bad))  # one assert per variable: the error names the refused one and shows it as text
    assert job.outcome.error and f"variable {name} must be" in job.outcome.error and bad[name] in job.outcome.error
    assert not node.node.file("/tmp/pwned").exists() and not Path("/tmp/pwned").exists()
    assert node.installed() is None


def test_metacharacters_in_version_and_hostname(node: NodeDriver) -> None:
    job = node.run("cuda-toolkit", {"cuda_version": "12.4; touch /tmp/pwned", "driver_cuda_max": "12.4"})
    assert job.outcome.status == "failed" and job.outcome.error and "invalid variables" in job.outcome.error
    # a hostname-like value travels only as data: job ids and variable names are checked by the executor
    bad_id = node.run("rollback", {"python": TARGET_PYTHON}, job_id="node1$(touch /tmp/pwned)")
    assert bad_id.outcome.status == "error" and bad_id.outcome.error and "refused job id" in bad_id.outcome.error
    escape = node.run("rollback", {"python": TARGET_PYTHON, "ansible_connection": "local"})
    assert escape.outcome.status == "error" and escape.outcome.error and "ansible_" in escape.outcome.error
    assert not node.node.file("/tmp/pwned").exists() and not Path("/tmp/pwned").exists()


def test_killed_midway_then_converges(node: NodeDriver, tmp_path: Path) -> None:
    old = wheels.build_wheel(tmp_path / "w", version="2.7.4")
    new = wheels.build_wheel(tmp_path / "w", version="2.8.3")
    assert node.run("install-wheel", wheel_vars(old)).outcome.ok

    events: list[dict[str, Any]] = []

    def emit(ev: dict[str, Any]) -> None:
        events.append(ev)
        # stop the agent as soon as the new wheel sits on the node, before pip runs
        if ev.get("event") == "runner_on_ok" and \
                ev.get("event_data", {}).get("task") == "Keep the wheel on the node (for installs and rollback)":
            node.runner.cancel_all()

    spec = JobSpec(job_id="killed", kind="install-wheel", vars=wheel_vars(new), timeout_s=300)
    outcome = asyncio.run(node.runner.run(spec, emit))
    assert outcome.status == "canceled", outcome
    assert node.installed() == "2.7.4"  # previous working state
    node.node.chroot(TARGET_PYTHON, "-c", "import flash_attn; assert flash_attn.__version__ == '2.7.4'")

    again = node.run("install-wheel", wheel_vars(new))
    assert again.outcome.status == "successful", again.outcome.error
    assert node.installed() == "2.8.3"
    # the interrupted run did not overwrite the rollback record
    prev = json.loads(node.node.file("/var/lib/fleet-agent/flash-attn-previous.json").read_text())
    assert prev["version"] == "2.7.4" and prev["sha256"] == wheels.sha256_file(old)


def test_timeout_kills_the_job(node: NodeDriver, tmp_path: Path) -> None:
    w = wheels.build_wheel(tmp_path / "w", version="2.8.3")
    job = node.run("install-wheel", wheel_vars(w), timeout_s=1.5)
    assert job.outcome.status == "timeout", job.outcome
    assert job.outcome.error and "timeout" in job.outcome.error


@pytest.mark.parametrize(("dist", "package", "subdir"), [("flash_attn", "flash_attn", ""),
                                                         ("flash_attn_3", "flash_attn_interface", "hopper")])
def test_build_from_source(node: NodeDriver, tmp_path: Path, dist: str, package: str, subdir: str) -> None:
    sdist = wheels.build_sdist(tmp_path / "s", dist, "2.8.3", package=package, subdir=subdir)
    node.node.file("/usr/local/cuda-12.4/bin").mkdir(parents=True)
    from tests.integration.harness.aptrepo import nvcc_script

    nvcc = node.node.file("/usr/local/cuda-12.4/bin/nvcc")
    nvcc.write_text(nvcc_script("12.4"))
    nvcc.chmod(0o755)
    node.node.file("/usr/local/cuda").symlink_to("/usr/local/cuda-12.4")
    vars = {"sdist_path": str(sdist), "sdist_sha256": wheels.sha256_file(sdist), "python": TARGET_PYTHON,
            "cuda_archs": "80;90", "max_jobs": 3, "nvcc_threads": 2, "dist_name": dist, "sdist_subdir": subdir}
    first = node.run("build-from-source", vars)
    assert first.outcome.status == "successful", first.outcome.error
    built = first.outcome.result["built_wheel"]
    agent_copy = Path(built["path"])
    assert agent_copy.is_file() and agent_copy.parent == node.state_dir / "jobs" / "build-from-source-1" / "outputs"
    assert wheels.sha256_file(agent_copy) == built["sha256"]
    assert built["filename"] == f"{dist}-2.8.3-cp311-cp311-linux_x86_64.whl"
    env = json.loads(node.node.chroot(TARGET_PYTHON, "-c",
                                      f"import importlib.resources as r; print(r.files('{package}')"
                                      ".joinpath('_build_env.json').read_text())").stdout)
    assert env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert env["FLASH_ATTN_CUDA_ARCHS"] == "80;90"
    assert env["MAX_JOBS"] == "3" and env["NVCC_THREADS"] == "2"
    assert env["CUDA_HOME"] == "/usr/local/cuda" and env["nvcc"] == "/usr/local/cuda/bin/nvcc"
    assert env["ninja"] and env["cwd"] == (subdir or "src")
    assert node.installed(dist) == "2.8.3"
    assert first.outcome.result["install_wheel"]["sha256"] == built["sha256"]

    second = node.run("build-from-source", vars)
    assert second.outcome.status == "successful", second.outcome.error
    assert second.outcome.changed == 0, second.outcome.result["stats"]
    assert second.outcome.result["built_wheel"]["sha256"] == built["sha256"]
