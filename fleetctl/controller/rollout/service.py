"""Rollout operations behind the HTTP API: plan (dry run), start, status, list, pause, resume, abort, rollback.

Everything here is a short DB transaction; the engine (``controller.rollout.engine``) does the work.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleetctl.controller import attention
from fleetctl.controller.audit import audit
from fleetctl.controller.audit import entries as audit_entries_of
from fleetctl.controller.catalog import default_catalog
from fleetctl.controller.leases import Lease
from fleetctl.controller.local_wheels import catalog_wheel_name, controller_catalog, local_wheel_entries
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.provisioning import Availability, NodeNeeds, Provisioner, plan_env
from fleetctl.controller.registry import NodeRecord, record_of, selection_info
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.resolver.model import PREFER, WORKLOADS
from fleetctl.controller.rollout.core import (
    ACTIVE_ROLLOUT,
    MANUAL_CAUSE,
    OPT_OUT_CAUSE,
    OPT_OUT_LABEL,
    TERMINAL,
    BuildStatus,
    Hold,
    NodePlan,
    Progress,
    RolloutStatus,
    State,
    check_webhook_url,
    choose_canaries,
    describe_target,
    group_builds,
    manual_commands,
    opted_out,
    parse_batches,
    parse_budget,
    parse_duration,
    parse_max_unavailable,
    parse_selector,
    parse_window,
    progress,
    redact_url,
    schedule_batches,
    select_nodes,
    shared_env_installers,
)
from fleetctl.controller.rollout.engine import record, rollout_lease
from fleetctl.controller.rollout.models import Build, Rollout, RolloutNode, RolloutTransition
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Job, Node
from fleetctl.fleet.errors import ConflictError, NotFoundError, StaleFactsError, UsageError
from fleetctl.fleet.workload import BusyPolicy

_create_lock = threading.Lock()
MAX_PARALLEL_DEFAULT = 50


@dataclass(frozen=True)
class RolloutRequest:
    version: str | None = None
    nodes: str | None = None
    canary: int | None = None
    batch: str | None = None
    max_parallel: int | None = None
    max_failures: str | None = None
    dry_run: bool = False
    step_timeouts: Mapping[str, int] = field(default_factory=dict)
    min_free_bytes: int | None = None
    builders: tuple[str, ...] = ()  # dedicated builder hosts (one per build key)
    verify_mode: str | None = None  # the verify step's bench mode: quick (default) | full
    busy: BusyPolicy = field(default_factory=BusyPolicy)  # --when-busy/--busy-timeout/--gpus (fleet/workload.py)
    fa3: bool = False  # --fa3: FA3 (hopper/) source builds on Hopper nodes
    fa4: bool = False  # --fa4: flash-attn-4 where it runs
    source_builds: bool = True  # False: never compile on a node (wheels or nothing)
    prefer: str = "compatible"  # --prefer fastest: the measured fastest implementation the node may install
    workload: str = "training"  # what "fastest" reads: training | prefill | decode
    actor: str = "admin"  # who authenticated (the audit actor)
    on_behalf_of: str | None = None  # the name the client claimed, when it differs (an audit detail only)
    # maintenance policy (docs/rollout.md, "Maintenance"): out-of-service limit, windows, approval, bake time
    max_unavailable: str | None = None  # N | P% of the rollout's nodes offline, degraded or in a step
    windows: tuple[str, ...] = ()  # "Sat 02:00-06:00 [ZONE]": new nodes start only inside one
    window_zone: str = "UTC"  # the zone of windows that name none
    pause_after_canary: bool = False  # awaiting-approval after the canary batch, until `rollout approve`
    bake_time: str | None = None  # hold the next batch this long after a batch finishes (30m, 1h)
    notify_webhooks: tuple[str, ...] = ()  # POST a JSON notification on pause, failure, completion

    def maintenance_options(self, has_canaries: bool) -> dict[str, Any]:
        """The maintenance policy as stored in ``rollouts.options`` (``core.Maintenance.from_options`` reads it),
        each value checked: a bad one is a UsageError naming the flag, and nothing is stored."""
        out: dict[str, Any] = {}
        limit = parse_max_unavailable(self.max_unavailable)
        if limit is not None:
            out["max_unavailable"] = str(limit)
        if self.windows:
            out["windows"] = [parse_window(w, self.window_zone).text for w in self.windows]
            out["window_zone"] = self.window_zone
        if self.pause_after_canary:
            if not has_canaries:
                raise UsageError("--pause-after-canary needs a canary batch, and this rollout has none",
                                 hint="drop --canary 0 (or give --canary N), or leave out --pause-after-canary")
            out["pause_after_canary"] = True
        if self.bake_time:
            out["bake_seconds"] = parse_duration(self.bake_time)
        if self.notify_webhooks:
            out["notify_webhooks"] = [check_webhook_url(u) for u in self.notify_webhooks]
        return out

    def policy(self, version: str) -> Policy:
        if self.prefer not in PREFER or self.workload not in WORKLOADS:
            raise UsageError(f"prefer {self.prefer!r} / workload {self.workload!r} is not known",
                             hint=f"prefer: {', '.join(PREFER)}; workload: {', '.join(WORKLOADS)}")
        return Policy(version=Policy.check_version(version), fa3=self.fa3, fa4=self.fa4,
                      source_builds=self.source_builds, prefer=self.prefer, workload=self.workload)


@dataclass
class PlannedNode:
    plan: NodePlan
    decision: dict[str, Any]
    python: str | None
    previous: dict[str, Any] | None
    apt_errors: list[str]
    skip_reason: str | None = None
    artifact_url: str | None = None
    node: dict[str, Any] = field(default_factory=dict)  # facts the playbooks need (driver, toolkit, simulated)
    batch: int = -1
    canary: bool = False
    preflight: list[dict[str, Any]] = field(default_factory=list)  # where each artifact will come from

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {"hostname": p.hostname, "gpu": p.gpu, "variant": p.variant, "version": p.version,
                "steps": list(p.steps), "build_key": p.build_key, "artifact": p.artifact,
                "build_minutes": p.build_minutes, "reasons": list(p.reasons), "decision": self.decision,
                "python": self.python, "apt_errors": self.apt_errors, "artifact_url": self.artifact_url,
                "preflight": self.preflight, **self.node}


@dataclass
class RolloutPlan:
    version: str
    selector: str
    nodes: list[PlannedNode]
    batches: list[list[str]]
    canaries: list[str]
    builders: dict[str, str]
    reused_builds: dict[str, str]
    options: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        minutes = {n.plan.build_key: n.plan.build_minutes for n in self.nodes if n.plan.build_key}
        every = sum(n.plan.build_minutes for n in self.nodes if n.plan.builds and n.skip_reason is None)
        once = sum(minutes[k] for k in self.builders)
        return {
            "version": self.version, "target": describe_target(self.version, self.options.get("policy")),
            "selector": self.selector, "options": self.options,
            "canaries": self.canaries, "batches": self.batches,
            "builds": [{"build_key": k, "builder": h,
                        "waiting": sorted(n.plan.hostname for n in self.nodes
                                          if n.plan.build_key == k and n.plan.hostname != h and n.skip_reason is None),
                        "estimated_minutes": minutes.get(k, 0)} for k, h in sorted(self.builders.items())],
            "reused_builds": self.reused_builds,
            "build_minutes": {"once_per_key": once, "on_every_node": every},
            "nodes": [{**n.to_json(), "batch": n.batch, "canary": n.canary, "skip": n.skip_reason}
                      for n in self.nodes],
        }



def plan_rollout(store: Store, req: RolloutRequest, *, state_dir: Path | None = None,
                 catalog: Any = None, provisioner: Provisioner | None = None) -> RolloutPlan:
    """Select, resolve and schedule, without writing anything. With ``provisioner`` (a controller's), each
    real node's plan says where its artifacts will come from (preflight), and a node whose artifacts cannot be
    had is skipped with the command that fixes it."""
    selector = parse_selector(req.nodes)
    sizes = parse_batches(req.batch)
    budget = parse_budget(req.max_failures)
    if req.max_parallel is not None and req.max_parallel < 1:
        raise UsageError(f"--max-parallel {req.max_parallel} must be at least 1", hint="e.g. --max-parallel 10")
    catalog = catalog if catalog is not None else default_catalog(state_dir)
    releases: Sequence[str] = catalog.releases
    version = req.version or catalog.newest_release
    if version is None:
        raise NotFoundError("the wheel catalog lists no FlashAttention 2 release",
                            hint="add a catalog (`fleetctl catalog`)")
    if version not in releases:
        shown = ", ".join(list(releases)[-15:])
        raise NotFoundError(f"flash-attn {version} is not in the catalog",
                            hint=f"known releases: {shown} (pick one with --version)")
    policy = req.policy(version)
    with store.session() as s:
        every = [record_of(r) for r in s.scalars(select(Node))]
        chosen = {n.hostname for n in select_nodes(selector, [selection_info(r) for r in every])}
        rows = sorted((r for r in every if r.hostname in chosen), key=lambda r: r.hostname)
        builds_done = {b.build_key: b.artifact_filename or b.artifact_sha256 or "" for b in
                       s.scalars(select(Build).where(Build.status == BuildStatus.SUCCEEDED))}
        # wheels our source builds put in the artifact store: the resolver picks them like upstream wheels
        local = local_wheel_entries(s)
        if local:
            catalog = catalog.with_local_wheels(local)
        measured = _measured(s, rows, catalog, policy)
    local_sha = {e["filename"]: e["sha256"] for e in local}
    planned = [plan_node(row, catalog, policy, version, local_sha, provisioner,
                          built=set(builds_done), measured=measured.get(row.hostname)) for row in rows]
    active = [p for p in planned if p.skip_reason is None]

    canaries = choose_canaries([p.plan for p in active], req.canary)
    batches = schedule_batches([p.plan.hostname for p in active], sizes, canaries)
    needing = [p.plan for p in active if p.plan.builds and p.plan.build_key not in builds_done]
    dedicated = _dedicated_builders(req.builders, needing, planned)
    for host, key in ((h, k) for k, h in dedicated.items()):
        # a dedicated builder runs in the earliest batch holding its key, so nobody waits on a later batch
        first = min(i for i, b in enumerate(batches) for h in b
                    if next(x for x in active if x.plan.hostname == h).plan.build_key == key)
        for b in batches:
            if host in b:
                b.remove(host)
        batches[first].append(host)
        batches[first].sort()
    batches = [b for b in batches if b]
    for i, b in enumerate(batches):
        for h in b:
            p = next(x for x in planned if x.plan.hostname == h)
            p.batch, p.canary = i, h in canaries
    # a target env several nodes share (a venv on NFS) is installed once, by the first of them; the others only
    # verify, after it (the engine waits for the installer: NodeSnapshot.after)
    installing = [p.plan.hostname for p in active if {"install-wheel", "build-from-source"} & set(p.plan.steps)]
    shared = shared_env_installers({p.plan.hostname: p.node.get("env_key") for p in active}, installing, batches)
    for p in active:
        if p.plan.hostname in shared:
            p.plan = replace(p.plan, steps=("verify",), build_key=None, build_minutes=0.0)
            p.node["shared_env"] = {"installer": shared[p.plan.hostname], "env": p.node.get("env_key")}
    needing = [n for n in needing if n.hostname not in shared]
    builders = group_builds(needing, batches, dedicated)
    reused = {p.plan.build_key: builds_done[p.plan.build_key] for p in active
              if p.plan.builds and p.plan.build_key in builds_done and p.plan.build_key}
    options = {"batch": ",".join(str(x) for x in sizes), "canary": req.canary, "canary_batch": bool(canaries),
               "max_failures": str(budget), "max_parallel": req.max_parallel or MAX_PARALLEL_DEFAULT,
               "step_timeouts": dict(req.step_timeouts)}
    if req.min_free_bytes is not None:
        options["min_free_bytes"] = req.min_free_bytes
    if req.verify_mode:
        options["verify_mode"] = req.verify_mode
    options["busy_policy"] = req.busy.to_vars()  # what each disturbing step's agent does when its GPUs are busy
    # what the failed nodes are re-planned with on `resume --retry-failed`
    policy_options: dict[str, Any] = {"fa3": req.fa3, "fa4": req.fa4, "source_builds": req.source_builds,
                                      "prefer": req.prefer, "workload": req.workload}
    options["policy"] = policy_options
    options.update(req.maintenance_options(bool(canaries)))
    return RolloutPlan(version, selector.text, planned, batches, canaries, builders, reused, options)


def _measured(s: Session, nodes: Sequence[NodeRecord], catalog: Any, policy: Any) -> dict[str, Any]:
    """Per node, the attention ranking ``--prefer fastest`` plans from (controller/attention.py)."""
    if policy.prefer != "fastest":
        return {}
    out: dict[str, Any] = {}
    for node in nodes:
        if node.facts is not None and node.facts.gpus:  # unreadable facts: plan_node skips the node, says why
            out[node.hostname] = attention.measurements_for(s, node.facts, node.simulated, catalog, policy.workload)
    return out


def plan_node(row: NodeRecord, catalog: Any, policy: Any, version: str, local_sha: Mapping[str, str],
              provisioner: Provisioner | None, *, built: set[str], measured: Any = None) -> PlannedNode:
    """One node's rollout plan from its current facts (at start, and again when a failed node is retried)."""
    info = selection_info(row)
    facts = row.facts
    opt_out = f"{OPT_OUT_CAUSE}: the node is labelled {OPT_OUT_LABEL}=true" if opted_out(row.labels) else None
    if facts is None:
        return PlannedNode(NodePlan(row.hostname, "blocked", (), gpu=info.gpu or ""), {}, None, None, [],
                           skip_reason=opt_out or row.facts_error)
    d = resolve(facts, catalog, policy, measured)
    build = d.build
    np = NodePlan(hostname=row.hostname, variant=d.variant, steps=tuple(d.steps), gpu=info.gpu or "",
                  version=d.flash_attn_version, build_key=build.build_key if build else None,
                  artifact=d.artifact, build_minutes=float(build.estimated_minutes) if build else 0.0,
                  reasons=tuple(d.reasons))
    skip = None
    if opt_out:  # the operator's word wins over every plan
        skip = opt_out
    elif d.execution is not None and d.commands:  # a plan for a person (Windows): its node shows the commands
        skip = (f"{MANUAL_CAUSE} — {len(d.commands)} commands for {d.variant} {d.flash_attn_version}, listed with "
                f"this node by `fleetctl rollout status` and on the rollout page ({d.execution})")
    elif np.skipped:
        skip = f"{d.variant}: {d.reasons[0] if d.reasons else 'nothing to install'}"
    elif row.status is NodeStatus.OFFLINE:
        skip = f"node offline at rollout start (last seen {row.last_seen.isoformat() if row.last_seen else '?'})"
    previous = facts.flash_attn.__dict__.copy() if facts.flash_attn else None
    decision = d.to_json()
    if build is not None and d.variant == "fa2-source" and isinstance(decision.get("build"), dict):
        # how the built wheel is found again (controller/local_wheels.py)
        decision["build"].update(wheel_name=catalog_wheel_name(facts, version), glibc=facts.os.glibc)
    extra = row.extra
    executor = extra.get("executor")  # reported by the agent (agent/commands/run.py `labelled`)
    if not isinstance(executor, str):  # an older agent: simulated nodes ran the simulated executor, rehearsals not
        executor = "ansible" if not row.simulated or extra.get("rehearsal") else "simulated"
    node: dict[str, Any] = {"simulated": row.simulated, "executor": executor,
                            "driver_cuda_max": facts.driver.cuda_max if facts.driver else None,
                            "toolkit_path": facts.toolkit.path if facts.toolkit else None,
                            "target_version": version, "target_env": plan_env(facts),
                            "env_key": facts.python.shared_env_key,
                            "torch_cuda": facts.torch.cuda if facts.torch else None}
    if d.artifact and d.artifact in local_sha:
        node["artifact_sha256"] = local_sha[d.artifact]  # in our artifact store: the agent fetches it by sha256
    planned = PlannedNode(np, decision, facts.python.executable, previous,
                          list(facts.apt.errors) if facts.apt else [], skip, d.artifact_url, node)
    if provisioner is not None and skip is None and executor == "ansible" and not np.skipped:
        items = provisioner.preflight(NodeNeeds.from_plan(planned.to_json()), builds=np.builds,
                                      built=bool(np.build_key and np.build_key in built))
        planned.preflight = [i.to_json() for i in items]
        missing = [i for i in items if i.availability == Availability.MISSING]
        if missing:
            planned.skip_reason = (f"artifacts cannot be had: {', '.join(i.name for i in missing)} "
                                   f"(controller {provisioner.upstream.config.describe()}) — {missing[0].fix}")
    return planned


def _dedicated_builders(hosts: Sequence[str], needing: Sequence[NodePlan],
                        planned: Sequence[PlannedNode]) -> dict[str, str]:
    """``--builder HOST,…``: each host builds the wheel of its own build key (it must be selected and
    need a build)."""
    out: dict[str, str] = {}
    by_host = {p.hostname: p for p in needing}
    for host in hosts:
        plan = by_host.get(host)
        if plan is None or plan.build_key is None:
            known = next((x for x in planned if x.plan.hostname == host), None)
            why = "is not in the selection" if known is None else (
                f"does not build here ({known.plan.variant}{', ' + known.skip_reason if known.skip_reason else ''})")
            raise UsageError(f"--builder {host} {why}",
                             hint="name a selected node whose plan builds from source (see --dry-run)")
        if plan.build_key in out:
            raise UsageError(f"--builder {host} and {out[plan.build_key]} share one build key",
                             hint="one builder per build key")
        out[plan.build_key] = host
    return out


def _new_id() -> str:
    return f"r-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def start_rollout(store: Store, req: RolloutRequest, *, state_dir: Path | None = None,
                  catalog: Any = None, provisioner: Provisioner | None = None) -> dict[str, Any]:
    """Plan and persist a rollout (the engine picks it up). Refuses nodes already in an active rollout."""
    plan = plan_rollout(store, req, state_dir=state_dir, catalog=catalog, provisioner=provisioner)
    # real nodes only: a simulated executor changes its facts in the same step (agent/simexec.py)
    _refuse_stale_facts(store, [p.plan.hostname for p in plan.nodes
                                if p.skip_reason is None and p.node.get("executor") == "ansible"])
    if req.dry_run:
        return {"dry_run": True, **plan.to_json()}
    hosts = [p.plan.hostname for p in plan.nodes]
    with _create_lock, store.session() as s:
        # PostgreSQL: lock the selected nodes' rows so two controllers can't both pass the overlap check
        s.execute(select(Node.id).where(Node.hostname.in_(hosts)).with_for_update()).all()
        clash = s.execute(select(RolloutNode.rollout_id, RolloutNode.hostname)
                          .join(Rollout, Rollout.id == RolloutNode.rollout_id)
                          .where(Rollout.status.in_(ACTIVE_ROLLOUT), RolloutNode.hostname.in_(hosts))).all()
        if clash:
            ids = sorted({c[0] for c in clash})
            shown = ", ".join(sorted(c[1] for c in clash)[:8])
            raise ConflictError(f"{len(clash)} selected node(s) already in active rollout {', '.join(ids)}: {shown}",
                                hint=f"wait for it, or `fleetctl rollout abort {ids[0]}`; or narrow --nodes")
        now = utcnow()
        rid = _new_id()
        s.add(Rollout(id=rid, version=plan.version, selector=plan.selector, options=plan.options,
                      status=RolloutStatus.RUNNING, reason="", created_by=req.actor, created_at=now,
                      updated_at=now, finished_at=None, current_batch=0, batches=len(plan.batches), canary_ack=False))
        s.flush()
        for p in plan.nodes:
            row = RolloutNode(rollout_id=rid, hostname=p.plan.hostname, batch=p.batch, canary=p.canary,
                              plan=p.to_json(), previous=p.previous, build_key=p.plan.build_key,
                              state=str(State.PLANNED), attempt=1, cause="planned", result={}, updated_at=now)
            s.add(row)
            s.add(RolloutTransition(rollout_id=rid, hostname=p.plan.hostname, from_state="", to_state="planned",
                                    at=now, cause=f"{p.plan.variant}: {', '.join(p.plan.steps) or 'no steps'}",
                                    actor=req.actor))
            if p.skip_reason:
                record(s, rid, row, State.SKIPPED, p.skip_reason, actor=req.actor)
        for key, builder in plan.builders.items():
            b = s.get(Build, key)
            params = next((p.decision.get("build") or {}) for p in plan.nodes if p.plan.build_key == key)
            if b is None:
                s.add(Build(build_key=key, status=BuildStatus.PENDING, rollout_id=rid, builder=builder, params=params,
                            created_at=now, attempts=0))
            elif (b.status in (BuildStatus.FAILED, BuildStatus.PENDING) or b.rollout_id is None
                  or not _rollout_active(s, b.rollout_id)):
                b.status, b.builder, b.rollout_id, b.error, b.params = BuildStatus.PENDING, builder, rid, None, params
    audit(store, req.actor, "rollout.start", rid, version=plan.version, selector=plan.selector,
          nodes=len(hosts), options=public_options(plan.options), **_claimed(req.on_behalf_of))
    return {"id": rid, **plan.to_json()}


