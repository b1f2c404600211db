"""A simulated fleet for tests, screenshots and benchmarks: the real controller, fake agents at the job seam.

Shipped in the package as the test double of a fleet of agents (the way httpx ships ``MockTransport``):
everything on the controller's side is the real thing — ``ControllerContext`` (store, registry, enrollment,
job dispatcher, artifact store), the ``RolloutEngine`` and the ``VerificationService`` — so every table is
written by its owner. Only the agents are fake. A ``FakeAgent`` sits where the gRPC servicer
(controller/server.py) hands jobs to a real agent and takes its reports back:

* it enrolls like an agent (a one-time token and a certificate request, ``Enrollment.enroll``) and registers
  its node through ``Registry.report_facts`` with the facts it is given, flagged ``simulated``;
* it takes its jobs from ``JobDispatcher.stream_for``, reports events (``record_events_async``) and the
  outcome its ``JobScript`` says (``complete_async``), then its facts again, as a real agent does when the
  controller asks for fresh facts after a job: an install or a build changes the node's flash-attn;
* an install puts the target beside the FlashAttention of other distributions (FA4 beside FA2, as pip does:
  ``fleet.facts.with_installed``); a ``verify`` job reports a ``fleet.verification`` result with the figures
  scripted for the node (or the usual figures of its GPU model) for every FlashAttention installed, verifying
  the one the job's ``expect`` names; the controller judges it (``verify_store``), as it judges a real node's.

What a test can make the simulated fleet do (all of it simulated, none of it a real agent's code):

* per node and job kind (``FakeFleet.script``, a ``JobScript``): take ``seconds``; fail with an ``error``
  and a failed task's ``log``; ``hang`` (take the job and never answer); succeed without changing the
  node's flash-attn (``installs=False``); for ``verify``: other ``figures``, a replayed real ``result``, or
  a flash-attn that fails to import (``import_error``; ``import_error_of="fa4"``: only FA4's, where FA4 is
  installed beside FA2) — an agent without a verification runner is a verify
  ``JobScript(error="unknown job kind 'verify'...")``;
* per job kind, how long an unscripted job takes (``kind_seconds``; ``default_seconds`` for the rest);
* nodes: add them (``add_node(s)``, from ``agent.profiles.load_profile`` or any ``NodeFacts``), change their
  facts under the agent (``change_facts``, also "the node is heard of again"), stop an agent
  (``stop_agent``: its jobs are never answered), restart one holding jobs or none (``restart_agent``), take a
  node offline (``set_offline``); an agent's call answered with a database error is sent again;
* the controller's side: ``start_engine`` / ``new_engine`` (a second controller's engine, other timings),
  ``start_rollout`` / ``wait_rollout``, ``verify``, and what was dispatched (``job_counts``, ``jobs_of_kind``).

Nothing here touches a GPU or runs a playbook; every node, result and job is flagged ``simulated: true``.
Async API (``FakeFleet``, for tests running in an event loop) and a thread-backed one for synchronous
callers (``FleetThread``: TestClient tests, scripts/screenshots.py, benchmarks/dashboard_10k.py)::

    with FleetThread(FakeFleet.create(tmp_path / "controller")) as ft:
        hosts = ft.call(ft.fleet.add_nodes(facts_list))
        ft.fleet.script(hosts[2], "install-wheel", JobScript(error="...", log=build_log))
        rid = ft.call(ft.fleet.start_rollout(RolloutRequest(nodes=",".join(hosts))))
        ft.call(ft.fleet.wait_rollout(rid, "succeeded", "partial"))
    with ThreadServer(create_standalone_app(ft.fleet.ctx)) as server: ...   # the dashboard over HTTP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from fleetctl.controller.artifacts import Provenance
from fleetctl.controller.ca import make_csr
from fleetctl.controller.context import ControllerContext
from fleetctl.controller.enrollment import AgentIdentity
from fleetctl.controller.jobs import JobEventRecord
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.rollout import service as rollouts
from fleetctl.controller.rollout.engine import RolloutEngine
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.store import utcnow
from fleetctl.controller.store.models import Job
from fleetctl.controller.verify_store.service import VerificationService
from fleetctl.controller.web.app import close as close_dashboard
from fleetctl.fleet.errors import FleetError, StoreError
from fleetctl.fleet.facts import FlashAttnFacts, NodeFacts, with_installed
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.verification import (
    FLASH_IMPLS,
    SCHEMA_VERSION,
    CorrectnessEntry,
    DeviceInfo,
    FlashAttnStatus,
    SpeedEntry,
    VerificationResult,
    expect_for_variant,
    judge,
    verified_among,
)

T = TypeVar("T")

# forward TFLOP/s (flash-attn, SDPA flash) of a simulated verification by GPU model, bf16, head dim 128: the
# order of magnitude of agent/verify/simulated.py's model, kept simple — a double reports what it is told
USUAL_TFLOPS: Mapping[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (372.0, 350.0), "NVIDIA H200": (390.0, 365.0), "NVIDIA A100-SXM4-80GB": (188.0, 170.0),
    "NVIDIA L40S": (165.0, 150.0), "NVIDIA GeForce RTX 4090": (152.0, 140.0), "NVIDIA A10": (62.0, 58.0),
    "NVIDIA L4": (45.0, 42.0), "Tesla T4": (21.0, 19.0)}
OTHER_GPU_TFLOPS = (50.0, 45.0)
FLASH_MODULES = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}  # what imports
# a fake agent's call the controller answers with a database error is sent again (the same payload), as
# agent/client.py does for a real agent: this many times, this far apart, then the error stands
AGENT_CALL_RETRIES = 40
AGENT_RETRY_SECONDS = 0.25
CUDA_MISMATCH_LOG = ("Building wheel for flash-attn (setup.py) ... error\n"
                     "RuntimeError:\nThe detected CUDA version (11.8) mismatches the version that was used to compile\n"
                     "PyTorch (12.1). Please make sure to use the same CUDA versions.")


@dataclass(frozen=True)
class Figures:
    """What a fake agent's verification measures: forward TFLOP/s of flash-attn and of SDPA's flash kernel."""

    flash_tflops: float
    sdpa_tflops: float

    def scaled(self, factor: float) -> Figures:
        return Figures(round(self.flash_tflops * factor, 1), round(self.sdpa_tflops * factor, 1))


def usual_figures(gpu: str | None) -> Figures:
    return Figures(*USUAL_TFLOPS.get(gpu or "", OTHER_GPU_TFLOPS))


@dataclass(frozen=True)
class JobScript:
    """What a fake agent does with a job of one kind: wait ``seconds``, then succeed — or fail with ``error``
    (rc 2; ``log`` is the failed task's output, which the controller diagnoses) — or never answer (``hang``).
    For ``verify``: report ``result`` (a real node's, replayed: flagged simulated and re-addressed to this node),
    else one with ``figures`` (default: the usual ones of the node's GPU); with ``import_error`` the node's
    flash-attn fails to import with that message instead (the verification fails: the node degrades) —
    only the implementation ``import_error_of`` names (flash_attn | fa3 | fa4) when it is set.
    For ``install-wheel`` and ``build-from-source``: with ``installs=False`` the job succeeds but the node's
    flash-attn stays what it was (the wheel went into another Python than the one its facts describe)."""

    seconds: float = 0.0
    error: str | None = None
    log: str = ""
    figures: Figures | None = None
    result: VerificationResult | None = None
    hang: bool = False
    import_error: str | None = None
    import_error_of: str | None = None
    installs: bool = True


def verification_result(facts: NodeFacts, figures: Figures, *, mode: str = "quick", expect: str = "flash_attn",
                        at: dt.datetime | None = None, import_error: str | None = None,
                        import_error_of: str | None = None) -> VerificationResult:
    """A simulated ``fleet.verification`` result of ``facts``'s node with ``figures``: every FlashAttention
    installed (FA2, and FA3/FA4 beside it) imports (unless ``import_error``: it fails to import with that,
    only ``import_error_of`` when set), is correct, and is as fast as the figures say; the run verifies the one
    ``expect`` names (``fleet.verification.verified_among``, as bench.py picks it); the node's own verdict
    (``judge`` without the fleet comparison, which the controller adds). A node with no FlashAttention at all
    is verified as an SDPA node whatever ``expect`` says (this double's old rule)."""
    finished = at or utcnow()
    gpu = facts.gpus[0] if facts.gpus else None
    installed = {expect_for_variant(f.variant): f for f in (facts.flash_attn.installed if facts.flash_attn else ())}
    expect = expect if installed else "sdpa"
    verified = verified_among(expect, installed)

    def status(impl: str) -> FlashAttnStatus:
        module = FLASH_MODULES[impl]
        f = installed.get(impl)
        broken = import_error is not None and import_error_of in (None, impl)
        error = (import_error if broken else None) if f is not None else f"No module named '{module}' (simulated)"
        if impl == "flash_attn":  # FA2/FA1 as results always described it
            return FlashAttnStatus(import_ok=error is None, version=f.version if f else None, error=error)
        return FlashAttnStatus(import_ok=error is None, version=f.version if f else None, error=error, impl=impl,
                               implementation=impl, module=module, present=f is not None)

    statuses = {impl: status(impl) for impl in FLASH_IMPLS if impl in installed or impl == verified}
    impls = (*(i for i, st in statuses.items() if st.import_ok), "sdpa_flash")
    correctness = tuple(CorrectnessEntry(impl=i, status="ok", dtype="bfloat16", headdim=128, causal=False, batch=4,
                                         seqlen=2048, heads=16, fwd_rel_err=2.2e-3, threshold_fwd=2e-2,
                                         simulated=True) for i in impls)
    speed = tuple(SpeedEntry(impl=i, dtype="bfloat16", headdim=128, seqlen=seqlen, batch=16384 // seqlen, heads=16,
                             causal=False, status="ok", simulated=True,
                             tflops=figures.sdpa_tflops if i == "sdpa_flash" else figures.flash_tflops)
                  for i in impls for seqlen in (2048, 8192))
    result = VerificationResult(
        schema_version=SCHEMA_VERSION, simulated=True, mode=mode, status="pass", passed=True,
        started_at=finished - dt.timedelta(seconds=40), finished_at=finished, duration_s=40.0,
        device=DeviceInfo(name=gpu.name if gpu else None, compute_capability=gpu.compute_capability if gpu else None),
        flash_attn=statuses.get(verified or "flash_attn") or status("flash_attn"), expect=expect,
        flash_attn_implementations=tuple(statuses.values()), hostname=facts.hostname, correctness=correctness,
        speed=speed)
    return result.with_verdict(judge(result))


def replayed(result: VerificationResult, hostname: str) -> dict[str, Any]:
    """A real node's result as a fake agent reports it: for ``hostname``, and flagged simulated throughout (a
    result and its entries must agree on that, and the controller keeps simulated results apart)."""
    def simulated(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: True if k == "simulated" else simulated(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [simulated(x) for x in obj]
        return obj

    out: dict[str, Any] = simulated(replace(result, hostname=hostname).to_json())
    return out


class FakeAgent:
    """One node's agent at the dispatcher seam (see the module docstring)."""

    def __init__(self, fleet: FakeFleet, ident: AgentIdentity, facts: NodeFacts) -> None:
        self.fleet = fleet
        self.ident = ident
        self.facts = facts
        self.held: set[str] = set()  # jobs received and not reported back (what a reconnecting agent holds)
        self._work: set[asyncio.Task[None]] = set()

    @property
    def hostname(self) -> str:
        return self.ident.hostname

    async def run(self) -> None:
        jobs = self.fleet.ctx.jobs
        while True:
            try:
                async for spec in jobs.stream_for(self.hostname, set(self.held)):
                    if spec.job_id in self.held:
                        continue
                    self.held.add(spec.job_id)
                    task = asyncio.create_task(self._job(spec), name=f"fake-job-{self.hostname}:{spec.job_id}")
                    self._work.add(task)
                    task.add_done_callback(self._work.discard)
                return
            except StoreError:  # the stream failed on the database: reconnect, as a real agent does
                await asyncio.sleep(AGENT_RETRY_SECONDS * 4)

    async def _call(self, send: Callable[[], Awaitable[Any]]) -> None:
        """One call to the controller, sent again while it answers with a database error (a real agent's retry)."""
        for _ in range(AGENT_CALL_RETRIES):
            try:
                await send()
                return
            except StoreError:
                await asyncio.sleep(AGENT_RETRY_SECONDS)
        await send()

    async def stop(self) -> None:
        for task in list(self._work):
            task.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)

    async def _event(self, spec: JobSpec, counter: int, name: str, data: Mapping[str, Any]) -> None:
        record = JobEventRecord(spec.job_id, counter, name, {**data, "simulated": True}, utcnow())
        await self._call(lambda: self.fleet.ctx.jobs.record_events_async(self.hostname, [record]))

    async def _job(self, spec: JobSpec) -> None:
        script = self.fleet.script_for(self.hostname, spec.kind)
        await self._event(spec, 1, "playbook_on_start", {"play": spec.kind})
        if script.hang:
            return
        await asyncio.sleep(script.seconds)
        outcome = await self._outcome(spec, script)
        await self._event(spec, 2, "runner_on_ok" if outcome.ok else "runner_on_failed",
                          {"task": f"simulated {spec.kind}", "stdout": script.log or (outcome.error or "")})
        await self._call(lambda: self.fleet.ctx.jobs.complete_async(self.hostname, outcome))
        self.held.discard(spec.job_id)
        # the controller asks for fresh facts after every job (ControllerContext._job_finished): report them
        await self._call(lambda: self.fleet.ctx.registry.report_facts_async(self.ident, self.facts, simulated=True))

    async def _outcome(self, spec: JobSpec, script: JobScript) -> JobOutcome:
        if script.error is not None:
            return JobOutcome(spec.job_id, JobStatus.FAILED, 2, {"simulated": True, "stderr": script.log}, script.error)
        result: dict[str, Any] = {"simulated": True, "stats": {"changed": 1}}
        version = spec.vars.get("flash_attn_version")
        if spec.kind == "build-from-source":
            key = str(spec.vars.get("build_key") or "")
            dist = str(spec.vars.get("dist_name") or "flash-attn").replace("-", "_")
            name = f"{dist}-{version}+sim{hashlib.sha256(key.encode()).hexdigest()[:8]}-cp3-none-linux_x86_64.whl"
            data = f"simulated flash-attn wheel, build key {key}\n".encode()
            put = self.fleet.ctx.artifacts.put_bytes  # what the agent's upload of a build's wheel stores
            info = await asyncio.to_thread(put, data, name, kind="wheel",
                                           provenance=Provenance.build(spec.job_id, key, self.hostname))
            result["built_wheel"] = {"sha256": info.sha256, "filename": info.filename}
        if spec.kind in ("install-wheel", "build-from-source") and version and script.installs:
            variant = str(spec.vars.get("variant") or "fa2").split("-")[0]
            self.facts = replace(self.facts, flash_attn=with_installed(self.facts.flash_attn,
                                                                       FlashAttnFacts(str(version), variant)))
        if spec.kind == "verify":
            gpu = self.facts.gpus[0].name if self.facts.gpus else None
            expect = str(spec.vars.get("expect") or "flash_attn")
            if script.result is not None:
                result["verification"] = replayed(script.result, self.hostname)
            else:
                result["verification"] = verification_result(
                    self.facts, script.figures or usual_figures(gpu), mode=str(spec.vars.get("mode") or "quick"),
                    expect=expect, import_error=script.import_error,
                    import_error_of=script.import_error_of).to_json()
        return JobOutcome(spec.job_id, JobStatus.SUCCESSFUL, 0, result, None)


@dataclass
class FakeFleet:
    """The real controller's parts and one ``FakeAgent`` per node. Async: call from one event loop."""

    ctx: ControllerContext
    engine: RolloutEngine
    verification: VerificationService
    agents: dict[str, FakeAgent] = field(default_factory=dict)
    scripts: dict[tuple[str, str], JobScript] = field(default_factory=dict)  # (hostname, job kind)
    default_seconds: float = 0.0
    kind_seconds: dict[str, float] = field(default_factory=dict)  # how long an unscripted job of a kind takes
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _engine_task: asyncio.Task[None] | None = None
    _key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def create(cls, state_dir: Path, db_url: str | None = None, *, engine_tick: float = 0.1,
               job_seconds: float = 0.0, settings: ControllerSettings | None = None) -> FakeFleet:
        """A controller in ``state_dir`` (SQLite there unless ``db_url``) with no agents yet; its other knobs
        are ``settings``' (default: ControllerSettings' defaults)."""
        ctx = ControllerContext(replace(settings or ControllerSettings(), state_dir=state_dir, db_url=db_url))
        engine = RolloutEngine(ctx.store, ctx.jobs, artifacts=ctx.artifacts, artifacts_dir=state_dir / "artifacts",
                               tick=engine_tick, lease_ttl=5.0)
        # drift re-verification off: a fake install changing flash-attn must not queue verify jobs of its own
        verification = VerificationService(ctx, drift_delay=3600.0, policy=ctx.settings.regression).attach()
        return cls(ctx, engine, verification, default_seconds=job_seconds)

    # ---- nodes ------------------------------------------------------------------------------------

    async def add_node(self, facts: NodeFacts) -> str:
        """Enroll an agent for ``facts.hostname``, register its node (``simulated``) and start taking its jobs."""
        host = facts.hostname
        ctx = self.ctx

        def enroll() -> AgentIdentity:
            token, _ = ctx.enrollment.create_token(dt.timedelta(minutes=5), host)
            done = ctx.enrollment.enroll(token, host, make_csr(self._key, host), peer="simulated")
            return AgentIdentity(done.agent_id, host, "", False)

        ident = await ctx.store.call(enroll)
        await ctx.registry.report_facts_async(ident, facts, simulated=True)
        agent = FakeAgent(self, ident, facts)
        self.agents[host] = agent
        self._tasks[host] = asyncio.create_task(agent.run(), name=f"fake-agent-{host}")
        return host

    async def add_nodes(self, facts: Iterable[NodeFacts]) -> list[str]:
        return [await self.add_node(f) for f in facts]

    async def change_facts(self, hostname: str, facts: NodeFacts) -> list[str]:
        """The node changed under its agent (a driver upgrade, say): the agent reports its new facts; the
        changed fields, as the registry found them."""
        agent = self.agents[hostname]
        agent.facts = facts
        return await self.ctx.registry.report_facts_async(agent.ident, facts, simulated=True)

    async def set_offline(self, hostname: str, reason: str = "no heartbeat (simulated agent stopped)") -> None:
        """The node's agent goes away: its job stream ends and the registry marks the node offline."""
        await self.stop_agent(hostname)
        self.ctx.registry.set_status(hostname, NodeStatus.OFFLINE, reason)

    def script(self, hostname: str, kind: str, script: JobScript) -> None:
        """How ``hostname``'s agent answers jobs of ``kind`` from now on."""
        self.scripts[(hostname, kind)] = script

    def script_for(self, hostname: str, kind: str) -> JobScript:
        return self.scripts.get((hostname, kind)) or JobScript(
            seconds=self.kind_seconds.get(kind, self.default_seconds))

    async def stop_agent(self, hostname: str) -> None:
        """The node's agent vanishes (simulated: its connection drops, the jobs it holds are never answered);
        the node's status is the registry's to decide, as for a real agent that stops heartbeating."""
        task = self._tasks.pop(hostname, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.agents[hostname].stop()

    async def restart_agent(self, hostname: str, held: Iterable[str] = ()) -> None:
        """The agent process dies with its jobs and comes back at once (simulated), holding ``held`` (what it
        tells the controller it still runs when it reconnects; a fresh process: nothing)."""
        await self.stop_agent(hostname)
        agent = self.agents[hostname]
        agent.held = set(held)
        self._tasks[hostname] = asyncio.create_task(agent.run(), name=f"fake-agent-{hostname}")

    def job_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs of each kind each node was given: {(hostname, kind): n}."""
        with self.ctx.store.session() as s:
            rows = s.execute(select(Job.node, Job.kind, func.count()).group_by(Job.node, Job.kind)).all()
        return {(node, kind): n for node, kind, n in rows}

    def jobs_of_kind(self, kind: str) -> list[str]:
        """The nodes given jobs of ``kind``, once per job, sorted."""
        return sorted(h for (h, k), n in self.job_counts().items() if k == kind for _ in range(n))

    # ---- work ---------------------------------------------------------------------------------------

    def new_engine(self, **options: Any) -> RolloutEngine:
        """Another rollout engine on this controller's store and dispatcher (what a second controller process
        runs, or one with other timings: ``tick``, ``lease_ttl``, ``owner``...)."""
        options.setdefault("tick", self.engine.tick)
        options.setdefault("lease_ttl", 5.0)
        return RolloutEngine(self.ctx.store, self.ctx.jobs, artifacts=self.ctx.artifacts,
                             artifacts_dir=self.ctx.settings.state_dir / "artifacts", **options)

    async def start_engine(self) -> None:
        """Run the rollout engine on this loop (until ``close``): rollouts started so far and later move."""
        if self._engine_task is None:
            self._engine_task = asyncio.create_task(self.engine.run(), name="rollout-engine")

    async def start_rollout(self, request: RolloutRequest) -> str:
        """``fleetctl rollout start`` through the rollout service; returns the rollout id (the engine drives it
        once ``start_engine`` has been called)."""
        out = await self.ctx.store.call(rollouts.start_rollout, self.ctx.store, request)
        self.engine.wake()
        return str(out["id"])

    async def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        status: dict[str, Any] = await self.ctx.store.call(rollouts.get_status, self.ctx.store, rollout_id)
        return status

    async def wait_rollout(self, rollout_id: str, *statuses: str,
                           until: Callable[[dict[str, Any]], bool] | None = None,
                           timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the rollout's status is one of ``statuses`` (or ``until(status)`` holds); its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.rollout_status(rollout_id)
            if status["status"] in statuses or (until is not None and until(status)):
                return status
            if time.monotonic() > deadline:
                raise FleetError(f"rollout {rollout_id} still {status['status']} after {timeout:g} s",
                                 hint="see the rollout's nodes (`fleetctl rollout status ID`) and the log")
            await asyncio.sleep(0.05)

    async def verify(self, hosts: Sequence[str], *, mode: str = "quick", timeout: float = 60.0) -> dict[str, str]:
        """``fleetctl verify HOSTS``: one verify job per node, recorded and judged by the controller before this
        returns; {hostname: job id}."""
        jobs = (await self.verification.submit(hosts, mode=mode)).jobs
        for job_id in jobs.values():
            await self.ctx.jobs.wait(job_id, timeout=timeout)
        await self.verification.idle(timeout)
        return jobs

    async def close(self) -> None:
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(a.stop() for a in self.agents.values()))
        self.verification.close()
        self.ctx.registry.flush()
        self.ctx.close()


class FleetThread:
    """A ``FakeFleet`` on an event loop of its own thread, for synchronous callers: ``call(coroutine)`` runs a
    coroutine of the fleet there and returns its result. ``with`` closes the fleet and ends the thread."""

    def __init__(self, fleet: FakeFleet | None = None, *, state_dir: Path | None = None, **create: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-fleet", daemon=True)
        self._thread.start()
        if fleet is None:
            assert state_dir is not None, "give a FakeFleet or a state_dir"
            fleet = self.call(self._create(state_dir, create))
        self.fleet = fleet

    @staticmethod
    async def _create(state_dir: Path, create: Mapping[str, Any]) -> FakeFleet:
        return FakeFleet.create(state_dir, **create)  # on the fleet's loop: the registry belongs to it

    def call(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float | None = 300.0) -> T:
        async def run() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def __enter__(self) -> FleetThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(concurrent.futures.TimeoutError):
            self.call(self.fleet.close(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread (the dashboard for a browser)."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=3, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard-server", daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise FleetError("the dashboard server did not start within 15 s",
                                 hint="see the uvicorn messages above")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        close_dashboard(self.app)  # ends the dashboard's event streams, so open browsers don't hold the server
        self.server.should_exit = True
        self.thread.join(timeout=10)
