"""The issue-4 story end to end through the controller and a real agent process.

A real controller (the ``controller`` fixture: gRPC over mutual TLS, HTTP API, SQLite) and a real
``fleet-agent run --simulate h100 --executor ansible --root ROOT`` process: GPU and driver from the
profile (this machine has none), everything else real — the node is an overlay Debian root (cached
debootstrap base), its playbooks run through ansible-runner chrooted into it, its toolkit and target
Python are probed inside it. Keys and wheels go into the controller's artifact store with
``fleetctl artifact add``; jobs go through ``ctx.jobs.submit_job`` carrying only sha256 references;
the agent fetches the files over gRPC, runs the playbook, streams its events (stored in ``job_events``,
shown by ``fleetctl job ID --json``) and reports the result.

Faults through the same path: a wheel whose bytes don't match its sha256, a sha256 the store doesn't
have, a key artifact that is garbage, and the agent stopped (SIGTERM) or killed with its playbook
(SIGKILL of the whole service) in the middle of an install: when it is back, the controller fails the
install as interrupted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select

from fleetctl.agent.probes import collect_facts
from fleetctl.agent.probes.chroot import nvcc_probe_in_root
from fleetctl.controller.app import RunningController
from fleetctl.controller.artifacts import Provenance
from fleetctl.controller.jobs import JobEventRecord
from fleetctl.controller.store.models import JobEvent
from fleetctl.fleet.jobs import JobOutcome
from tests.integration.fleet_support import AgentProcess, wait_for
from tests.integration.harness import debian, wheels
from tests.integration.harness.fixtures import TARGET_PYTHON, TORCH_VERSION, AptWorld, skip_reason, tree_digest

pytestmark = [pytest.mark.root, pytest.mark.timeout(240),
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

BIN = Path(sys.executable).parent
HOST = "story-node"
PROFILE = "h100"
WHEEL_LOCAL = "cu12torch2.7cxx11abiFALSE"
KEEP_TASK = "Keep the wheel on the node (for installs and rollback)"
PIP_TASK = "pip install --no-deps --require-hashes (never touches torch)"

OPERATOR = Provenance.user("operator")  # files an operator put in the store (`fleetctl artifact add`)


# ---- the node, the agent process, the controller's CLI --------------------------------------------------------


@pytest.fixture
def node_root(debian_base_root: Path, node_layer: Path, apt_world: AptWorld,
              tmp_path: Path) -> Iterator[debian.NodeRoot]:
    """A fresh overlay root that starts broken: the CUDA repository's source is there, its key is not."""
    nr = debian.NodeRoot([node_layer, debian_base_root], tmp_path / "node", name="story")
    nr.mount()
    try:
        nr.file("/etc/apt/sources.list.d/cuda.list").write_text(f"# CUDA\ndeb [arch=amd64] {apt_world.cuda_uri} /\n")
        yield nr
    finally:
        nr.unmount()


