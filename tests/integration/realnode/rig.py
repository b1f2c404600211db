"""A real controller, real ``fleet-agent --executor ansible`` processes and real target venvs, fed by FakeUpstream.

``Controller``: ``python -m fleetctl.controller.main serve`` as its own process on free ports, its upstreams
pointed at a
``FakeUpstream`` (``--upstream-index`` = the fake index, ``--wheel-mirror`` = the fake GitHub releases base, so
the catalog's ``https://github.com/Dao-AILab/flash-attention/releases/download/vV/FILE`` maps to
``MIRROR/vV/FILE``); ``fleetctl(...)`` runs the real CLI against it, ``api(...)`` reads its HTTP API.

``Agent``: ``fleet-agent run --simulate PROFILE --executor ansible --python VENV/bin/python --node-state-dir DIR``:
GPU facts from a profile (labelled simulated), the target Python probed for real, playbooks run for real.
Its environment routes HTTP(S) to a closed port (``http_proxy``/``https_proxy``; gRPC to the controller
bypasses them via ``no_proxy``/``no_grpc_proxy``), so a node that tried to reach upstream itself would fail.

``TargetVenv``: a venv with the harness's stand-in torch (made ``--without-pip`` unless ``with_pip``: a
source build runs ``python -m pip wheel``) and a ``ninja`` stub next to its python, as
scripts/device/e2e_rehearsal.sh does; ``versions()`` reads ``importlib.metadata`` there, ``pip_check()`` runs pip
check on it.

``TimedUpstream``: a ``FakeUpstream`` whose request log carries the time of each request, so a test can show
every upstream request came before the node's job started (the controller fetched it, not the node).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness.upstream import (
    FakeUpstream,
    Universe,
    fa1_universe,
    fa2_universe,
    fa4_universe,
    local_python_tag,
    make_venv,
    pip_wheel,
    run_pip,
    torch_wheel,
)
from tests.integration.harness.wheels import sha256_file

BIN = Path(sys.executable).parent
GITHUB = "https://github.com/Dao-AILab/flash-attention/releases/download"
FA2 = "2.8.3"
FA1 = "1.0.9"
FA4 = "4.0.0b36"
#: the release wheels match the h200 profile: torch 2.8.0+cu128, cxx11abi TRUE (the Python is the venv's)
FA2_TORCH, FA2_CUDA = "2.8", "12"
#: what a node's venv may hold besides the stand-in torch, as tests read it
DISTS = ("torch", "flash-attn", "flash-attn-4", "einops", "typing-extensions", "nvidia-cutlass-dsl",
         "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13", "apache-tvm-ffi", "torch-c-dlpack-ext",
         "quack-kernels", "pip")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def utc(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# ---- upstream -----------------------------------------------------------------------------------



def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 15 s: the controller and the agents stop the same way."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

class TimedUpstream(FakeUpstream):
    """FakeUpstream with the (time, method, path) of every request."""

    def __init__(self, **kw: Any) -> None:
        self._timed: list[tuple[dt.datetime, str, str]] = []
        self._timed_lock = threading.Lock()
        super().__init__(**kw)

    def _log(self, method: str, path: str) -> None:
        with self._timed_lock:
            self._timed.append((dt.datetime.now(dt.UTC), method, path))
        super()._log(method, path)

    @property
    def timed(self) -> list[tuple[dt.datetime, str, str]]:
        with self._timed_lock:
            return list(self._timed)


@dataclass(frozen=True)
class Universes:
    fa2: Universe
    fa1: Universe
    fa4: Universe
    torch: Path

    @property
    def release_wheel(self) -> Path:
        """The FA2 release wheel for this machine's Python (the venvs are made from it)."""
        tag = local_python_tag()
        return next(p for _, p in self.fa2.release_assets if f"-{tag}-{tag}-" in p.name)


def make_universes(root: Path) -> Universes:
    return Universes(fa2=fa2_universe(root / "fa2", FA2, torch=FA2_TORCH, cuda=FA2_CUDA),
                     fa1=fa1_universe(root / "fa1", FA1), fa4=fa4_universe(root / "fa4", FA4),
                     torch=torch_wheel(root / "torch"))


