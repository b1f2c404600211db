"""A simulated fleet on this machine: one controller process and N agent processes.

Each simulated node is a real ``fleet-agent run --simulate PROFILE`` process with its own
state dir (``STATE/sim/<host>/``) and its own network address:

- ``netns`` (default when running as root and ``ip netns`` works): every node gets a
  network namespace with a veth pair into a bridge ``flbr<tag>``; the bridge holds
  ``10.<X>.0.1/16`` (X picked from 200–250, unused on this machine) and node *i* gets
  ``10.<X>.<i/250>.<i%250+2>``. The controller listens on all addresses and its server
  certificate names ``10.<X>.0.1``. The controller sees each node's own source address.
- ``loopback`` (fallback, e.g. not root or no netns support): node *i* dials the controller
  at ``127.0.<i/250>.<i%250+2>``; its traffic stays on ``lo`` and the kernel may still use
  127.0.0.1 as source, so the distinct address is the one the node *uses*, not a
  separate interface. Isolation is then by identity and state dir only.

``SimFleet.up()`` returns once every node has registered; processes keep running
(own session) until ``SimFleet.down()`` (``fleet-controller fleet down``). ``STATE/fleet.json``
records pids, addresses and namespaces so ``down`` can clean up from another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.controller.node_status import NodeStatus
from fleetctl.fleet.errors import (
    ControllerUnavailable,
    ExecutionError,
    FleetError,
    InputError,
    NotFoundError,
    UsageError,
)
from fleetctl.fleet.statedir import FILE_MODE, private_dir, tighten

DEFAULT_PROFILES = ("h100", "a100", "l40s", "rtx4090", "t4", "v100", "gh200", "apt-nopubkey", "no-toolkit",
                    "cpu-only-torch", "rtx5090", "b200", "l4", "a10", "h200", "toolkit-newer-than-driver")
ROOT = Path(__file__).resolve().parents[2]  # the directory holding the fleetctl package


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)
    except subprocess.CalledProcessError as exc:
        raise ExecutionError(f"`ip {' '.join(args)}` failed: {exc.stderr.strip()}",
                             hint="network namespaces need root; use --network loopback") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExecutionError(f"cannot run `ip`: {exc}", hint="install iproute2 or use --network loopback") from exc


def netns_available() -> bool:
    """True when we can create network namespaces and veth pairs (root, iproute2, kernel support)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"fltest{os.getpid() % 100000}"
    try:
        if _ip("netns", "add", name, check=False).returncode != 0:
            return False
        ok = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", "eth0", "netns", name,
                 check=False).returncode == 0
        _ip("link", "del", f"{name}a", check=False)
        return ok
    finally:
        _ip("netns", "del", name, check=False)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class SimNode:
    hostname: str
    profile: str
    address: str
    state_dir: str
    log: str
    netns: str | None = None
    pid: int | None = None


@dataclass
class FleetState:
    mode: str  # netns | loopback
    controller_pid: int | None = None
    controller_address: str = ""  # what agents dial (HOST:PORT of the agent port)
    enroll_address: str = ""
    http: str = ""
    bridge: str | None = None
    subnet: str | None = None
    nodes: list[SimNode] = field(default_factory=list)


def _used_second_octets() -> set[int]:
    out = _ip("-4", "-o", "addr", check=False).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].startswith("10."):
            used.add(int(parts[3].split(".")[1]))
    return used