#: jobs that change what a node has installed: its facts must be newer than the last of them to plan from them
_CHANGING_JOBS = ("install-wheel", "build-from-source", "rollback", "cuda-toolkit", "apt-keyring-fix")


def _refuse_stale_facts(store: Store, hosts: Sequence[str]) -> None:
    """A node whose last install/rollback finished after its last facts report would be planned from what it
    had before (e.g. "already installed: only verify" right after a rollback removed it): refuse, saying when
    to retry (``fleetctl rollout flash-attn`` waits and retries by itself)."""
    if not hosts:
        return
    with store.session() as s:
        last_job = dict(s.execute(select(Job.node, func.max(Job.finished_at))
                                  .where(Job.node.in_(hosts), Job.kind.in_(_CHANGING_JOBS),
                                         Job.finished_at.is_not(None)).group_by(Job.node)).all())
        reported = dict(s.execute(select(Node.hostname, Node.facts_updated_at).where(Node.hostname.in_(hosts))).all())
    stale = sorted(h for h, done in last_job.items()
                   if done is not None and reported.get(h) is not None and _aware(reported[h]) < _aware(done))
    if stale:
        raise StaleFactsError(f"the facts of {', '.join(stale[:5])}{' …' if len(stale) > 5 else ''} predate their "
                              f"last install or rollback: a plan now would be made from what they had before",
                              hint="their agents report fresh facts on the next heartbeat (10 s by default): retry "
                                   "then (`fleetctl rollout flash-attn` waits and retries by itself)")


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _rollout_active(s: Session, rid: str) -> bool:
    r = s.get(Rollout, rid)
    return r is not None and r.status in ACTIVE_ROLLOUT


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def _get(s: Session, rid: str | None) -> Rollout:
    if rid is None:
        r = s.scalar(select(Rollout).order_by(Rollout.created_at.desc()).limit(1))
        if r is None:
            raise NotFoundError("no rollout yet", hint="start one: `fleetctl rollout flash-attn`")
        return r
    r = s.get(Rollout, rid)
    if r is None:
        raise NotFoundError(f"no rollout {rid!r}", hint="see `fleetctl rollout list`")
    return r