def catalog_entry(wheel: Path, version: str = FA2) -> dict[str, Any]:
    """A user-catalog entry for a release wheel at its GitHub-style URL (the mirror maps it to the fake)."""
    return {"filename": wheel.name, "url": f"{GITHUB}/v{version}/{wheel.name}", "sha256": sha256_file(wheel),
            "min_glibc": "2.31"}


# ---- target venvs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetVenv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @staticmethod
    def make(root: Path, torch: Path, *, with_pip: bool = False) -> TargetVenv:
        make_venv(root)
        venv = TargetVenv(root)
        wheels = [torch, *([pip_wheel()] if with_pip else [])]
        proc = run_pip("install", "--no-index", "--no-deps", "--no-cache-dir", *wheels, python=venv.python)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ninja = root / "bin" / "ninja"
        ninja.write_text("#!/bin/sh\necho 1.11.1.stand-in\n")
        ninja.chmod(0o755)
        return venv

    def versions(self, *more: str) -> dict[str, str]:
        """Distribution → version of what is installed (``DISTS`` and ``more`` only; absent ones left out)."""
        code = ("import json, sys\nfrom importlib import metadata as m\nout = {}\nfor d in sys.argv[1:]:\n"
                "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([str(self.python), "-c", code, *DISTS, *more], capture_output=True, text=True, check=True,
                             env=env, timeout=60).stdout
        found: dict[str, str] = json.loads(out)
        return found

    def pip_check(self) -> str:
        proc = run_pip("check", python=self.python)
        assert proc.returncode == 0, f"pip check in {self.root}: {proc.stdout}{proc.stderr}"
        return proc.stdout


