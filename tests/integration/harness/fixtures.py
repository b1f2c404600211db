"""pytest fixtures for the playbook tests (registered by tests/integration/playbooks/conftest.py).

Session-wide: the cached Debian base, a signed apt repository world served over HTTP, and a
prepared node layer (target venv with a stand-in torch, apt sources pointing only at the
local repositories). Per test: a fresh overlay root for one simulated node and an
``AnsibleJobRunner`` that drives it through the chroot connection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.executor import AnsibleJobRunner
from fleetctl.fleet.jobs import JobOutcome, JobSpec
from tests.integration.harness import aptrepo, debian, wheels

TARGET_PYTHON = "/opt/venv/bin/python"
TORCH_VERSION = "2.7.1+cu126"
CUDA_VERSIONS = ("12.4", "13.0")


def skip_reason() -> str | None:
    return debian.can_build_roots()


@dataclass
class AptWorld:
    """The locally served repositories and their keys."""

    url: str
    cuda_uri: str            # failing-by-default repository (the node lacks its key)
    other_uri: str           # a healthy repository the node already trusts
    cuda_fpr: str
    other_fpr: str
    key_armored: Path        # the cuda repo key, on the agent's side
    key_binary: Path
    other_keyring: Path      # binary keyring for the healthy repository
    files: Path              # served directory
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    outcome: JobOutcome
    events: list[dict[str, Any]]


class NodeDriver:
    """One simulated node: its overlay root plus an agent-side runner for it."""

    def __init__(self, node: debian.NodeRoot, state_dir: Path) -> None:
        self.node = node
        self.root = node.path
        self.state_dir = state_dir
        self.runner = AnsibleJobRunner(state_dir, root=node.path)
        self._n = 0

    def run(self, kind: str, vars: dict[str, Any], *, timeout_s: float = 300, job_id: str | None = None) -> Job:
        self._n += 1
        events: list[dict[str, Any]] = []
        spec = JobSpec(job_id=job_id or f"{kind}-{self._n}", kind=kind, vars=vars, timeout_s=timeout_s)
        outcome = asyncio.run(self.runner.run(spec, events.append))
        return Job(outcome, events)

    def apt_update(self) -> tuple[int, str]:
        p = self.node.chroot("apt-get", "update", check=False)
        return p.returncode, p.stdout + p.stderr

    def installed(self, dist: str = "flash-attn") -> str | None:
        p = self.node.chroot(TARGET_PYTHON, "-c", "import sys\nfrom importlib import metadata as m\n"
                             "try: print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError: print('')",
                             dist)
        return p.stdout.strip() or None


@pytest.fixture(scope="session")
def debian_base_root() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return debian.debian_base()


@pytest.fixture(scope="session")
def apt_world(debian_base_root: Path) -> Iterator[AptWorld]:
    work = Path(tempfile.mkdtemp(prefix="fleet-apt-"))
    served = work / "www"
    cuda_key = aptrepo.GpgKey(work, "Fleet Test CUDA Repo")
    other_key = aptrepo.GpgKey(work, "Fleet Test Other Repo")
    server: aptrepo.HttpServer | None = None
    try:
        cuda = aptrepo.FlatRepo(served / "cuda", cuda_key)
        for v in CUDA_VERSIONS:
            cuda.add(aptrepo.build_cuda_toolkit_deb(v, work / "debs"))
        cuda.publish()
        other = aptrepo.FlatRepo(served / "other", other_key)
        other.add(aptrepo.build_cuda_toolkit_deb("12.1", work / "debs"))
        other.publish()
        keys = served / "keys"
        keys.mkdir()
        cuda_key.export_armored(keys / "cuda.asc")
        cuda_key.export_binary(keys / "cuda.gpg")
        (keys / "garbage.asc").write_text("<html><body>Not a key: the CDN returned an error page</body></html>\n")
        agent_keys = work / "agent-keys"
        agent_keys.mkdir()
        server = aptrepo.HttpServer(served)
        yield AptWorld(
            url=server.url, cuda_uri=f"{server.url}/cuda/", other_uri=f"{server.url}/other/",
            cuda_fpr=cuda_key.fingerprint, other_fpr=other_key.fingerprint,
            key_armored=cuda_key.export_armored(agent_keys / "cuda-repo.asc"),
            key_binary=cuda_key.export_binary(agent_keys / "cuda-repo.gpg"),
            other_keyring=other_key.export_binary(agent_keys / "other.gpg"), files=served)
    finally:
        if server is not None:
            server.close()
        cuda_key.close()
        other_key.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def node_layer(debian_base_root: Path, apt_world: AptWorld) -> Iterator[Path]:
    """Base + target venv (stand-in torch) + apt sources: only the healthy local repository."""
    work = Path(tempfile.mkdtemp(prefix="fleet-nodelayer-"))
    dest = work / "layer"
    wheel = wheels.build_wheel(work, "torch", TORCH_VERSION.split("+")[0], package="torch", requires=(),
                               local="cu126")
    with debian.layer([debian_base_root], dest) as n:
        n.file("/etc/apt/sources.list").write_text("# fleetctl tests: only local repositories\n")
        shutil.copy2(apt_world.other_keyring, n.file("/usr/share/keyrings/fleet-other.gpg"))
        n.file("/usr/share/keyrings/fleet-other.gpg").chmod(0o644)
        n.file("/etc/apt/sources.list.d/other.sources").write_text(
            f"Types: deb\nURIs: {apt_world.other_uri}\nSuites: /\n"
            "Signed-By: /usr/share/keyrings/fleet-other.gpg\n")
        n.chroot("python3", "-m", "venv", "/opt/venv")
        shutil.copy2(wheel, n.file(f"/tmp/{wheel.name}"))
        n.chroot(TARGET_PYTHON, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
                 f"/tmp/{wheel.name}")
        n.file(f"/tmp/{wheel.name}").unlink()
        n.chroot("apt-get", "update")  # lists for the healthy repository
    yield dest
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def node(debian_base_root: Path, node_layer: Path, tmp_path: Path) -> Iterator[NodeDriver]:
    nr = debian.NodeRoot([node_layer, debian_base_root], tmp_path / "node")
    nr.mount()
    try:
        yield NodeDriver(nr, tmp_path / "agent-state")
    finally:
        nr.unmount()


def write_failing_source(node: NodeDriver, world: AptWorld, fmt: str) -> Path:
    """The CUDA repository's source, present but its key missing (NO_PUBKEY on update)."""
    if fmt == "list":
        path = node.node.file("/etc/apt/sources.list.d/cuda.list")
        path.write_text(f"# CUDA\ndeb [arch=amd64] {world.cuda_uri} /\n")
    else:
        path = node.node.file("/etc/apt/sources.list.d/cuda.sources")
        path.write_text(f"Types: deb\nURIs: {world.cuda_uri}\nSuites: /\nArchitectures: amd64\n")
    return path


def tree_digest(root: Path, rel: str) -> dict[str, bytes]:
    base = root / rel.lstrip("/")
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out
