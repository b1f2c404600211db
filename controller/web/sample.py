"""A simulated fleet for the dashboard's tests, screenshots and benchmark (everything ``simulated``).

``populate(store, n)`` inserts ``n`` simulated nodes (varied GPUs, drivers, torch builds, FA installs,
statuses) straight into the registry tables; ``ScriptedRollout`` creates a rollout over some of them and
advances it one step per ``tick()`` — a stand-in for the rollout engine plus agents, writing the same
tables the engine writes, and honouring pause/abort done through ``controller.rollout.service``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from typing import Any

from sqlalchemy import insert, select

from controller.store.db import Store, utcnow
from controller.store.models import FactsHistory, Job, JobEvent, Node, NodeEvent

# (gpu name, cc, memory MiB, driver, cuda_max, nvcc, torch, torch cuda, python)
GPU_TEMPLATES: list[tuple[str, str, int, str, str, str | None, str, str, str]] = [
    ("NVIDIA H100 80GB HBM3", "9.0", 81559, "550.54.15", "12.4", "12.4", "2.5.1+cu124", "12.4", "3.11.10"),
    ("NVIDIA A100-SXM4-80GB", "8.0", 81920, "535.183.01", "12.2", "12.1", "2.4.1+cu121", "12.1", "3.10.14"),
    ("NVIDIA L40S", "8.9", 46068, "550.90.07", "12.4", None, "2.5.1+cu124", "12.4", "3.11.9"),
    ("NVIDIA GeForce RTX 4090", "8.9", 24564, "560.35.03", "12.6", "12.6", "2.6.0+cu126", "12.6", "3.12.7"),
    ("NVIDIA GeForce RTX 3090", "8.6", 24576, "550.127.05", "12.4", "12.4", "2.5.1+cu124", "12.4", "3.11.10"),
    ("NVIDIA A10", "8.6", 23028, "535.161.08", "12.2", "11.8", "2.3.1+cu121", "12.1", "3.10.12"),
    ("Tesla T4", "7.5", 15360, "535.161.08", "12.2", "12.1", "2.4.1+cu121", "12.1", "3.10.12"),
    ("NVIDIA L4", "8.9", 23034, "550.54.15", "12.4", "12.4", "2.5.1+cu124", "12.4", "3.11.7"),
]
FA_VERSION = "2.8.3"
# simulated forward TFLOP/s (FlashAttention, SDPA flash) by GPU model, bf16 hd128
TFLOPS = {"NVIDIA H100 80GB HBM3": (372.0, 350.0), "NVIDIA A100-SXM4-80GB": (188.0, 170.0),
          "NVIDIA L40S": (165.0, 150.0), "NVIDIA GeForce RTX 4090": (152.0, 140.0),
          "NVIDIA GeForce RTX 3090": (88.0, 80.0), "NVIDIA A10": (62.0, 58.0), "NVIDIA L4": (45.0, 42.0),
          "Tesla T4": (21.0, 19.0)}


def verification_result(gpu: str, rng: random.Random, *, factor: float = 1.0, passed: bool = True,
                        at: dt.datetime | None = None) -> dict[str, Any]:
    """A simulated ``fleet.verification`` result (the shape agent.verify.simulated writes)."""
    fa, sdpa = TFLOPS.get(gpu, (50.0, 45.0))
    at = at or utcnow()

    def entry(impl: str, base: float, seqlen: int) -> dict[str, Any]:
        return {"impl": impl, "dtype": "bfloat16", "headdim": 128, "seqlen": seqlen, "batch": 16384 // seqlen,
                "heads": 16, "causal": False, "status": "ok", "direction": "fwd",
                "tflops": round(base * factor * rng.uniform(0.95, 1.05), 1),
                "peak_mem_mib": 65.0 if impl == "flash_attn" else 80.0, "simulated": True}

    return {"schema_version": 1, "simulated": True, "mode": "quick", "status": "pass" if passed else "regression",
            "passed": passed, "started_at": (at - dt.timedelta(seconds=40)).isoformat(), "finished_at": at.isoformat(),
            "duration_s": 40.0, "device": {"name": gpu, "compute_capability": None},
            "flash_attn": {"import_ok": True, "version": FA_VERSION},
            "reasons": [] if passed else [f"{(1 - factor) * 100:.0f} % below the fleet median for {gpu}"],
            "speed": [entry("flash_attn", fa, 2048), entry("flash_attn", fa, 8192),
                      entry("sdpa_flash", sdpa, 2048), entry("sdpa_flash", sdpa, 8192)]}


def add_verifications(store: Store, hosts: list[str], *, days: int = 8, seed: int = 5,
                      regress: tuple[str, ...] = ()) -> int:
    """Daily simulated verify jobs for ``hosts`` over the last ``days`` days; hosts in ``regress`` slow
    down by 40 % on the last two days and fail."""
    rng = random.Random(seed)
    now = utcnow()
    count = 0
    with store.session() as s:
        gpus = {h: ((f.get("gpus") or [{}])[0].get("name") or "") for h, f in
                s.execute(select(Node.hostname, Node.facts).where(Node.hostname.in_(hosts)))}
        for host in hosts:
            for d in range(days, 0, -1):
                at = now - dt.timedelta(days=d - 1, hours=rng.uniform(1, 3))
                slow = host in regress and d <= 2
                result = verification_result(gpus.get(host, ""), rng, factor=0.6 if slow else 1.0, passed=not slow,
                                             at=at)
                s.add(Job(id=f"job-verify-{host}-{d}", node=host, kind="verify", vars={"mode": "quick"},
                          status="successful", created_at=at - dt.timedelta(seconds=45),
                          dispatched_at=at - dt.timedelta(seconds=44), started_at=at - dt.timedelta(seconds=40),
                          finished_at=at, rc=0, result={"verification": result, "simulated": True}, error=None))
                count += 1
    return count


def facts_for(hostname: str, i: int, rng: random.Random) -> dict[str, Any]:
    name, cc, mem, driver, cuda_max, nvcc, torch, tcuda, py = GPU_TEMPLATES[i % len(GPU_TEMPLATES)]
    ngpu = rng.choice((1, 1, 2, 4, 8))
    fa = None
    roll = rng.random()
    if cc >= "8.0" and roll < 0.55:
        fa = {"version": FA_VERSION if roll < 0.45 else "2.6.3", "variant": "fa2-wheel"}
    elif cc == "7.5" and roll < 0.3:
        fa = {"version": "1.0.9", "variant": "fa1-source"}
    return {
        "hostname": hostname,
        "os": {"id": "ubuntu", "version_id": "22.04", "arch": "x86_64", "kernel": "5.15.0-122-generic",
               "glibc": "2.35"},
        "driver": {"version": driver, "cuda_max": cuda_max},
        "gpus": [{"index": g, "name": name, "compute_capability": cc, "memory_mib": mem,
                  "uuid": f"GPU-sim-{i:06d}-{g}"} for g in range(ngpu)],
        "toolkit": {"nvcc": nvcc, "path": f"/usr/local/cuda-{nvcc}/bin/nvcc"} if nvcc else None,
        "python": {"version": py, "executable": "/opt/venv/bin/python"},
        "torch": {"version": torch, "cuda": tcuda, "cxx11abi": torch.startswith("2.6"),
                  "arch_list": ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]},
        "flash_attn": fa,
        "resources": {"cpu_cores": 32, "memory_mib": 257000},
        "apt": {"errors": []},
    }


def populate(store: Store, n: int, *, seed: int = 7, prefix: str = "sim-node", offline: float = 0.05,
             degraded: float = 0.03) -> list[str]:
    """Insert ``n`` simulated nodes (bulk); returns their hostnames."""
    rng = random.Random(seed)
    now = utcnow()
    rows = []
    hosts = []
    for i in range(n):
        host = f"{prefix}-{i:05d}"
        hosts.append(host)
        r = rng.random()
        status = "offline" if r < offline else "degraded" if r < offline + degraded else "online"
        seen = now - dt.timedelta(seconds=rng.uniform(0, 10) if status != "offline" else rng.uniform(300, 7200))
        rows.append({"hostname": host, "identity_id": None, "status": status, "status_changed_at": now,
                     "last_seen": seen, "facts": facts_for(host, i, rng), "extra": {"profile": "sample"},
                     "simulated": True, "registered_at": now - dt.timedelta(days=3), "facts_updated_at": now})
    with store.session() as s:
        for start in range(0, len(rows), 1000):
            s.execute(insert(Node), rows[start:start + 1000])
    return hosts


def add_history(store: Store, hostname: str) -> None:
    """A first report, a driver upgrade and a status blip for one node (for its page)."""
    now = utcnow()
    with store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == hostname)).one()
        s.add(FactsHistory(node_id=node.id, at=now - dt.timedelta(days=3), changed=["*"], old={}, new={}))
        s.add(FactsHistory(node_id=node.id, at=now - dt.timedelta(hours=20), changed=["driver.version"],
                           old={"driver.version": "535.104.05"},
                           new={"driver.version": (node.facts.get("driver") or {}).get("version")}))
        s.add(NodeEvent(node_id=node.id, at=now - dt.timedelta(hours=5), old_status="online", new_status="offline",
                        reason="missed 3 heartbeats"))
        s.add(NodeEvent(node_id=node.id, at=now - dt.timedelta(hours=4, minutes=50), old_status="offline",
                        new_status="online", reason="heartbeat"))


FAIL_LOG = ("Building wheel for flash-attn (setup.py) ... error\n"
            "RuntimeError:\nThe detected CUDA version (11.8) mismatches the version that was used to compile\n"
            "PyTorch (12.1). Please make sure to use the same CUDA versions.")


class ScriptedRollout:
    """A simulated rollout over ``hosts`` that moves one step per ``tick()`` while its status is ``running``.

    Batches: the first host is the canary (none with ``canary=False``: ``--canary 0``), then batches of
    ``batch`` hosts. Hosts in ``fail`` fail their build step with a CUDA-mismatch log (diagnosed by
    controller.diagnose) and a failed job; hosts in ``build`` build their wheel from source, then install
    and verify it. Each of those builds its own build key (a ``builds`` row, as the engine keeps it).
    """

    PATH = ("planned", "install", "verify", "done")
    BUILD_PATH = ("planned", "build", "install", "verify", "done")
    FAIL_PATH = ("planned", "build", "failed")

    def __init__(self, store: Store, hosts: list[str], *, rollout_id: str = "r-sim-0001", batch: int = 3,
                 fail: tuple[str, ...] = (), build: tuple[str, ...] = (), canary: bool = True,
                 version: str = FA_VERSION) -> None:
        from controller.rollout.models import Build, Rollout, RolloutNode
        self.store, self.rid, self.fail, self.build = store, rollout_id, set(fail), set(build) - set(fail)
        self.version = version
        now = utcnow()
        with store.session() as s:
            first = 1 if canary else 0
            sizes = [1] * first + [batch] * ((len(hosts) - first + batch - 1) // batch)
            s.add(Rollout(id=rollout_id, version=version, selector="all", status="running", reason="",
                          options={"batch": f"1,{batch}" if canary else str(batch), "canary": 1 if canary else 0,
                                   "canary_batch": canary, "max_failures": "2", "simulated": True},
                          created_by="user:demo", created_at=now, updated_at=now, finished_at=None,
                          current_batch=0, batches=len(sizes), canary_ack=False))
            s.flush()
            for i, host in enumerate(hosts):
                b = 0 if canary and i == 0 else first + (i - first) // batch
                source = host in self.fail or host in self.build
                steps = ["build-from-source", "install-wheel", "verify"] if source else ["install-wheel", "verify"]
                key = self.build_key(host) if source else None
                if key is not None:
                    s.add(Build(build_key=key, status="pending", rollout_id=rollout_id, builder=host, params={},
                                artifact_sha256=None, artifact_filename=None, job_id=None, error=None,
                                created_at=now, finished_at=None, attempts=0))
                s.add(RolloutNode(rollout_id=rollout_id, hostname=host, batch=b, canary=canary and i == 0,
                                  plan={"variant": "fa2-source" if source else "fa2-wheel",
                                        "flash_attn_version": version, "steps": steps},
                                  previous=None, build_key=key, state="planned", step=None, job_id=None,
                                  attempt=1, cause="", diagnosis=None, result={}, updated_at=now))

    def build_key(self, host: str) -> str:
        """A build key of its own per building host (build keys are unique across rollouts)."""
        return f"variant=fa2-source;flash_attn={self.version};simulated={self.rid}/{host}"

    def wheel(self) -> str:
        return f"flash_attn-{self.version}-cp311-cp311-linux_x86_64.whl"

    def status(self) -> str:
        from controller.rollout.models import Rollout
        with self.store.session() as s:
            r = s.get(Rollout, self.rid)
            return r.status if r else "missing"

    def tick(self) -> bool:
        """Advance the lowest unfinished batch by one step; False when nothing moved (paused or finished)."""
        from controller.rollout.models import Build, Rollout, RolloutNode, RolloutTransition
        from controller.web.sources import diagnose_text
        now = utcnow()
        with self.store.session() as s:
            r = s.get(Rollout, self.rid)
            if r is None or r.status not in ("running", "aborting"):
                return False
            nodes = list(s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == self.rid)
                                   .order_by(RolloutNode.batch, RolloutNode.hostname)))
            open_nodes = [n for n in nodes if n.state not in ("done", "failed", "skipped")]
            if r.status == "aborting":
                for n in open_nodes:
                    if n.state == "planned":
                        n.state, n.cause = "skipped", "rollout aborted before this step started"
                r.status, r.finished_at = "aborted", now
                return True
            if not open_nodes:
                failed = sum(1 for n in nodes if n.state == "failed")
                r.status, r.finished_at = ("partial" if failed else "succeeded"), now
                r.reason = f"{len(nodes) - failed} done, {failed} failed"
                return True
            batch = open_nodes[0].batch
            r.current_batch = batch
            for n in open_nodes:
                if n.batch != batch:
                    continue
                path = self.FAIL_PATH if n.hostname in self.fail else \
                    self.BUILD_PATH if n.hostname in self.build else self.PATH
                new = path[path.index(n.state) + 1]
                build = s.get(Build, n.build_key) if n.build_key else None
                if build is not None:
                    if new == "build":
                        build.status, build.attempts = "building", build.attempts + 1
                        build.job_id = f"job-{self.rid}-{n.hostname}-build"
                    elif n.state == "build" and new != "failed":
                        build.status, build.finished_at = "succeeded", now
                        build.artifact_filename = self.wheel()
                        build.artifact_sha256 = hashlib.sha256(build.build_key.encode()).hexdigest()
                s.add(RolloutTransition(rollout_id=self.rid, hostname=n.hostname, from_state=n.state, to_state=new,
                                        at=now, cause="simulated step", job_id=None, actor="engine"))
                n.state, n.updated_at = new, now
                n.step = {"install": "install-wheel", "verify": "verify", "build": "build-from-source"}.get(new)
                if new == "failed":
                    job_id = f"job-{self.rid}-{n.hostname}-build"
                    s.add(Job(id=job_id, node=n.hostname, kind="build-from-source", vars={}, status="failed",
                              created_at=now - dt.timedelta(seconds=40), started_at=now - dt.timedelta(seconds=38),
                              finished_at=now, rc=2, result=None, error="build-from-source failed (rc 2)"))
                    s.flush()
                    for c, (ev, data) in enumerate([
                        ("playbook_on_start", {"play": "build-from-source"}),
                        ("runner_on_ok", {"task": "Gathering Facts"}),
                        ("runner_on_failed", {"task": "pip wheel flash-attn", "stdout": FAIL_LOG}),
                        ("playbook_on_stats", {"failures": 1}),
                    ], start=1):
                        s.add(JobEvent(job_id=job_id, counter=c, event=ev, data=data, created=now))
                    n.job_id, n.step = job_id, "build-from-source"
                    n.cause = "build-from-source failed: CUDA version mismatch between nvcc and torch"
                    if build is not None:
                        build.status, build.error, build.finished_at = "failed", n.cause, now
                    diag = diagnose_text(FAIL_LOG)
                    n.diagnosis = {"diagnoses": [diag]} if diag else None
                if new == "done":
                    node = s.scalars(select(Node).where(Node.hostname == n.hostname)).first()
                    if node is not None:
                        gpu = ((node.facts.get("gpus") or [{}])[0]).get("name") or ""
                        rng = random.Random(n.hostname)
                        s.add(Job(id=f"job-{self.rid}-{n.hostname}-verify", node=n.hostname, kind="verify",
                                  vars={}, status="successful", created_at=now - dt.timedelta(seconds=30),
                                  started_at=now - dt.timedelta(seconds=25), finished_at=now, rc=0,
                                  result={"verification": verification_result(gpu, rng, at=now)}, error=None))
                        facts = dict(node.facts)
                        facts["flash_attn"] = {"version": r.version,
                                               "variant": (n.plan or {}).get("variant") or "fa2-wheel"}
                        node.facts, node.facts_updated_at = facts, now
            return True


class ThreadServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread (tests, screenshots, benchmarks)."""

    def __init__(self, app: Any) -> None:
        import socket
        import threading

        import uvicorn
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=3, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard-server", daemon=True)

    def __enter__(self) -> ThreadServer:
        import time
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("dashboard test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        from controller.web.app import close
        close(self.app)
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Ticker:
    """Calls ``rollout.tick()`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, rollout: ScriptedRollout, interval: float = 0.6) -> None:
        import threading
        self.rollout, self.interval = rollout, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scripted-rollout", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.rollout.tick()

    def __enter__(self) -> Ticker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