def rollout_builds(s: Session, build_keys: Sequence[str | None]) -> list[Build]:
    """The builds of these keys (a rollout's nodes', in their scheduled order), once each, in that order."""
    keys = list(dict.fromkeys(k for k in build_keys if k))
    found = {b.build_key: b for b in s.scalars(select(Build).where(Build.build_key.in_(keys)))} if keys else {}
    return [found[k] for k in keys if k in found]


def rollout_json(s: Session, r: Rollout, *, since: int | None = None) -> dict[str, Any]:
    nodes = list(s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == r.id)
                           .order_by(RolloutNode.batch, RolloutNode.hostname)))
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.state] = counts.get(n.state, 0) + 1
    builds = rollout_builds(s, [n.build_key for n in nodes])
    tq = select(RolloutTransition).where(RolloutTransition.rollout_id == r.id).order_by(RolloutTransition.id)
    if since is not None:
        tq = tq.where(RolloutTransition.id > since)
    transitions = list(s.scalars(tq.limit(5000)))
    by_batch: dict[int, dict[str, int]] = {}
    for n in nodes:
        if n.batch >= 0:  # a node skipped at the start is in no batch
            in_batch = by_batch.setdefault(n.batch, {})
            in_batch[n.state] = in_batch.get(n.state, 0) + 1
    opts = r.options or {}
    budget = parse_budget(opts.get("max_failures"))
    total = sum(1 for n in nodes if n.state != State.SKIPPED)
    return {
        "id": r.id, "version": r.version, "target": describe_target(r.version, opts.get("policy")),
        "selector": r.selector, "status": r.status, "reason": r.reason,
        "created_by": r.created_by, "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at),
        "finished_at": _iso(r.finished_at), "current_batch": r.current_batch, "batches": r.batches,
        "options": public_options(opts), "counts": counts,
        "budget": {"max_failures": str(budget), "allowed": budget.allowed(total),
                   "failed": counts.get(State.FAILED, 0)},
        "progress": progress_json(progress(counts)),
        "batch_progress": [{"batch": k, **progress_json(progress(v))} for k, v in sorted(by_batch.items())],
        "builds": [{"build_key": b.build_key, "status": b.status, "builder": b.builder,
                    "artifact_sha256": b.artifact_sha256, "artifact_filename": b.artifact_filename,
                    "job_id": b.job_id, "error": b.error, "attempts": b.attempts} for b in builds],
        "nodes": [{"hostname": n.hostname, "batch": n.batch, "canary": n.canary, "state": n.state,
                   "step": n.step, "job_id": n.job_id, "in_step": n.step is not None and n.job_id is not None,
                   "step_started_at": _iso(n.step_started_at), "step_deadline": _iso(n.step_deadline),
                   "attempt": n.attempt, "cause": n.cause, "diagnosis": n.diagnosis,
                   "variant": n.plan.get("variant"), "gpu": n.plan.get("gpu"), "build_key": n.build_key,
                   "updated_at": _iso(n.updated_at),
                   "commands": manual_commands(n.plan or {})} for n in nodes],
        "transitions": [{"id": t.id, "hostname": t.hostname, "from": t.from_state, "to": t.to_state,
                         "at": t.at.isoformat(), "cause": t.cause, "job_id": t.job_id, "actor": t.actor}
                        for t in transitions],
        "active": r.status in ACTIVE_ROLLOUT,
        "leader": leader_json(s.get(Lease, rollout_lease(r.id))),
        "opted_out": [n.hostname for n in nodes if n.state == State.SKIPPED and n.cause.startswith(OPT_OUT_CAUSE)],
        # maintenance policy: why no new node starts now (window, bake, max-unavailable), and the approval
        "hold": r.hold if r.status == RolloutStatus.RUNNING else None,
        "waiting": hold_text(r),
        "approval": {"required": bool(opts.get("pause_after_canary")), "approved_by": r.approved_by,
                     "approved_at": _iso(r.approved_at)},
    }