# ---- controller ---------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Controller:
    """``fleet-controller serve`` on free ports with the given upstream flags."""

    def __init__(self, state: Path, upstream: FakeUpstream | None, *, extra: Sequence[str] = (),
                 python: Path = Path(sys.executable)) -> None:
        self.state = state
        self.python = python  # whose fleetctl: the checkout's or an installed wheel's
        self.upstream = upstream
        self.extra = list(extra)
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state.parent / f"{state.name}.log"
        self._http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self, timeout: float = 60) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        flags = ["--upstream-index", self.upstream.index_url, "--wheel-mirror", self.upstream.releases_url] \
            if self.upstream is not None else ["--offline"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
                 "--grpc-listen", self.grpc, "--enroll-listen", f"127.0.0.1:{self.ports['enroll']}",
                 "--http-listen", f"127.0.0.1:{self.ports['http']}", "--http-insecure", "--heartbeat-interval", "1",
                 "--missed-heartbeats", "10", "--no-gc-tuning", *flags, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.state.parent,
                env=self._env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"controller exited: {self.log_tail()}"
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    token = (self.state / "admin.token").read_text().strip()
                    self._http = httpx.Client(base_url=self.url, timeout=30,
                                              headers={"Authorization": f"Bearer {token}"})
                    return
            time.sleep(0.2)
        raise AssertionError(f"controller did not come up: {self.log_tail()}")

    def _env(self) -> dict[str, str]:
        """This environment; for an installed controller without PYTHONPATH, so that it runs its own package."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.python != Path(sys.executable):
            env.pop("PYTHONPATH", None)
        return env

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
        _stop(self.proc)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def api(self, path: str, **params: Any) -> Any:
        assert self._http is not None
        resp = self._http.get(f"/api/v1{path}", params=params)
        assert resp.status_code < 400, resp.text
        return resp.json()

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        assert self._http is not None
        resp = self._http.post(f"/api/v1{path}", json=dict(body))
        assert resp.status_code < 400, resp.text
        return resp.json()

    def fleetctl(self, *args: str, timeout: float = 240) -> Result:
        env = {**self._env(), "USER": "tester", "FLEETCTL_CONTROLLER": self.url}
        proc = subprocess.run([str(self.python), "-m", "fleetctl.controller.cli", *args,
                                 "--state-dir", str(self.state)],
                              capture_output=True, text=True, env=env, timeout=timeout, check=False)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """``fleetctl ARGS`` started, not waited for (its output: ``communicate()``)."""
        env = {**self._env(), "USER": "tester", "FLEETCTL_CONTROLLER": self.url}
        return subprocess.Popen([str(self.python), "-m", "fleetctl.controller.cli", *args,
                                 "--state-dir", str(self.state)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def together(self, *commands: Sequence[str], timeout: float = 420) -> list[Result]:
        """Several fleetctl commands at once; their exit codes and output (stderr folded into ``out``)."""
        procs = [self.spawn(*cmd) for cmd in commands]
        out = []
        for p in procs:
            try:
                text = p.communicate(timeout=timeout)[0]
            except subprocess.TimeoutExpired:
                p.kill()
                text = p.communicate()[0] + "\n(fleetctl timed out)"
            out.append(Result(p.returncode, text, ""))
        return out

    # ---- reading its state ----

    def rollout(self, rid: str) -> dict[str, Any]:
        """What `fleetctl rollout status ID --json` prints (read from the API: a CLI process per poll is slow)."""
        st: dict[str, Any] = self.api(f"/rollouts/{rid}")
        return st

    def jobs(self, node: str) -> list[dict[str, Any]]:
        """The node's jobs, oldest first, with their events."""
        listing = self.api("/jobs", node=node, limit=1000)["jobs"]
        return [self.api(f"/jobs/{j['id']}") for j in reversed(listing)]

    def artifacts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("/artifacts")["artifacts"]
        return found

    def node(self, hostname: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api(f"/nodes/{hostname}")
        return found

    def wait_node(self, hostname: str, python: Path, timeout: float = 60) -> dict[str, Any]:
        """Until the node is up and reports the target venv's python (its facts are the rehearsal's)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, httpx.HTTPError):
                last = self.node(hostname)
                facts = last.get("facts") or {}
                if last.get("status") in ("online", "degraded") and \
                        (facts.get("python") or {}).get("executable") == str(python):
                    return dict(last)
            time.sleep(0.3)
        raise AssertionError(f"node {hostname} not up with {python}: {last}")


# ---- agents -------------------------------------------------------------------------------------


class AgentProc:
    """``fleet-agent run --simulate PROFILE --executor ansible --python VENV --node-state-dir DIR`` for one node."""

    def __init__(self, controller: Controller, hostname: str, profile: str, venv: TargetVenv, root: Path, *,
                 bin_dir: Path = BIN) -> None:
        self.controller = controller
        self.bin_dir = bin_dir  # the venv whose fleet-agent (and ansible-playbook) runs
        self.hostname = hostname
        self.profile = profile
        self.venv = venv
        self.root = root
        self.state_dir = root / "agent"
        self.node_state = root / "node"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        c = self.controller
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        dead = f"http://127.0.0.1:{free_port()}"   # nothing listens: any HTTP(S) the node tries fails
        env.update(PATH=f"{self.bin_dir}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1", GRPC_ENABLE_FORK_SUPPORT="false",
                   http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead,
                   no_proxy="", NO_PROXY="", no_grpc_proxy="127.0.0.1,localhost", grpc_proxy="")
        if not (self.state_dir / "identity.json").exists():
            env["FLEET_AGENT_TOKEN"] = c.post("/tokens", {"ttl_seconds": 600, "hostname": self.hostname})["token"]
        with (self.root / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin_dir / "fleet-agent"), "run", "--controller", c.grpc,
                 "--enroll-address", f"127.0.0.1:{c.ports['enroll']}", "--ca", str(c.state / "ca" / "ca.pem"),
                 "--state-dir", str(self.state_dir), "--hostname", self.hostname, "--simulate", self.profile,
                 "--executor", "ansible", "--python", str(self.venv.python), "--node-state-dir", str(self.node_state)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.root,
                start_new_session=True)

    def stop(self) -> None:
        _stop(self.proc)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join((self.root / "agent.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def require_ansible() -> None:
    """Skip where the agent could not run playbooks (as tests/integration/e2e/test_rehearsal.py does)."""
    if shutil.which("ansible-playbook", path=f"{BIN}:{os.environ.get('PATH', '')}") is None:
        pytest.skip("ansible-playbook not installed")


@contextlib.contextmanager
def running(controller: Controller, agents: Sequence[AgentProc]) -> Iterator[None]:
    """Controller and agents up (each agent's node reporting its venv's python); all stopped afterwards."""
    try:
        controller.start()
        for a in agents:
            a.start()
        for a in agents:
            try:
                controller.wait_node(a.hostname, a.venv.python)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nagent log:\n{a.log_tail()}") from None
        yield
    finally:
        for a in agents:
            a.stop()
        controller.stop()
