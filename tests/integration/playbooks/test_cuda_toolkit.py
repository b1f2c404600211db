"""Broken keyring → apt-keyring-fix → cuda-toolkit, on a real Debian root with real apt."""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence

import pytest

from fleetctl.agent.probes.nvcc import NvccProbe
from fleetctl.agent.probes.system import DEFAULT_TIMEOUT_S, CommandResult, run_command
from tests.integration.harness.fixtures import AptWorld, NodeDriver, skip_reason, write_failing_source

pytestmark = [pytest.mark.root, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def probe_in_root(node: NodeDriver) -> NvccProbe:
    """The agent's real nvcc probe, looking inside the simulated node's root."""
    root = str(node.root)

    def runner(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
               env: Mapping[str, str] | None = None) -> CommandResult:
        return run_command(["chroot", root, *argv], timeout=timeout, env=env)

    def inside(*argv: str) -> str:
        return run_command(["chroot", root, *argv]).stdout.strip()

    return NvccProbe(runner, env={"PATH": "/usr/bin:/bin"}, which=lambda name, path: None,
                     glob_paths=lambda pattern: sorted(p[len(root):] for p in glob.glob(root + pattern)),
                     is_executable=lambda p: run_command(["chroot", root, "test", "-x", p]).returncode == 0,
                     realpath=lambda p: inside("readlink", "-f", p))


def test_broken_keyring_then_toolkit(node: NodeDriver, apt_world: AptWorld) -> None:
    write_failing_source(node, apt_world, "list")
    rc, out = node.apt_update()
    assert rc != 0 and "NO_PUBKEY" in out

    fix = node.run("apt-keyring-fix", {"repo_uri": apt_world.cuda_uri, "keyring_name": "cuda-archive-keyring",
                                       "key_url": f"{apt_world.url}/keys/cuda.asc"})
    assert fix.outcome.status == "successful", fix.outcome.error
    rc, out = node.apt_update()
    assert rc == 0 and "NO_PUBKEY" not in out, out

    vars = {"cuda_version": "12.4", "driver_cuda_max": "12.6"}
    first = node.run("cuda-toolkit", vars)
    assert first.outcome.status == "successful", first.outcome.error
    assert first.outcome.changed > 0
    assert first.outcome.result["cuda_toolkit"]["nvcc_release"] == "release 12.4, V12.4.131"
    out = node.node.chroot("/usr/local/cuda/bin/nvcc", "-V").stdout
    assert "Cuda compilation tools, release 12.4, V12.4.131" in out
    assert "/usr/local/cuda/bin" in node.node.file("/etc/profile.d/cuda.sh").read_text()
    facts = probe_in_root(node).probe()
    assert facts.active is not None and facts.active.nvcc == "12.4", facts
    assert facts.active.path == "/usr/local/cuda/bin/nvcc"

    second = node.run("cuda-toolkit", vars)
    assert second.outcome.status == "successful", second.outcome.error
    assert second.outcome.changed == 0, second.outcome.result["stats"]


def test_refuses_toolkit_above_driver_max(node: NodeDriver, apt_world: AptWorld) -> None:
    job = node.run("cuda-toolkit", {"cuda_version": "13.0", "driver_cuda_max": "12.4"})
    assert job.outcome.status == "failed"
    assert job.outcome.error and "newer than the driver's maximum CUDA 12.4" in job.outcome.error
    assert not node.node.file("/usr/local/cuda-13.0").exists()


def test_repo_source_from_vars(node: NodeDriver, apt_world: AptWorld) -> None:
    """cuda_repo_uri: the playbook writes the source itself (keyring already there)."""
    node.node.file("/usr/share/keyrings/cuda-archive-keyring.gpg").write_bytes(apt_world.key_binary.read_bytes())
    job = node.run("cuda-toolkit", {"cuda_version": "13.0", "driver_cuda_max": "13.0",
                                    "cuda_repo_uri": apt_world.cuda_uri})
    assert job.outcome.status == "successful", job.outcome.error
    assert "release 13.0," in node.node.chroot("/usr/local/cuda/bin/nvcc", "-V").stdout