def leader_json(lease: Lease | None) -> dict[str, Any] | None:
    """Which controller's engine drives the rollout: its lease's holder (``host:pid:nonce``), fencing token and expiry
    (database clock); None when no engine holds it (not started yet, released at the end)."""
    if lease is None or lease.holder is None:
        return None
    return {"holder": lease.holder, "token": lease.token, "expires_at": _iso(lease.expires_at)}


def public_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """A rollout's options as anyone who may read the rollout sees them: webhook URLs redacted (their paths are
    often secrets)."""
    out = dict(opts)
    if out.get("notify_webhooks"):
        out["notify_webhooks"] = [redact_url(u) for u in out["notify_webhooks"]]
    return out


def hold_text(r: Rollout) -> str | None:
    """``waiting for window (opens in 3h12m)``: why the engine starts no new node of ``r`` now, counted down to
    now; None when nothing holds it (the status JSON's ``waiting``, the rollout page)."""
    hold = Hold.from_json(r.hold) if r.status == RolloutStatus.RUNNING else None
    return hold.describe(utcnow()) if hold is not None else None


def progress_json(p: Progress) -> dict[str, Any]:
    """A ``Progress`` as the API shows it (``fleetctl rollout status`` and the dashboard read these numbers)."""
    return {"total": p.total, "done": p.done, "failed": p.failed, "skipped": p.skipped, "active": p.active,
            "finished": p.finished, "status": str(p.status)}


