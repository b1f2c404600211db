"""``fleetctl bundle export|import|show`` end to end: real HTTP (FakeUpstream), real pip, a real controller.

Export runs from facts files of two real-executor nodes — an A100 with Python/torch edited so the stand-in
FA2 release wheel fits it (fa2-wheel, ``cp311`` = this interpreter's tag) and the H100 with a CUDA 13 torch
(``--fa4`` → ``flash-attn-4[cu13]``, resolved for its cp312) — and is imported into a controller started
``--offline``: its dry run then finds every artifact in the store, and its provisioner builds both nodes'
install sets from the store alone. fleetctl runs in-process (``controller.cli.main``; in a thread where a
controller serves from the test's event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.cli import main
from fleetctl.controller.provisioning import NodeNeeds
from fleetctl.controller.upstream import UpstreamConfig
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.facts import parse_node
from tests.integration.fleet_support import SimAgents, controller_settings
from tests.integration.harness.upstream import (
    FakeUpstream,
    fa2_universe,
    fa4_closure,
    fa4_universe,
    local_python_tag,
    pip_wheel,
)
from tests.integration.harness.wheels import sha256_file

pytestmark = pytest.mark.timeout(120)

#: UpstreamError's exit code (the class is moving from controller.upstream to fleet.errors)
UPSTREAM_EXIT = next(c.exit_code for c in FleetError.__subclasses__() if c.code == "upstream")
PROFILES = Path(__file__).resolve().parents[3] / "fleetctl" / "agent" / "profiles"
TAG = local_python_tag()
FA2_WHEEL = f"flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-{TAG}-{TAG}-linux_x86_64.whl"
EINOPS = "einops-0.8.1-py3-none-any.whl"
#: stand-ins of fleet-agent's runtime dependencies, at the lowest versions pyproject.toml allows
AGENT_DEPS = {"grpcio": "1.85.3", "protobuf": "7.35.1", "cryptography": "42.0.0", "nvidia-ml-py": "12.0.0",
              "ansible-core": "2.17.0", "ansible-runner": "2.4.0", "packaging": "23.0", "PyYAML": "6.0"}


def fa2_facts() -> dict[str, Any]:
    """The a100 simulation profile with this interpreter's Python and a torch the stand-in release fits."""
    f: dict[str, Any] = json.loads((PROFILES / "a100.json").read_text())
    f.update(hostname="gpu-a100", executor="ansible")
    f["python"]["version"] = f"{TAG[2]}.{TAG[3:]}.7"
    f["torch"] = {"version": "2.8.0+cu128", "cuda": "12.8", "cxx11abi": True, "arch_list": ["sm_80", "sm_90"]}
    f["driver"] = {"version": "570.86.10", "cuda_max": "12.8"}
    return f


def fa4_facts() -> dict[str, Any]:
    """The lent H100 (torch 2.11.0+cu130, Python 3.12): flash-attn-4[cu13] under --fa4."""
    f: dict[str, Any] = json.loads((PROFILES / "h100-cu130.json").read_text())
    f.update(hostname="gpu-h100", executor="ansible")
    return f