class SimFleet:
    def __init__(self, state_dir: Path, *, nodes: int = 8, profiles: list[str] | None = None,
                 db_url: str | None = None, network: str = "auto", heartbeat_interval: float = 10.0,
                 missed_heartbeats: int = 3, executor: str = "none", python: str = sys.executable) -> None:
        if nodes < 0 or nodes > 2000:
            raise UsageError(f"--nodes {nodes} out of range", hint="use 1..2000")
        self.state_dir = state_dir.resolve()
        self.n = nodes
        self.profiles = profiles or list(DEFAULT_PROFILES)
        self.db_url = db_url
        self.network = network
        self.heartbeat_interval = heartbeat_interval
        self.missed = missed_heartbeats
        self.executor = executor
        self.python = python
        self.state: FleetState | None = None

    def check_profiles(self) -> None:
        """Fail before anything starts on a profile the agents would refuse. The agent is asked (``fleet-agent
        facts --simulate NAME`` in ``self.python``, the interpreter the agents run in), never imported: the
        controller does not import the agent, and the profiles are the agent's package data (agent/profiles/)."""
        procs = {name: subprocess.Popen([self.python, "-m", "fleetctl.agent.main", "facts", "--simulate", name],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name in sorted(set(self.profiles))}
        for name, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode == 0:
                continue
            lines = err.strip().splitlines()
            message = next((line.partition(": ")[2] for line in lines if line.startswith("error[")),
                           f"the agent could not load simulation profile {name!r} (exit {proc.returncode})")
            hint = next((line.removeprefix("hint: ") for line in lines if line.startswith("hint: ")),
                        f"see `{self.python} -m fleetctl.agent.main facts --simulate {name}`")
            raise (NotFoundError if proc.returncode == NotFoundError.exit_code else InputError)(message, hint=hint)

    @property
    def fleet_file(self) -> Path:
        return self.state_dir / "fleet.json"

    def _save(self) -> None:
        assert self.state is not None
        self.fleet_file.write_text(json.dumps(asdict(self.state), indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> SimFleet:
        fleet = cls(state_dir)
        try:
            data = json.loads(fleet.fleet_file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"no simulated fleet in {state_dir} ({fleet.fleet_file} unreadable)",
                             hint="start one with `fleet-controller fleet up --state-dir DIR`") from exc
        nodes = [SimNode(**n) for n in data.pop("nodes")]
        fleet.state = FleetState(**data, nodes=nodes)
        return fleet

    # ---- network -----------------------------------------------------------------------

    def _setup_network(self, mode: str) -> tuple[str, list[str]]:
        """(controller address agents dial, per-node addresses)."""
        assert self.state is not None
        if mode == "loopback":
            return "127.0.0.1", [f"127.0.{(i // 250)}.{i % 250 + 2}" for i in range(self.n)]
        used = _used_second_octets()
        choices = [x for x in range(200, 251) if x not in used]
        if not choices:
            raise ExecutionError("no free 10.x.0.0/16 subnet for the simulated fleet", hint="use --network loopback")
        octet = random.choice(choices)
        tag = f"{random.randrange(16**4):04x}"
        bridge = f"flbr{tag}"
        self.state.bridge = bridge
        self.state.subnet = f"10.{octet}.0.0/16"
        self._save()
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.{octet}.0.1/16", "dev", bridge)
        _ip("link", "set", bridge, "up")
        addrs = []
        for i in range(self.n):
            ns = f"fleet-{tag}-{i}"
            host_if = f"fl{tag}h{i}"
            addr = f"10.{octet}.{i // 250}.{i % 250 + 2}"
            _ip("netns", "add", ns)
            self.state.nodes[i].netns = ns
            self._save()
            _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_if, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            addrs.append(addr)
        return f"10.{octet}.0.1", addrs

    def _teardown_network(self) -> None:
        assert self.state is not None
        for node in self.state.nodes:
            if node.netns:
                _ip("netns", "del", node.netns, check=False)
        if self.state.bridge:
            _ip("link", "del", self.state.bridge, check=False)

    # ---- processes ---------------------------------------------------------------------

    def _popen(self, cmd: list[str], log_path: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        private_dir(log_path.parent)
        # logs name nodes, users and paths: 0600 like the rest of the state dir (fleet/statedir.py)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        tighten(log_path, FILE_MODE)
        with os.fdopen(fd, "ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env=env, start_new_session=True)

    def up(self, timeout: float = 60.0) -> FleetState:
        """Start the controller and the agents; return once all nodes are registered."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.fleet_file.exists():
            raise UsageError(f"a simulated fleet is already up in {self.state_dir}",
                             hint=f"stop it first: fleet-controller fleet down --state-dir {self.state_dir}")
        mode = self.network
        if mode == "auto":
            mode = "netns" if netns_available() else "loopback"
        names = [f"sim-{self.profiles[i % len(self.profiles)]}-{i + 1:02d}" for i in range(self.n)]
        self.state = FleetState(mode=mode, nodes=[
            SimNode(hostname=h, profile=self.profiles[i % len(self.profiles)], address="",
                    state_dir=str(self.state_dir / "sim" / h), log=str(self.state_dir / "logs" / f"{h}.log"))
            for i, h in enumerate(names)])
        self._save()
        try:
            return self._up(mode, timeout)
        except BaseException:
            self.down()
            raise

    def _up(self, mode: str, timeout: float) -> FleetState:
        assert self.state is not None
        controller_host, addrs = self._setup_network(mode)
        grpc_port, http_port = free_port(), free_port()
        enroll_port = free_port()
        cmd = [self.python, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state_dir),
               "--grpc-listen", f"0.0.0.0:{grpc_port}", "--enroll-listen", f"0.0.0.0:{enroll_port}",
               "--http-listen", f"127.0.0.1:{http_port}", "--heartbeat-interval", str(self.heartbeat_interval),
               "--missed-heartbeats", str(self.missed), "--san", controller_host]
        if self.db_url:
            cmd += ["--db", self.db_url]
        (self.state_dir / "controller.json").unlink(missing_ok=True)
        proc = self._popen(cmd, self.state_dir / "logs" / "controller.log")
        self.state.controller_pid = proc.pid
        self.state.controller_address = f"{controller_host}:{grpc_port}"
        self.state.enroll_address = f"{controller_host}:{enroll_port}"
        self.state.http = f"https://127.0.0.1:{http_port}"  # the controller's CA: STATE/ca/ca.pem
        self._save()
        # local: httpx (~0.1 s) only once a controller is started, not at every `fleet-controller` start-up
        from fleetctl.controller.client import ControllerClient

        deadline = time.monotonic() + timeout
        while not (self.state_dir / "controller.json").exists():
            if proc.poll() is not None:
                raise ExecutionError(f"the controller exited with {proc.returncode}",
                                     hint=f"see {self.state_dir / 'logs' / 'controller.log'}")
            if time.monotonic() > deadline:
                raise ControllerUnavailable("the controller did not start in time",
                                            hint=f"see {self.state_dir / 'logs' / 'controller.log'}")
            time.sleep(0.1)
        client = ControllerClient.discover(state_dir=self.state_dir)
        for node, addr in zip(self.state.nodes, addrs, strict=True):
            node.address = addr
            token = client.post("/tokens", {"ttl_seconds": 600, "hostname": node.hostname})["token"]
            dial = self.state.controller_address if mode == "netns" else f"{addr}:{grpc_port}"
            enroll_dial = self.state.enroll_address if mode == "netns" else f"{addr}:{enroll_port}"
            agent_cmd = [self.python, "-m", "fleetctl.agent.main", "run", "--controller", dial, "--enroll-address",
                         enroll_dial, "--ca", str(self.state_dir / "ca" / "ca.pem"), "--state-dir", node.state_dir,
                         "--simulate", node.profile, "--hostname", node.hostname, "--executor", self.executor,
                         "--server-name", "127.0.0.1" if mode == "loopback" else controller_host]
            env_token = {"FLEET_AGENT_TOKEN": token}
            os.environ.update(env_token)  # passed via the environment, never on a command line
            try:
                agent = self._popen(agent_cmd, Path(node.log), node.netns)
            finally:
                os.environ.pop("FLEET_AGENT_TOKEN", None)
            node.pid = agent.pid
            self._save()
        while True:
            registered = {n["hostname"] for n in client.get("/nodes")["nodes"] if n["status"] == NodeStatus.ONLINE}
            missing = [n.hostname for n in self.state.nodes if n.hostname not in registered]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ExecutionError(f"{len(missing)} simulated node(s) did not register: {', '.join(missing[:5])}",
                                     hint=f"see the logs in {self.state_dir / 'logs'}")
            time.sleep(0.3)
        client.close()
        return self.state

    def down(self) -> None:
        """Stop the agents and the controller, remove namespaces and the bridge, forget fleet.json."""
        if self.state is None:
            return
        pids = [n.pid for n in self.state.nodes if n.pid] + (
            [self.state.controller_pid] if self.state.controller_pid else [])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not our child (fleet down from another process)
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    done = 0
                if done:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        try:
            if self.state.mode == "netns":
                self._teardown_network()
        except FleetError:
            pass
        self.fleet_file.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        assert self.state is not None
        alive = {}
        for n in self.state.nodes:
            try:
                os.kill(n.pid or -1, 0)
                alive[n.hostname] = True
            except (ProcessLookupError, PermissionError):
                alive[n.hostname] = False
        return {**asdict(self.state), "alive": alive}