def get_status(store: Store, rid: str | None, *, since: int | None = None) -> dict[str, Any]:
    with store.session() as s:
        return rollout_json(s, _get(s, rid), since=since)


def list_rollouts(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = list(s.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)))
        out = []
        for r in rows:
            counts = dict(s.execute(select(RolloutNode.state, func.count()).where(RolloutNode.rollout_id == r.id)
                                    .group_by(RolloutNode.state)).all())
            out.append({"id": r.id, "version": r.version, "selector": r.selector, "status": r.status,
                        "reason": r.reason, "created_by": r.created_by, "created_at": _iso(r.created_at),
                        "finished_at": _iso(r.finished_at), "counts": counts})
        return out


def node_rollouts(s: Session, hostname: str, limit: int = 20) -> list[dict[str, Any]]:
    """The rollouts ``hostname`` took part in, newest first: the rollout's status and this node's own state
    there (``done``, ``failed``, ...), variant, step, cause and attempt. ``fleetctl node`` and the node page."""
    rows = s.execute(select(RolloutNode, Rollout).join(Rollout, Rollout.id == RolloutNode.rollout_id)
                     .where(RolloutNode.hostname == hostname)
                     .order_by(Rollout.created_at.desc()).limit(limit)).all()
    return [{"rollout_id": r.id, "version": r.version, "rollout_status": r.status, "created_at": _iso(r.created_at),
             "finished_at": _iso(r.finished_at), "state": n.state, "variant": (n.plan or {}).get("variant"),
             "steps": list((n.plan or {}).get("steps") or []), "step": n.step, "job_id": n.job_id,
             "attempt": n.attempt, "cause": n.cause, "build_key": n.build_key, "updated_at": _iso(n.updated_at)}
            for n, r in rows]


