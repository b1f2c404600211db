"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's packages (slurmctld,
slurmd, slurm-client, munge; ./scripts/bootstrap installs them), started in the foreground (``-D``, no systemd)
as this process's children, with a generated ``slurm.conf`` whose every path is in a private directory and whose
ports are free ones. No cgroups: ``proctrack/linuxproc``, ``task/none``. Runs as root (slurmd must).

::

    with slurm_cluster("gpu-slurm-1") as cluster:
        job = cluster.sbatch_sleep(5)
        cluster.state()            # "MIXED", then "MIXED+DRAIN" once drained, …
        cluster.env                # SLURM_CONF for any scontrol/sbatch the test or the agent runs

The directory is short-named under /tmp: munge's and slurmd's unix sockets must fit 108 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "scancel")

SLURM_CONF = """\
# written by tests/integration/harness/slurm.py: one node, every path under {root}
ClusterName=fleettest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/sock/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=5
NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_commands() -> list[str]:
    path = f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"
    return [c for c in DAEMONS if shutil.which(c, path=path) is None]


def parse_show(out: str) -> tuple[str, str]:
    """``State=`` and ``Reason=`` of ``scontrol show node -o``'s line ("" for what it lacks)."""
    head, _, reason = out.partition(" Reason=")
    state = next((f.removeprefix("State=") for f in head.split() if f.startswith("State=")), "")
    return state, reason.strip()


class SlurmCluster:
    def __init__(self, node: str, root: Path) -> None:
        self.node = node
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"/usr/sbin:/sbin:{os.environ['PATH']}"}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---- life ----

    def start(self, timeout: float = 45.0) -> None:
        self.root.chmod(0o755)  # munged: every user must reach its socket, through every directory above it
        for sub in ("sock", "munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        (self.root / "sock").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF.format(root=self.root, node=self.node, ctld_port=free_port(),
                                               slurmd_port=free_port()))
        m = self.root / "munge"
        self._spawn("munged", "munged", "-F", f"--socket={self.root}/sock/munge.socket", f"--key-file={key}",
                    f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed")
        self._until(lambda: (self.root / "sock" / "munge.socket").exists(), timeout, "munged made its socket")
        self._spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._until(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld answers scontrol ping")
        self._spawn("slurmd", "slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._until(lambda: self.state() == "IDLE", timeout, f"slurmd registered {self.node} as IDLE")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (SIGTERM, SIGKILL after 10 s), each with its process group."""
        if "slurmctld" in self._procs:
            with contextlib.suppress(subprocess.SubprocessError, OSError, AssertionError):
                self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def _spawn(self, name: str, *argv: str) -> None:
        with (self.root / f"{name}.out").open("ab") as out:
            self._procs[name] = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)

    def _until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) before {what}:\n{self.log(name)}")
            if check():
                return
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout:g} s: {what}\n" + "\n".join(self.log(n) for n in self._procs))

    def log(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.root / f"{name}.out").read_text(errors="replace")
        except OSError:
            return f"({name}: no output)"
        return f"--- {name}:\n" + "\n".join(text.splitlines()[-lines:])

    # ---- asking Slurm ----

    def _run(self, *argv: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=timeout, check=False)

    def scontrol(self, *args: str) -> str:
        proc = self._run("scontrol", *args)
        assert proc.returncode == 0, f"scontrol {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def state_and_reason(self) -> tuple[str, str]:
        """The node's ``State=`` as scontrol shows it (``IDLE``, ``MIXED+DRAIN``, ``IDLE+DRAIN`` …; "" if unknown)
        and its ``Reason=`` (with Slurm's ``[user@time]`` stamp), read at once."""
        return parse_show(self._run("scontrol", "show", "node", "-o", self.node).stdout)

    def state(self) -> str:
        return self.state_and_reason()[0]

    def reason(self) -> str:
        return self.state_and_reason()[1]

    def jobs(self) -> list[str]:
        """Ids of the jobs Slurm holds (pending or running)."""
        return self._run("squeue", "-h", "-o", "%i").stdout.split()

    def sbatch_sleep(self, seconds: float) -> str:
        """Submit ``sleep SECONDS`` and wait until it runs on the node; its job id."""
        proc = self._run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", f"sleep {seconds:g}")
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]
        self._until(lambda: self._run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() == "RUNNING", 20,
                    f"job {job} runs")
        return job

    def wait_state(self, state: str, timeout: float = 30.0) -> None:
        """Until the node's state is ``state`` (a resumed node is ``IDLE+NOT_RESPONDING`` until its next ping)."""
        self._until(lambda: self.state() == state, timeout, f"{self.node} is {state} (it is {self.state()})")

    def cancel_all(self) -> None:
        self._run("scancel", "--partition=main")
        self._until(lambda: not self.jobs(), 20, "every job cancelled")

    def drain(self, reason: str) -> None:
        self.scontrol("update", f"nodename={self.node}", "state=drain", f"reason={reason}")

    def resume(self) -> None:
        self.scontrol("update", f"nodename={self.node}", "state=resume")


@contextlib.contextmanager
def slurm_cluster(node: str) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:  # slurmd starts jobs as their users: it runs as root
        pytest.skip("a Slurm test cluster needs root (slurmd)")
    missing = missing_commands()
    if missing:
        raise AssertionError(f"Slurm test cluster: {', '.join(missing)} not installed; run ./scripts/bootstrap as root "
                             "(it installs slurmctld slurmd slurm-client munge)")
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    cluster = SlurmCluster(node, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
