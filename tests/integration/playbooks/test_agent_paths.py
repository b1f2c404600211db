"""The agent's paths and the playbooks' validation errors, on a real runner.

A relative ``--state-dir`` (the agent's default, ``state/agent``) once made every install fail with an
unhelpful "invalid install variables": the wheel the agent fetched landed under a relative path, and the
playbooks take only absolute ones. ``fleet-agent run`` now makes every path option absolute at start; here
the agent's own runner (``make_runner`` with the defaults, started in a tmp working directory) fetches a wheel
by sha256 and installs it into a real venv through the real install-wheel playbook (connection ``local``).
A bad variable's error names that variable and says what it must be.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.commands import run as agent_run
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.jobs import JobSpec
from tests.integration.harness.wheels import build_wheel, sha256_file


def _ansible() -> bool:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return shutil.which("ansible-playbook", path=path) is not None


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent_run.register(parser.add_subparsers())
    return parser.parse_args(["run", "--controller", "127.0.0.1:1", *argv])


class Store:
    """The agent's FetchArtifact client, serving one directory of files by sha256."""

    def __init__(self, files: list[Path]) -> None:
        self.files = {sha256_file(f): f for f in files}

    async def fetch_artifact(self, sha256: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.files[sha256], dest_dir))

    async def upload_artifact(self, path: Path, kind: str = "other", **_: Any) -> str:
        raise AssertionError("no upload expected")


def test_every_path_option_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "venv" / "bin" / "python")
    args = parse("--node-state-dir", "node", "--root", "root", "--ca", "ca.pem", "--python", "venv/bin/python",
                 "--ansible-python", "python3")
    agent_run.absolute_paths(args)
    assert args.state_dir == tmp_path / "state" / "agent"  # the default, relative
    assert (args.node_state_dir, args.root, args.ca) == (tmp_path / "node", tmp_path / "root", tmp_path / "ca.pem")
    assert args.python == str(tmp_path / "venv" / "bin" / "python")  # a venv's symlink is kept, not resolved
    assert args.ansible_python == shutil.which("python3")
    with pytest.raises(UsageError, match="--python 'no-such-python3': no such interpreter on PATH"):
        agent_run.absolute_paths(parse("--python", "no-such-python3"))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not _ansible(), reason="ansible-playbook not installed")
async def test_relative_state_dir_installs_and_bad_variables_are_named(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "target"], check=True)
    python = str(tmp_path / "target" / "bin" / "python")
    wheel = build_wheel(tmp_path / "wheels", version="2.8.3", requires=())
    sha = sha256_file(wheel)
    # the defaults: --state-dir state/agent; the playbooks' state dir relative as well
    args = parse("--node-state-dir", "node-state", "--ansible-python", sys.executable)
    runner = agent_run.make_runner(args)
    runner.client = Store([wheel])  # type: ignore[attr-defined]  # ArtifactJobRunner; bind() does this in the agent
    n = 0

    async def run(kind: str, variables: dict[str, Any]) -> Any:
        nonlocal n
        n += 1
        return await runner.run(JobSpec(f"job-{n}", kind, variables, timeout_s=240), lambda e: None)

    out = await run("install-wheel", {"wheel_sha256": sha, "python": python})
    assert out.status == "successful", out.error
    assert (tmp_path / "state" / "agent" / "artifacts" / sha / wheel.name).is_file()
    current = json.loads((tmp_path / "node-state" / "flash-attn-current.json").read_text())
    assert current["sha256"] == sha and current["version"] == "2.8.3"

    bad = await run("install-wheel", {"wheel_sha256": sha, "python": "target/bin/python"})
    assert bad.status == "failed" and bad.error
    assert "variable python must be the absolute path" in bad.error and "target/bin/python" in bad.error

    bad = await run("install-wheel", {"wheel_path": str(wheel), "wheel_sha256": sha.upper(), "python": python})
    assert bad.status == "failed" and bad.error and "variable wheel_sha256 must be 64 lower-case hex" in bad.error

    bad = await run("install-wheel", {"wheel_path": "wheels/x.whl", "wheel_sha256": sha, "python": python})
    assert bad.status == "failed" and bad.error and "variable wheel_path (the wheel to install) must be" in bad.error

    sdist = tmp_path / "flash_attn-2.8.3.tar.gz"
    sdist.write_bytes(b"stand-in")
    bad = await run("build-from-source", {"sdist_path": str(sdist), "sdist_sha256": sha256_file(sdist),
                                          "python": python, "cuda_archs": "80;sm_90"})
    assert bad.status == "failed" and bad.error and "variable cuda_archs must list CUDA architectures" in bad.error
    assert "80;sm_90" in bad.error

    bad = await run("rollback", {"python": python, "wheel_path": str(wheel)})
    assert bad.status == "failed" and bad.error and "wheel_path and wheel_sha256 go together" in bad.error

    refused = await run("rollback", {"python": python, "rb_previous": {"version": None}})
    assert refused.status == "error" and refused.error and "refused variable 'rb_previous'" in refused.error