def audit_entries(store: Store, rid: str) -> list[dict[str, Any]]:
    with store.session() as s:
        return [{k: v for k, v in e.to_json().items() if k != "target"} for e in audit_entries_of(s, target=rid)]


def _store(target: Any) -> Store:
    """Accept a Store or anything carrying one (the ControllerContext, as the dashboard passes)."""
    store: Store = target if isinstance(target, Store) else target.store
    return store


def _claimed(on_behalf_of: str | None) -> dict[str, Any]:
    """The audit detail for a name the client claimed to act for (never the actor: controller/rollout/api.py)."""
    return {"on_behalf_of": on_behalf_of} if on_behalf_of else {}


def pause(target: Store | Any, rid: str, actor: str, *, on_behalf_of: str | None = None) -> dict[str, Any]:
    store = _store(target)
    with store.session() as s:
        r = _get(s, rid)
        if r.status != RolloutStatus.RUNNING:
            raise ConflictError(f"rollout {r.id} is {r.status}, not running", hint="only a running rollout pauses")
        r.status, r.reason, r.updated_at = RolloutStatus.PAUSED, f"paused by {actor}", utcnow()
    audit(store, actor, "rollout.pause", rid, **_claimed(on_behalf_of))
    return get_status(store, rid)


def resume(target: Store | Any, rid: str, actor: str, *, retry_failed: bool = False,
           max_failures: str | None = None, state_dir: Path | None = None,
           provisioner: Provisioner | None = None, on_behalf_of: str | None = None) -> dict[str, Any]:
    """Resume a paused rollout. ``retry_failed``: failed nodes are re-planned from their current facts with the
    current catalog and artifact store (a wheel added since, a fixed upstream, a repaired node all count) and
    start again. A finished ``partial`` rollout resumes too, with ``retry_failed`` only (its failed nodes are
    all there is to do; a node that came back after the end, say): it runs again until those nodes finish.
    Failed nodes a later rollout has taken on are not retried here."""
    store = _store(target)
    with store.session() as s:
        r = _get(s, rid)
        if r.status == RolloutStatus.PARTIAL and not retry_failed:
            raise ConflictError(f"rollout {r.id} is partial: it finished, and only its failed nodes are left",
                                hint=f"`fleetctl rollout resume {r.id} --retry-failed` retries them")
        if r.status == RolloutStatus.AWAITING_APPROVAL:
            raise ConflictError(f"rollout {r.id} is awaiting approval after its canary batch",
                                hint=f"`fleetctl rollout approve {r.id}` lets the next batches start")
        if r.status not in (RolloutStatus.PAUSED, RolloutStatus.PARTIAL):
            raise ConflictError(f"rollout {r.id} is {r.status}, not paused",
                                hint="only a paused rollout resumes (a partial one with --retry-failed)")
        if r.status == RolloutStatus.PARTIAL:
            _refuse_if_taken_over(s, r)
        opts = dict(r.options or {})
        if max_failures is not None:
            opts["max_failures"] = str(parse_budget(max_failures))
        nodes = list(s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == r.id)))
        retried = 0
        failed_nodes = [n for n in nodes if n.state in (State.FAILED, State.SKIPPED_BUSY)] if retry_failed else []
        if r.status == RolloutStatus.PARTIAL:
            failed_nodes = [n for n in failed_nodes if not _in_newer_rollout(s, r, n)]
        replans = _replan(s, r, failed_nodes, state_dir, provisioner) if failed_nodes else {}
        for n in failed_nodes:
            fresh = replans.get(n.hostname)
            cause = f"retry requested by {actor}"
            if fresh is not None:
                if fresh.skip_reason:
                    n.cause = f"{n.cause} — not retried: {fresh.skip_reason}"
                    continue
                changed = _adopt_plan(n, fresh)
                cause += f", re-planned: {changed}" if changed else ", plan unchanged"
            record(s, r.id, n, State.PLANNED, cause, actor=actor)
            n.attempt += 1
            n.diagnosis = None
            retried += 1
            if n.build_key:
                b = s.get(Build, n.build_key)
                if b is None:
                    s.add(Build(build_key=n.build_key, status=BuildStatus.PENDING, rollout_id=r.id, builder=n.hostname,
                                params=(n.plan.get("decision") or {}).get("build") or {}, created_at=utcnow(),
                                attempts=0))
                    s.flush()
                elif b.status == BuildStatus.FAILED:
                    b.status, b.builder, b.error, b.rollout_id = BuildStatus.PENDING, n.hostname, None, r.id
        failed = sum(1 for n in nodes if n.state == State.FAILED)
        total = sum(1 for n in nodes if n.state != State.SKIPPED)
        budget = parse_budget(opts.get("max_failures"))
        if failed > budget.allowed(total):
            raise ConflictError(f"rollout {r.id} would pause again at once: {failed} failed, "
                                f"--max-failures {budget} allows {budget.allowed(total)}",
                                hint=f"raise the budget (`fleetctl rollout resume {r.id} --max-failures N`) or "
                                     f"retry the failed nodes (`--retry-failed`)")
        r.options = opts
        r.canary_ack = True
        if r.status == RolloutStatus.PARTIAL and not retried:
            raise ConflictError(f"rollout {r.id}: no failed node to retry (each is done, re-planned as skipped, or "
                                f"taken on by a later rollout)", hint=f"`fleetctl rollout status {r.id}` shows why")
        r.status, r.reason, r.updated_at = RolloutStatus.RUNNING, f"resumed by {actor}", utcnow()
        r.finished_at = None
    audit(store, actor, "rollout.resume", rid, retry_failed=retried, max_failures=max_failures,
          **_claimed(on_behalf_of))
    return get_status(store, rid)