def fleetctl(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


async def afleetctl(*args: str | Path) -> tuple[int, str, str]:
    """fleetctl in a thread: the controller under test serves from this event loop."""
    return await asyncio.to_thread(fleetctl, *args)


@dataclass
class Site:
    up: FakeUpstream
    facts: Path
    bundle: Path
    lock: dict[str, Any]
    export_args: list[str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The fake upstream with FA2 (torch 2.8 wheels, as the built-in catalog names them) and FA4, and one
    bundle exported from it for both nodes (without agent wheels: see test_agent_wheels)."""
    tmp = tmp_path_factory.mktemp("bundle")
    facts = tmp / "facts.json"
    facts.write_text(json.dumps({"nodes": [fa2_facts(), fa4_facts()]}))
    with FakeUpstream() as up:
        up.publish(fa2_universe(tmp / "fa2", torch="2.8"))
        up.publish(fa4_universe(tmp / "fa4"))
        args = ["--version", "2.8.3", "--fa4", "--upstream-index", up.index_url, "--wheel-mirror", up.releases_url]
        bundle = tmp / "site.tar"
        rc, out, err = fleetctl("bundle", "export", "-o", bundle, "--facts", facts, *args, "--no-agent-wheels",
                                "--json")
        assert rc == 0, err
        yield Site(up, facts, bundle, json.loads(out), args)


@pytest_asyncio.fixture
async def offline(tmp_path: Path) -> AsyncIterator[tuple[RunningController, SimAgents]]:
    """An air-gapped controller (``--offline``) with both nodes registered as real-executor nodes."""
    rc = await start_controller(controller_settings(tmp_path / "controller", upstream=UpstreamConfig(offline=True)))
    agents = SimAgents(rc, tmp_path / "agents")
    try:
        for raw in (fa2_facts(), fa4_facts()):
            node = parse_node(raw)
            await agents.start(node.hostname, facts=lambda node=node: node)  # type: ignore[misc]
        yield rc, agents
    finally:
        await agents.stop_all()
        await rc.stop(grace=0.2)


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def test_export_writes_every_artifact_with_its_lock(site: Site) -> None:
    lock = site.lock
    fa4_files = fa4_closure(python_tag="cp312")
    pip = pip_wheel().name
    assert lock["format"] == 1 and lock["created"]
    assert {f["filename"] for f in lock["files"]} == {FA2_WHEEL, EINOPS, pip, *fa4_files}
    assert sorted(members(site.bundle)) == sorted(["lock.json", *(f"files/{f['filename']}" for f in lock["files"])])
    with tarfile.open(site.bundle) as tf:
        handle = tf.extractfile("lock.json")
        assert handle is not None and json.load(handle) == lock
    by_name = {f["filename"]: f for f in lock["files"]}
    # digests are the upstream files' own; the release wheel came from the mirror, its deps from the index
    release = by_name[FA2_WHEEL]
    assert release["sha256"] == sha256_file(site.up.root / "releases" / "download" / "v2.8.3" / FA2_WHEEL)
    assert release["source"].startswith(site.up.releases_url) and release["kind"] == "wheel"
    assert by_name[EINOPS]["source"] == f"index {site.up.index_url}"
    assert by_name[pip]["source"].startswith("ensurepip")
    nodes = {n["hostname"]: n for n in lock["nodes"]}
    assert nodes["gpu-a100"]["variant"] == "fa2-wheel" and nodes["gpu-a100"]["version"] == "2.8.3"
    assert set(nodes["gpu-a100"]["needs"]) == {FA2_WHEEL, EINOPS, pip}
    assert nodes["gpu-h100"]["variant"] == "fa4" and nodes["gpu-h100"]["version"] == "4.0.0b36"
    assert set(nodes["gpu-h100"]["needs"]) == {*fa4_files, pip}
    assert nodes["gpu-h100"]["target_env"]["python"] == "3.12"

    rc, out, _ = fleetctl("bundle", "show", site.bundle, "--verify")
    assert rc == 0 and FA2_WHEEL in out and "gpu-h100" in out and "every file checked" in out


async def test_import_fills_an_offline_controller(site: Site, offline: tuple[RunningController, SimAgents]) -> None:
    rc, _ = offline
    state = ["--state-dir", str(rc.ctx.settings.state_dir)]
    dry = ["rollout", "flash-attn", "--dry-run", "--json", "--version", "2.8.3", "--fa4", *state]

    code, out, err = await afleetctl(*dry)
    assert code == 0, err
    before = {n["hostname"]: n for n in json.loads(out)["nodes"]}
    assert "artifacts cannot be had" in (before["gpu-a100"]["skip"] or "")

    # --nodes: the controller's own dry run picks the nodes (a skipped-for-missing-artifacts node included)
    via_nodes = rc.ctx.settings.state_dir.parent / "via-nodes.tar"
    code, out, err = await afleetctl("bundle", "export", "-o", via_nodes, "--nodes", "gpu-*", *site.export_args,
                                     "--no-agent-wheels", "--json", *state)
    assert code == 0, err
    assert json.loads(out)["files"] == site.lock["files"]

    code, out, err = await afleetctl("bundle", "import", site.bundle, *state)
    assert code == 0, err
    assert f"{len(site.lock['files'])} file(s) uploaded, 0 already in the store" in out
    stored = {a.filename: a.sha256 for a in rc.ctx.artifacts.list_all()}
    assert stored == {f["filename"]: f["sha256"] for f in site.lock["files"]}

    code, out, err = await afleetctl(*dry)
    assert code == 0, err
    after = {n["hostname"]: n for n in json.loads(out)["nodes"]}
    for host in ("gpu-a100", "gpu-h100"):
        node = after[host]
        assert node["skip"] is None, node["skip"]
        assert node["preflight"] and all(i["availability"] != "missing" for i in node["preflight"]), node["preflight"]
    assert after["gpu-a100"]["artifact"] == FA2_WHEEL and after["gpu-a100"]["preflight"][0]["availability"] == \
        "in-store"
    assert after["gpu-h100"]["variant"] == "fa4"

    # and the steps can have their inputs: the offline provisioner resolves each closure from the store alone
    lock_needs = {n["hostname"]: set(n["needs"]) for n in site.lock["nodes"]}
    for host in ("gpu-a100", "gpu-h100"):
        got = await asyncio.to_thread(rc.ctx.provisioner.install_set, NodeNeeds.from_plan(after[host]))
        assert {got.wheel.filename, *(d.filename for d in got.deps)} == lock_needs[host]

    code, out, err = await afleetctl("bundle", "import", site.bundle, *state)
    assert code == 0 and "0 file(s) uploaded" in out and "already in the store, skipped" in err


async def test_tampered_bundle_uploads_nothing(site: Site, offline: tuple[RunningController, SimAgents],
                                               tmp_path: Path) -> None:
    rc, _ = offline
    tampered = tmp_path / "tampered.tar"
    data = bytearray(site.bundle.read_bytes())
    with tarfile.open(site.bundle) as tf:
        member = tf.getmember(f"files/{EINOPS}")
    data[member.offset_data + member.size // 2] ^= 0x01  # one byte of one file, size unchanged
    tampered.write_bytes(bytes(data))

    code, _, err = await afleetctl("bundle", "import", tampered, "--state-dir", str(rc.ctx.settings.state_dir))
    assert code == 3
    assert f"files/{EINOPS}" in err and "lock.json says" in err and "nothing was uploaded" in err
    assert rc.ctx.artifacts.list_all() == []


def test_unsafe_members_are_refused(site: Site, tmp_path: Path) -> None:
    """No member outside lock.json / files/<name>: path escapes and links are refused before extraction."""
    with tarfile.open(site.bundle) as tf:
        lock = tf.extractfile("lock.json")
        assert lock is not None
        lock_bytes = lock.read()
    for name, kind in (("../escape.txt", tarfile.REGTYPE), ("files/../../escape.txt", tarfile.REGTYPE),
                       (f"files/{EINOPS}", tarfile.SYMTYPE), ("/tmp/escape.txt", tarfile.REGTYPE)):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tf:
            info = tarfile.TarInfo("lock.json")
            info.size = len(lock_bytes)
            tf.addfile(info, io.BytesIO(lock_bytes))
            evil = tarfile.TarInfo(name)
            evil.type = kind
            if kind == tarfile.SYMTYPE:
                evil.linkname = "/etc/passwd"
                tf.addfile(evil)
            else:
                evil.size = 3
                tf.addfile(evil, io.BytesIO(b"bad"))
        code, _, err = fleetctl("bundle", "import", bad, "--controller", "http://127.0.0.1:9")
        assert code == 3, (name, err)
        assert "unexpected member" in err and "nothing was extracted or uploaded" in err
        assert not (tmp_path.parent / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def test_unreachable_upstream_writes_no_bundle(site: Site, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "out" / "bundle.tar"
    out.parent.mkdir()
    code, _, err = fleetctl("bundle", "export", "-o", out, "--facts", site.facts, "--version", "2.8.3", "--fa4",
                            "--upstream-index", f"{dead}/simple", "--wheel-mirror", f"{dead}/releases/download",
                            "--no-agent-wheels")
    assert code == UPSTREAM_EXIT, err
    assert "error[upstream]: cannot fetch" in err and "Connection refused" in err and "hint:" in err
    assert list(out.parent.iterdir()) == []  # neither the bundle nor a partial one


def test_upstream_fault_mid_export_writes_no_bundle(site: Site, tmp_path: Path) -> None:
    """The release wheel arrives, then one file of the FA4 closure is missing upstream: no bundle at all."""
    site.up.fail("quack_kernels-0.5.3-py3-none-any.whl", "404")
    try:
        code, _, err = fleetctl("bundle", "export", "-o", tmp_path / "b.tar", "--facts", site.facts,
                                *site.export_args, "--no-agent-wheels")
    finally:
        site.up.clear_faults()
    assert code == UPSTREAM_EXIT, err
    assert "cannot resolve flash-attn-4[cu13]==4.0.0b36" in err
    assert list(tmp_path.iterdir()) == []


def test_agent_wheels(site: Site, tmp_path: Path) -> None:
    """fleetctl's own wheel built from this checkout, plus the agent's runtime dependencies for the node's
    Python and platform (stand-ins at the lowest versions pyproject.toml allows)."""
    from tests.integration.harness.upstream import _write_wheel

    for dist, version in AGENT_DEPS.items():
        module = {f"{dist.replace('-', '_')}_standin.py": ""}
        site.up.add_to_index(_write_wheel(tmp_path / "agent-deps", dist, version, module))
    facts = tmp_path / "a100.json"
    facts.write_text(json.dumps({"nodes": [fa2_facts()]}))
    code, out, err = fleetctl("bundle", "export", "-o", tmp_path / "b.tar", "--facts", facts, *site.export_args,
                              "--json")
    assert code == 0, err
    lock = json.loads(out)
    (node,) = lock["nodes"]
    agent = set(node["agent"])
    assert "fleetctl-0.1.0-py3-none-any.whl" in agent
    assert {n.split("-")[0].lower() for n in agent} == {"fleetctl", "grpcio", "protobuf", "cryptography",
                                                         "nvidia_ml_py", "ansible_core", "ansible_runner",
                                                         "packaging", "pyyaml"}
    sources = {f["filename"]: f["source"] for f in lock["files"]}
    assert sources["fleetctl-0.1.0-py3-none-any.whl"].startswith("built from ")


def test_source_build_nodes_carry_the_built_wheels_requirements(tmp_path: Path) -> None:
    """A node that builds from the sdist installs the built wheel later, offline: what that wheel will require
    (the sdist's PKG-INFO Requires-Dist, markers evaluated for the node, torch dropped) goes in the bundle."""
    from fleetctl.controller.bundle import sdist_requirements
    from fleetctl.controller.upstream import TargetEnv

    pkg_info = (b"Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\nRequires-Dist: torch\n"
                b"Requires-Dist: einops\nRequires-Dist: ninja; platform_machine == 'aarch64'\n"
                b"Requires-Dist: pytest; extra == 'test'\n")
    sdist = tmp_path / "flash_attn-2.8.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("flash_attn-2.8.3/PKG-INFO")
        info.size = len(pkg_info)
        tf.addfile(info, io.BytesIO(pkg_info))
    assert sdist_requirements(sdist, TargetEnv("3.11", "x86_64", "2.35", "2.8.0+cu128")) == ("einops",)
    assert sdist_requirements(sdist, TargetEnv("3.11", "aarch64", "2.35", None)) == ("einops", "ninja")


def test_agent_requirements_keep_pyprojects_ranges() -> None:
    from fleetctl.controller.bundle import agent_requirements

    reqs = agent_requirements()
    assert "grpcio<2,>=1.85.3" in reqs and "protobuf<8,>=7.35.1" in reqs and "PyYAML>=6" in reqs
    assert len(reqs) == len(AGENT_DEPS)