class StoryAgent(AgentProcess):
    """The node's ``fleet-agent run``, chrooting its playbooks into ``root``; ``start`` returns once it is up."""

    def __init__(self, rc: RunningController, root: Path, state_dir: Path, logs: Path) -> None:
        super().__init__(rc, HOST, state_dir, logs, ["--simulate", PROFILE, "--executor", "ansible", "--root",
                                                      str(root), "--python", TARGET_PYTHON],
                         env={"FLEET_LOG_LEVEL": "INFO"})

    async def start(self) -> None:
        await super().start()
        # up when the controller holds its Jobs stream (facts were reported just before it opened)
        try:
            await wait_for(lambda: self.proc is not None and (self.proc.returncode is not None or (
                self.rc.ctx.jobs.connected(HOST) and self.rc.ctx.registry.status_of(HOST) == "online")),
                timeout=120)
        except AssertionError:
            raise AssertionError(f"agent not connected after 120 s: {self.log_tail()}") from None
        assert self.proc is not None
        assert self.proc.returncode is None, f"agent exited {self.proc.returncode}: {self.log_tail()}"

    async def gone(self) -> None:
        """The agent process has ended and the controller has dropped its Jobs stream."""
        assert self.proc is not None
        await asyncio.wait_for(self.proc.wait(), 30)
        await wait_for(lambda: not self.rc.ctx.jobs.connected(HOST), timeout=15)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM (systemctl stop): the agent cancels its jobs (killing their playbooks) and exits."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill_service()
                await self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM for {timeout}s: {self.log_tail()}") from None
        await self.gone()
        return self.proc.returncode or 0

    def kill_service(self) -> None:
        """SIGKILL the agent and everything it started (what a cgroup kill or a power cut does)."""
        assert self.proc is not None
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # no more forks while the tree is collected
        groups = {g for g in map(_pgid, descendants(pid)) if g is not None} - {os.getpgid(0)}
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill_service()
            await self.proc.wait()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Story:
    rc: RunningController
    root: debian.NodeRoot
    agent: StoryAgent
    world: AptWorld
    work: Path

    async def cli(self, *argv: str) -> Any:
        """Run ``fleetctl ARGV --json --state-dir STATE`` as a process; its parsed JSON."""
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "fleetctl"), *argv, "--json", "--state-dir", str(self.rc.ctx.settings.state_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"fleetctl {' '.join(argv)}: exit {proc.returncode}: {err.decode()}"
        return json.loads(out)

    async def add_artifact(self, path: Path, kind: str) -> str:
        info = await self.cli("artifact", "add", str(path), "--kind", kind)
        assert info["sha256"] == wheels.sha256_file(path)
        return str(info["sha256"])

    async def job(self, kind: str, vars: dict[str, Any], timeout: int = 180) -> tuple[JobOutcome, dict[str, Any]]:
        """Submit through the controller, wait, and read the job back with ``fleetctl job ID --json``."""
        job_id = await self.rc.ctx.jobs.submit_job(HOST, kind, vars, timeout=timeout)
        try:
            outcome = await self.rc.ctx.jobs.wait(job_id, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{kind} job {job_id} did not finish: {self.agent.log_tail()}") from None
        shown = await self.cli("job", job_id)
        assert shown["id"] == job_id and shown["status"] == outcome.status
        return outcome, shown

    def stored_events(self, job_id: str) -> list[str]:
        with self.rc.ctx.store.session() as s:
            return list(s.scalars(select(JobEvent.event).where(JobEvent.job_id == job_id).order_by(JobEvent.counter)))

    def facts(self) -> dict[str, Any]:
        return dict(self.rc.ctx.registry.record(HOST).facts_json)

    async def apt_errors(self) -> list[str]:
        """The agent's apt probe inside the node root."""
        facts = await asyncio.to_thread(collect_facts, None, check_apt=True, root=str(self.root.path), hostname=HOST)
        assert facts.apt is not None, facts.extra.get("probe_errors")
        return list(facts.apt.errors)

    def installed(self, dist: str = "flash-attn") -> str | None:
        p = self.root.chroot(TARGET_PYTHON, "-c", "import sys\nfrom importlib import metadata as m\n"
                             "try: print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError: print('')", dist)
        return p.stdout.strip() or None

    async def quiet_root(self, timeout: float = 15) -> None:
        """Nothing left running inside the node root (no orphaned playbook)."""
        await wait_for(lambda: not debian.processes_in_root(self.root.path), timeout=timeout, interval=0.2)


@pytest_asyncio.fixture
async def story(controller: RunningController, node_root: debian.NodeRoot, apt_world: AptWorld,
                tmp_path: Path) -> AsyncIterator[Story]:
    agent = StoryAgent(controller, node_root.path, tmp_path / "agent-state", tmp_path / "logs")
    try:
        yield Story(controller, node_root, agent, apt_world, tmp_path)
    finally:
        await agent.close()


async def wait_facts(story: Story, check: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """The controller asks for fresh facts after each job; wait until the agent's report satisfies ``check``."""
    try:
        await wait_for(lambda: check(story.facts()), timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"registry facts never showed {what}: {story.facts()}") from None
    return story.facts()


def task_events(shown: dict[str, Any], event: str) -> list[str]:
    return [e["data"].get("task") for e in shown["events"] if e["event"] == event]


# ---- the story ----------------------------------------------------------------------------------------------


async def test_broken_keyring_to_rollback_through_the_controller(story: Story, apt_world: AptWorld) -> None:
    root = str(story.root.path)
    # the node starts broken: the agent's own apt probe (the CLI, as an operator would run it) sees NO_PUBKEY
    proc = await asyncio.create_subprocess_exec(str(BIN / "fleet-agent"), "facts", "--json", "--apt", "--root", root,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    apt_before = json.loads(out)["apt"]["errors"]
    assert any("NO_PUBKEY" in line and apt_world.cuda_uri.rstrip("/") in line for line in apt_before), apt_before
    sources_before = story.root.file("/etc/apt/sources.list.d/other.sources").read_bytes()

    # the key and the wheel go into the controller's artifact store (fleetctl → HTTP API)
    key_sha = await story.add_artifact(apt_world.key_armored, "apt-key")
    wheel = wheels.build_wheel(story.work / "wheels", version="2.8.3", local=WHEEL_LOCAL)
    wheel_sha = await story.add_artifact(wheel, "wheel")
    listed = await story.cli("artifact", "list")
    assert {a["sha256"] for a in listed["artifacts"]} >= {key_sha, wheel_sha}

    await story.agent.start()
    facts = story.facts()
    assert facts["toolkit"] is None and facts["flash_attn"] is None, facts  # probed inside the root
    assert facts["python"]["executable"] == TARGET_PYTHON

    # 1. apt-keyring-fix with the key's sha256 only: the agent fetches it over gRPC, the playbook gets a path
    fix, shown = await story.job("apt-keyring-fix", {"repo_uri": apt_world.cuda_uri,
                                                     "keyring_name": "cuda-archive-keyring",
                                                     "key_sha256": key_sha, "key_fingerprint": apt_world.cuda_fpr})
    assert fix.ok, (fix.error, story.agent.log_tail())
    assert fix.result["apt_keyring_fix"]["fingerprints"] == [apt_world.cuda_fpr]
    assert fix.result["apt_keyring_fix"]["sources_rewritten"] == ["/etc/apt/sources.list.d/cuda.list"]
    fetched = [e["data"] for e in shown["events"] if e["event"] == "fleet_artifact_fetch"]
    assert fetched and fetched[0]["sha256"] == key_sha and fetched[0]["cached"] is False
    assert (story.agent.state_dir / "artifacts" / key_sha / apt_world.key_armored.name).is_file()
    names = [e["event"] for e in shown["events"]]
    assert names[0] == "fleet_job_started" and names[-1] == "fleet_job_finished"
    assert {"playbook_on_start", "playbook_on_task_start", "runner_on_ok", "playbook_on_stats"} <= set(names)
    assert story.stored_events(shown["id"]) == names  # every event the CLI shows is a row in job_events
    assert await story.apt_errors() == []
    assert story.root.file("/etc/apt/sources.list.d/other.sources").read_bytes() == sources_before
    assert "signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg" in \
        story.root.file("/etc/apt/sources.list.d/cuda.list").read_text()

    # 2. cuda-toolkit from the test's signed repository, capped by the driver the agent reported
    cuda_max = facts["driver"]["cuda_max"]
    tk, shown = await story.job("cuda-toolkit", {"cuda_version": "12.4", "driver_cuda_max": cuda_max})
    assert tk.ok, (tk.error, story.agent.log_tail())
    assert tk.result["cuda_toolkit"]["nvcc_release"] == "release 12.4, V12.4.131"
    assert "playbook_on_stats" in story.stored_events(shown["id"])
    probed = await asyncio.to_thread(nvcc_probe_in_root(root).probe)
    assert probed.active is not None
    assert (probed.active.nvcc, probed.active.path) == ("12.4", "/usr/local/cuda/bin/nvcc")
    facts = await wait_facts(story, lambda f: f["toolkit"], "the toolkit")
    assert facts["toolkit"] == {"nvcc": "12.4", "path": "/usr/local/cuda/bin/nvcc"}

    # 3. install-wheel from the artifact store, by sha256
    iw, shown = await story.job("install-wheel", {"wheel_sha256": wheel_sha, "python": TARGET_PYTHON})
    assert iw.ok, (iw.error, story.agent.log_tail())
    assert iw.result["install_wheel"]["sha256"] == wheel_sha
    assert iw.result["install_wheel"]["previous_version"] is None
    assert PIP_TASK in task_events(shown, "runner_on_ok")
    assert story.installed() == "2.8.3"
    assert story.installed("torch") == TORCH_VERSION.split("+")[0]
    facts = await wait_facts(story, lambda f: f["flash_attn"], "flash-attn")
    assert facts["flash_attn"]["version"] == "2.8.3"

    # 4. rollback: nothing was there before, so the wheel is removed again
    rb, shown = await story.job("rollback", {"python": TARGET_PYTHON})
    assert rb.ok, (rb.error, story.agent.log_tail())
    assert story.installed() is None
    await wait_facts(story, lambda f: f["flash_attn"] is None, "flash-attn gone")
    assert await story.apt_errors() == []
    assert (await story.agent.stop()) == 0


# ---- faults -------------------------------------------------------------------------------------------------


async def test_bad_artifacts_are_refused(story: Story, apt_world: AptWorld) -> None:
    await story.agent.start()
    arts = story.rc.ctx.artifacts

    # a wheel whose bytes don't match its sha256 (the store's file was changed behind its back)
    good = wheels.build_wheel(story.work / "w", version="2.8.3", local=WHEEL_LOCAL)
    sha = (await asyncio.to_thread(arts.put_file, good, "wheel", provenance=OPERATOR)).sha256
    other = wheels.build_wheel(story.work / "evil", version="2.8.3", local=WHEEL_LOCAL, extra="EVIL = True\n")
    arts.path_for(sha).write_bytes(other.read_bytes())
    venv_before = tree_digest(story.root.path, "/opt/venv")
    bad, shown = await story.job("install-wheel", {"wheel_sha256": sha, "python": TARGET_PYTHON})
    assert bad.status == "failed" and bad.error and "arrived corrupted" in bad.error and sha[:12] in bad.error, bad
    assert "playbook_on_start" not in [e["event"] for e in shown["events"]]  # refused before anything ran
    assert story.installed() is None and tree_digest(story.root.path, "/opt/venv") == venv_before
    assert not story.root.file("/var/lib/fleet-agent/wheels").exists()
    assert not list((story.agent.state_dir / "artifacts").glob(f"{sha}/*"))  # nothing kept on the agent either

    # a sha256 the store doesn't have
    missing, _ = await story.job("install-wheel", {"wheel_sha256": "ab" * 32, "python": TARGET_PYTHON})
    assert missing.status == "failed" and missing.error and "no artifact with sha256" in missing.error, missing

    # a key artifact that is garbage: the step fails saying why, the sources stay as they were
    garbage = await asyncio.to_thread(arts.put_bytes, b"<html><body>503 Service Unavailable</body></html>\n",
                                      "cuda-archive-keyring.asc", "apt-key", provenance=OPERATOR)
    apt_before = tree_digest(story.root.path, "/etc/apt")
    key, shown = await story.job("apt-keyring-fix", {"repo_uri": apt_world.cuda_uri,
                                                     "keyring_name": "cuda-archive-keyring",
                                                     "key_sha256": garbage.sha256})
    assert key.status == "failed" and key.error, key
    assert "not an OpenPGP public key" in key.error and "sources left unchanged" in key.error, key.error
    assert "runner_on_failed" in story.stored_events(shown["id"])
    assert tree_digest(story.root.path, "/etc/apt") == apt_before
    assert not story.root.file("/usr/share/keyrings/cuda-archive-keyring.gpg").exists()
    assert any("NO_PUBKEY" in line for line in await story.apt_errors())
    assert story.installed() is None


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_agent_stopped_mid_install_keeps_previous_and_rerun_converges(story: Story, how: str) -> None:
    old = wheels.build_wheel(story.work / "w", version="2.7.4", local=WHEEL_LOCAL)
    new = wheels.build_wheel(story.work / "w", version="2.8.3", local=WHEEL_LOCAL)
    arts = story.rc.ctx.artifacts
    old_sha = (await asyncio.to_thread(arts.put_file, old, "wheel", provenance=OPERATOR)).sha256
    new_sha = (await asyncio.to_thread(arts.put_file, new, "wheel", provenance=OPERATOR)).sha256
    await story.agent.start()
    first, _ = await story.job("install-wheel", {"wheel_sha256": old_sha, "python": TARGET_PYTHON})
    assert first.ok, first.error
    assert story.installed() == "2.7.4"

    # stop the agent once the new wheel sits on the node (the controller sees that task's event), before pip
    on_node = asyncio.Event()

    def listener(ev: JobEventRecord) -> None:
        if ev.event == "runner_on_ok" and ev.data.get("task") == KEEP_TASK:
            on_node.set()

    story.rc.ctx.jobs.add_event_listener(listener)
    job_id = await story.rc.ctx.jobs.submit_job(HOST, "install-wheel", {"wheel_sha256": new_sha,
                                                                        "python": TARGET_PYTHON}, timeout=180)
    await asyncio.wait_for(on_node.wait(), 120)
    started = time.monotonic()
    if how == "sigterm":
        assert await story.agent.stop() == 0
    else:
        story.agent.kill_service()
        await story.agent.gone()
    await story.quiet_root()  # the playbook died with the agent: nothing orphaned inside the node
    assert time.monotonic() - started < 30

    # the node is in its previous working state
    on_disk = story.agent.state_dir / "jobs" / job_id / "artifacts"
    tasks_started = [json.loads(p.read_text()).get("event_data", {}).get("task")
                     for p in on_disk.glob("*/job_events/*.json")]
    assert KEEP_TASK in tasks_started and PIP_TASK not in tasks_started, "the stop came too late to test anything"
    assert story.installed() == "2.7.4"
    story.root.chroot(TARGET_PYTHON, "-c", "import flash_attn; assert flash_attn.__version__ == '2.7.4'")
    stopped = story.rc.ctx.jobs.get(job_id, events=False)
    if how == "sigterm":  # a stopping agent kills its running jobs and reports them canceled before it leaves
        assert stopped["status"] == "canceled" and "the agent was stopped" in stopped["error"], stopped
        await story.agent.start()
    else:
        assert stopped["status"] == "running"  # no result ever came
        # the agent comes back (same identity, no token): its new process does not hold the job, so the
        # controller fails it as interrupted at once (not at its deadline), and `fleetctl job ID` says so
        back = time.monotonic()
        await story.agent.start()
        lost = await story.rc.ctx.jobs.wait(job_id, timeout=15)
        assert time.monotonic() - back < 60
        assert lost.status == "failed" and lost.error and lost.error.startswith(
            f"interrupted: the agent on {HOST}"), lost
        shown = await story.cli("job", job_id)
        assert shown["status"] == "failed" and shown["events"][-1]["event"] == "fleet_job_interrupted"
    assert story.installed() == "2.7.4"  # nothing ran again on its own

    # the step is run again: it converges
    again, _ = await story.job("install-wheel", {"wheel_sha256": new_sha, "python": TARGET_PYTHON})
    assert again.ok, (again.error, story.agent.log_tail())
    assert story.installed() == "2.8.3"
    assert again.result["install_wheel"]["previous_version"] == "2.7.4"
    prev = json.loads(story.root.file("/var/lib/fleet-agent/flash-attn-previous.json").read_text())
    assert prev["sha256"] == old_sha  # the interrupted run did not overwrite the rollback record