def approve(target: Store | Any, rid: str, actor: str, *, on_behalf_of: str | None = None) -> dict[str, Any]:
    """Let a rollout that awaits approval after its canary batch (``--pause-after-canary``) go on; who approved
    is kept on the rollout and in the audit log."""
    store = _store(target)
    with store.session() as s:
        r = _get(s, rid)
        if r.status != RolloutStatus.AWAITING_APPROVAL:
            raise ConflictError(f"rollout {r.id} is {r.status}, not awaiting approval",
                                hint="only a rollout started with --pause-after-canary, once its canary batch has "
                                     f"finished, is approved (`fleetctl rollout status {r.id}`)")
        now = utcnow()
        r.approved_by, r.approved_at = actor[:128], now
        r.status, r.reason, r.updated_at = RolloutStatus.RUNNING, f"approved by {actor}", now
    audit(store, actor, "rollout.approve", rid, **_claimed(on_behalf_of))
    return get_status(store, rid)


def _refuse_if_taken_over(s: Session, r: Rollout) -> None:
    """A finished rollout's nodes may be in an active one now: running both would fight over them."""
    clash = s.execute(select(RolloutNode.rollout_id).join(Rollout, Rollout.id == RolloutNode.rollout_id)
                      .where(Rollout.status.in_(ACTIVE_ROLLOUT), Rollout.id != r.id,
                             RolloutNode.hostname.in_(select(RolloutNode.hostname)
                                                      .where(RolloutNode.rollout_id == r.id,
                                                             RolloutNode.state == str(State.FAILED))))
                      .limit(1)).first()
    if clash:
        raise ConflictError(f"failed nodes of {r.id} are in active rollout {clash[0]}",
                            hint=f"let {clash[0]} finish (or abort it), then retry")


def _in_newer_rollout(s: Session, r: Rollout, n: RolloutNode) -> bool:
    """``n``'s host is in a rollout started after ``r`` (its cause says so): retrying it here would undo that."""
    newer = s.scalar(select(Rollout.id).join(RolloutNode, RolloutNode.rollout_id == Rollout.id)
                     .where(RolloutNode.hostname == n.hostname, Rollout.created_at > r.created_at).limit(1))
    if newer is not None:
        n.cause = f"{n.cause[:3000]} — not retried: rollout {newer} has taken this node on since"
    return newer is not None


def _replan(s: Session, r: Rollout, failed: Sequence[RolloutNode], state_dir: Path | None,
            provisioner: Provisioner | None) -> dict[str, PlannedNode]:
    """Fresh plans for ``failed`` nodes: their current facts, the catalog and store now, the rollout's policy."""
    catalog = controller_catalog(s, state_dir)
    local_sha = {e["filename"]: e["sha256"] for e in local_wheel_entries(s)}
    built = {b.build_key for b in s.scalars(select(Build).where(Build.status == BuildStatus.SUCCEEDED))}
    pol = (r.options or {}).get("policy") or {}
    req = RolloutRequest(fa3=bool(pol.get("fa3")), fa4=bool(pol.get("fa4")),
                         source_builds=bool(pol.get("source_builds", True)),
                         prefer=str(pol.get("prefer", "compatible")), workload=str(pol.get("workload", "training")))
    policy = req.policy(r.version)
    rows = {row.hostname: record_of(row)
            for row in s.scalars(select(Node).where(Node.hostname.in_([n.hostname for n in failed])))}
    measured = _measured(s, list(rows.values()), catalog, policy)
    out: dict[str, PlannedNode] = {}
    for n in failed:
        row = rows.get(n.hostname)
        if row is not None:
            out[n.hostname] = plan_node(row, catalog, policy, r.version, local_sha, provisioner, built=built,
                                         measured=measured.get(n.hostname))
    return out


def _adopt_plan(n: RolloutNode, fresh: PlannedNode) -> str:
    """Put a fresh plan on a retried node; says what changed (for its transition's cause)."""
    old = n.plan or {}
    new = fresh.to_json()
    changes = [f"{k} {old.get(k)} → {new.get(k)}" for k in ("variant", "version", "artifact", "build_key")
               if old.get(k) != new.get(k)]
    n.plan, n.build_key = new, fresh.plan.build_key
    return ", ".join(changes)


def abort(target: Store | Any, rid: str, actor: str, *, on_behalf_of: str | None = None) -> dict[str, Any]:
    store = _store(target)
    with store.session() as s:
        r = _get(s, rid)
        if r.status not in (RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL):
            raise ConflictError(f"rollout {r.id} is {r.status}",
                                hint="only a running, paused or awaiting-approval rollout aborts")
        r.status, r.reason, r.updated_at = RolloutStatus.ABORTING, f"aborted by {actor}", utcnow()
    audit(store, actor, "rollout.abort", rid, **_claimed(on_behalf_of))
    return get_status(store, rid)


def rollback(target: Store | Any, rid: str, actor: str, *, on_behalf_of: str | None = None) -> dict[str, Any]:
    """Restore each touched node's previous flash-attn (rollback playbook). The rollout must be finished."""
    store = _store(target)
    with store.session() as s:
        r = _get(s, rid)
        if r.status in (RolloutStatus.RUNNING, RolloutStatus.ABORTING, RolloutStatus.ROLLING_BACK):
            raise ConflictError(f"rollout {r.id} is {r.status}",
                                hint=f"pause or abort it first (`fleetctl rollout abort {r.id}`), then roll back")
        if r.status == RolloutStatus.ROLLED_BACK:
            raise ConflictError(f"rollout {r.id} is already rolled back", hint="nothing to do")
        hosts = [n for n in s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == r.id))]
        clash = s.execute(select(RolloutNode.rollout_id, RolloutNode.hostname)
                          .join(Rollout, Rollout.id == RolloutNode.rollout_id)
                          .where(Rollout.status.in_(ACTIVE_ROLLOUT), Rollout.id != r.id,
                                 RolloutNode.hostname.in_([n.hostname for n in hosts]))).all()
        if clash:
            raise ConflictError(f"nodes of {r.id} are in active rollout {clash[0][0]}",
                                hint=f"abort {clash[0][0]} first")
        touched = 0
        for n in hosts:
            moved = [t for t in s.scalars(select(RolloutTransition).where(
                RolloutTransition.rollout_id == r.id, RolloutTransition.hostname == n.hostname,
                RolloutTransition.from_state.in_(("keyring", "toolkit", "build", "install", "verify"))))]
            st = State(n.state)
            if st not in TERMINAL and n.job_id is not None:
                raise ConflictError(f"node {n.hostname} is in the middle of {n.step} (job {n.job_id})",
                                    hint="wait for its step to finish (`fleetctl rollout status`), then roll back")
            if st in (State.DONE, State.FAILED) or (st in (State.SKIPPED, State.SKIPPED_BUSY) and moved):
                record(s, r.id, n, State.ROLLING_BACK, f"rollback requested by {actor}", actor=actor)
                touched += 1
            elif st not in TERMINAL:
                record(s, r.id, n, State.SKIPPED, f"rollback requested by {actor} before this node was touched",
                       actor=actor)
        r.status = RolloutStatus.ROLLING_BACK if touched else RolloutStatus.ROLLED_BACK
        r.reason, r.updated_at = f"rollback requested by {actor}", utcnow()
        r.finished_at = None if touched else r.updated_at
    audit(store, actor, "rollout.rollback", rid, nodes=touched, **_claimed(on_behalf_of))
    return get_status(store, rid)


def nodes_in_active_rollouts(store: Store) -> dict[str, str]:
    """hostname → rollout id, for every node an active rollout holds (not yet done/failed/skipped).
    Other components (scheduled or drift re-verification) should leave these nodes alone."""
    with store.session() as s:
        rows = s.execute(select(RolloutNode.hostname, RolloutNode.rollout_id, RolloutNode.state)
                         .join(Rollout, Rollout.id == RolloutNode.rollout_id)
                         .where(Rollout.status.in_(ACTIVE_ROLLOUT))).all()
    return {h: rid for h, rid, st in rows if State(st) not in TERMINAL}
