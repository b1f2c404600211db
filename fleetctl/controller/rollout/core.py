"""The pure core of a rollout: no I/O, no clock, no database — every function is table-tested.

* ``parse_selector`` / ``select_nodes``: ``--nodes SELECTOR`` (hostname globs, ``gpu=``, ``profile=``,
  ``status=``, comma lists; terms of the same kind are OR-ed, different kinds AND-ed) and the label selector
  ``-l`` (controller/labels.py), AND-ed with them; ``selection_text`` is the one text of both.
* ``choose_canaries``: default one node per distinct (GPU model, variant).
* ``parse_batches`` / ``schedule_batches``: ``--batch 1,5,25%`` → batch sizes.
* ``parse_budget`` / ``budget_exceeded``: ``--max-failures N|P%`` across the whole rollout.
* ``RolloutStatus`` / ``ACTIVE_ROLLOUT``: a rollout's status, and which ones still hold their nodes.
* ``State`` / ``check_transition``: the per-node state machine.
* ``BuildStatus``: a build key's build.
* ``progress``: a rollout's (or a batch's) node counts, the one definition of done/failed/to go.
* ``group_builds``: build once per build key, one builder per key.
* ``shared_env_installers``: nodes sharing one target env (an NFS venv) install it once, the others verify.
* ``pick_previous_wheel``: the stored wheel a rollback restores when the node keeps none.
* ``next_actions``: given a snapshot of a rollout, what the engine must do now.
* ``manual_commands``: what a person runs on a node whose plan the agent does not carry out (Windows).
* ``Maintenance`` (``parse_max_unavailable``, ``parse_window``/``window_state``, bake time, approval after the
  canary batch) and ``Hold``: what keeps a running rollout from starting new nodes, and why.
* ``RolloutEvent`` / ``notification_payload``: which status changes notify webhooks, and with what (schema 1).
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import math
import re
import urllib.parse
import zoneinfo
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetctl.controller.labels import LabelSelector, parse_label_selector
from fleetctl.controller.node_status import NOT_ONLINE, NodeStatus
from fleetctl.controller.resolver import rules
from fleetctl.fleet.errors import ConflictError, UsageError

# ---- nodes and plans ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """What selection needs to know about a registered node."""

    hostname: str
    gpu: str | None = None  # model name of the first GPU ("NVIDIA H100 80GB HBM3")
    profile: str | None = None  # simulation profile, if simulated
    status: NodeStatus = NodeStatus.ONLINE
    labels: Mapping[str, str] = field(default_factory=dict)  # the user's (`fleetctl label`)


@dataclass(frozen=True)
class NodePlan:
    """The resolver's decision for one node, reduced to what the rollout acts on."""

    hostname: str
    variant: str
    steps: tuple[str, ...]
    gpu: str = ""
    version: str | None = None
    build_key: str | None = None
    artifact: str | None = None
    build_minutes: float = 0.0
    reasons: tuple[str, ...] = ()

    @property
    def builds(self) -> bool:
        return "build-from-source" in self.steps

    @property
    def skipped(self) -> bool:
        """Nothing to install here (blocked or SDPA only)."""
        return self.variant in ("blocked", "sdpa") or not self.steps


#: How a rollout node whose plan is for a person (a Windows node's) begins its cause: it is ``skipped`` — the agent
#: has nothing to run — and ``manual_commands`` gives the commands, which the status JSON and the rollout page show.
MANUAL_CAUSE = "manual: run these commands by hand"

#: The node label by which a node opts out of rollouts (`fleetctl label NODE fleetctl.io/opt-out=true`): such a node
#: is ``skipped`` with a cause that begins ``OPT_OUT_CAUSE``, and the status lists it under ``opted_out``.
OPT_OUT_LABEL = "fleetctl.io/opt-out"
OPT_OUT_CAUSE = "opted-out"


def opted_out(labels: Mapping[str, str]) -> bool:
    """The node's user labels opt it out of rollouts (``fleetctl.io/opt-out=true``, any case)."""
    return labels.get(OPT_OUT_LABEL, "").lower() == "true"


def manual_commands(stored_plan: Mapping[str, Any]) -> list[str]:
    """The commands of a rollout node's stored plan (``PlannedNode.to_json``) that the agent does not execute —
    the resolver's ``Decision.commands``, set only with its ``execution`` label (Windows) — else ``[]``."""
    decision = stored_plan.get("decision") or {}
    if not isinstance(decision, Mapping) or not decision.get("execution"):
        return []
    return [str(c) for c in decision.get("commands") or []]


# ---- selection ---------------------------------------------------------------------------------

SELECTOR_KEYS = ("host", "gpu", "profile", "status")
_TERM_RE = re.compile(r"^[A-Za-z0-9*?\[\]._:+ -]{1,253}$")


@dataclass(frozen=True)
class Selector:
    """Parsed ``--nodes`` (for each key, the patterns any of which must match; empty: no constraint) and ``-l``
    (every label requirement must hold). ``text`` is ``selection_text``'s: the ``--nodes`` text, then `` -l `` and
    the label selector when there is one."""

    terms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    text: str = ""
    labels: LabelSelector = field(default_factory=LabelSelector)

    def matches(self, node: NodeInfo) -> bool:
        return (all(any(_match(key, p, node) for p in patterns) for key, patterns in self.terms.items())
                and self.labels.matches(node.labels))


def _glob_or_sub(pattern: str, value: str | None, *, substring: bool) -> bool:
    if value is None:
        return False
    p, v = pattern.lower(), value.lower()
    if any(c in p for c in "*?["):
        return fnmatch.fnmatchcase(v, p)
    if substring:
        return re.search(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])", v) is not None
    return p == v


def _match(key: str, pattern: str, node: NodeInfo) -> bool:
    if key == "host":
        return _glob_or_sub(pattern, node.hostname, substring=False)
    if key == "gpu":  # "H100" matches "NVIDIA H100 80GB HBM3" (whole word), globs match the full name
        return _glob_or_sub(pattern, node.gpu, substring=True)
    if key == "profile":
        return _glob_or_sub(pattern, node.profile, substring=False)
    return node.status == pattern


LABELS_SEPARATOR = " -l "


def parse_selector(text: str | None, labels: str | None = None) -> Selector:
    """``"gpu=H100,node-*,status=online"`` → Selector. ``None``/``""``/``"all"`` select every node. ``labels`` is a
    label selector (``-l``), AND-ed; ``text`` may carry one itself after `` -l `` (a stored ``selection_text``)."""
    nodes, separator, stored_labels = (text or "").partition(LABELS_SEPARATOR)
    if separator and labels:
        raise UsageError(f"two label selectors: {stored_labels!r} and {labels!r}", hint="give -l once")
    label_selector = parse_label_selector(stored_labels if separator else labels)
    selector = _parse_terms(nodes)
    if not label_selector:
        return selector
    return Selector(selector.terms, f"{selector.text}{LABELS_SEPARATOR}{label_selector}", label_selector)


def selection_text(nodes: str | None, labels: str | None) -> str | None:
    """The one text of a node selection (``--nodes`` and ``-l``), as rollouts and schedules store and show it:
    ``nodes`` itself when there is no label selector, else ``"NODES -l LABELS"`` (``all`` for no ``--nodes``)."""
    if labels is None or not labels.strip():
        return nodes
    return parse_selector(nodes, labels).text


def _parse_terms(text: str) -> Selector:
    if text.strip() in ("", "all", "*"):
        return Selector({}, text or "all")
    terms: dict[str, list[str]] = {}
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise UsageError(f"empty term in node selector {text!r}",
                             hint="separate terms with single commas, e.g. --nodes 'gpu=H100,node-*'")
        if "=" in term:
            key, _, value = term.partition("=")
            key, value = key.strip().lower(), value.strip()
        else:
            key, value = "host", term
        if key in ("hostname", "name"):
            key = "host"
        if key not in SELECTOR_KEYS:
            raise UsageError(f"unknown selector key {key!r} in {text!r}",
                             hint=f"use one of: {', '.join(k + '=' for k in SELECTOR_KEYS)} or a hostname glob")
        if not value or not _TERM_RE.match(value):
            raise UsageError(f"bad value {value!r} for selector key {key!r}",
                             hint="values are hostnames, globs (* ? [..]) or GPU/profile names")
        if key == "status" and value not in tuple(NodeStatus):
            raise UsageError(f"unknown status {value!r} in node selector",
                             hint=f"use one of {', '.join(NodeStatus)}")
        terms.setdefault(key, []).append(value)
    return Selector({k: tuple(v) for k, v in terms.items()}, text)


def select_nodes(selector: Selector, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    """The nodes the selector matches, sorted by hostname; an empty result is an error."""
    pool = list(nodes)
    chosen = sorted((n for n in pool if selector.matches(n)), key=lambda n: n.hostname)
    if not chosen:
        known = ", ".join(sorted(n.hostname for n in pool)[:10]) or "none registered"
        raise UsageError(f"node selector {selector.text!r} matches no node",
                         hint=f"known nodes: {known}; see `fleetctl nodes`")
    return chosen


# ---- canaries and batches -----------------------------------------------------------------------


def choose_canaries(plans: Sequence[NodePlan], count: int | None = None) -> list[str]:
    """Canary hostnames. Default (``count`` None): one per distinct (GPU model, variant); with a
    count: up to ``count`` nodes, covering distinct (GPU, variant) groups round-robin first."""
    eligible = sorted((p for p in plans if not p.skipped), key=lambda p: p.hostname)
    groups: dict[tuple[str, str], list[str]] = {}
    for p in eligible:
        groups.setdefault((p.gpu, p.variant), []).append(p.hostname)
    if count is None:
        return sorted(g[0] for g in groups.values())
    if count < 0:
        raise UsageError(f"--canary {count} is negative", hint="use 0 to skip canaries, or a positive count")
    out: list[str] = []
    rank = 0
    while len(out) < min(count, len(eligible)):
        for key in sorted(groups):
            if rank < len(groups[key]) and len(out) < count:
                out.append(groups[key][rank])
        rank += 1
    return sorted(out)


@dataclass(frozen=True)
class BatchSize:
    count: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.ceil(total * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_batches(text: str | None) -> list[BatchSize]:
    """``"1,5,25%"`` → sizes; default ``"1,5,25%"``."""
    text = text or "1,5,25%"
    out: list[BatchSize] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                out.append(BatchSize(percent=pct))
            else:
                n = int(item)
                if n < 1:
                    raise ValueError
                out.append(BatchSize(count=n))
        except ValueError:
            raise UsageError(f"bad batch size {item!r} in --batch {text!r}",
                             hint="use positive counts and percentages in (0, 100], e.g. --batch 1,5,25%") from None
    return out


def schedule_batches(hostnames: Sequence[str], sizes: Sequence[BatchSize], canaries: Sequence[str] = ()) -> list[
        list[str]]:
    """Batches in order: the canaries (if any) first, then ``sizes`` over the rest (percentages of
    the rest), the last size repeated until every node is scheduled."""
    canary_set = set(canaries)
    rest = [h for h in hostnames if h not in canary_set]
    batches: list[list[str]] = [sorted(canary_set)] if canary_set else []
    if not sizes:
        sizes = [BatchSize(percent=100)]
    i = 0
    k = 0
    while i < len(rest):
        n = sizes[min(k, len(sizes) - 1)].resolve(len(rest))
        batches.append(list(rest[i:i + n]))
        i += n
        k += 1
    return batches


# ---- failure budget -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    count: int | None = None
    percent: float | None = None

    def allowed(self, total: int) -> int:
        """How many failures the rollout tolerates; one more pauses it."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.floor(total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_budget(text: str | None) -> Budget:
    """``--max-failures``: ``N`` (count) or ``P%`` (of the rollout's nodes). Default ``10%``."""
    text = (text or "10%").strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return Budget(percent=pct)
        n = int(text)
        if n < 0:
            raise ValueError
        return Budget(count=n)
    except ValueError:
        raise UsageError(f"bad --max-failures {text!r}", hint="use a count (0, 3) or a percentage (10%)") from None


def budget_exceeded(failures: int, total: int, budget: Budget) -> bool:
    return failures > budget.allowed(total)


# ---- the rollout's status ------------------------------------------------------------------------


class RolloutStatus(enum.StrEnum):
    """A rollout's status (``rollouts.status``)."""

    RUNNING = "running"
    PAUSED = "paused"  # by an operator, the failure budget or a failed canary; resumable
    AWAITING_APPROVAL = "awaiting-approval"  # --pause-after-canary: the canaries passed; `rollout approve` goes on
    ABORTING = "aborting"  # asked to stop: running steps finish, no new one starts
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # ended with failed nodes; `resume --retry-failed` retries them
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"


#: Rollouts that still hold their nodes: a node in one may not join another, the engine drives them, and
#: ``fleetctl rollout status`` reports them ``active``. ABORTING belongs here: its running steps still hold
#: their nodes until they finish (the engine then sets ABORTED).
ACTIVE_ROLLOUT = frozenset({RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.ABORTING,
                            RolloutStatus.ROLLING_BACK, RolloutStatus.AWAITING_APPROVAL})


# ---- the per-node state machine -----------------------------------------------------------------


class State(enum.StrEnum):
    PLANNED = "planned"
    KEYRING = "keyring"
    TOOLKIT = "toolkit"
    WAITING = "waiting"  # waiting for the build of its build key on another node
    BUILD = "build"
    INSTALL = "install"
    VERIFY = "verify"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    SKIPPED_BUSY = "skipped-busy"  # its GPUs were busy under --when-busy skip: not failed, still to do (retryable)
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"


STEP_STATES = frozenset({State.KEYRING, State.TOOLKIT, State.BUILD, State.INSTALL, State.VERIFY,
                         State.ROLLING_BACK})
TERMINAL = frozenset({State.DONE, State.FAILED, State.SKIPPED, State.SKIPPED_BUSY, State.ROLLED_BACK})
STEP_TO_STATE = {"apt-keyring-fix": State.KEYRING, "cuda-toolkit": State.TOOLKIT, "build-from-source": State.BUILD,
                 "install-wheel": State.INSTALL, "verify": State.VERIFY, "rollback": State.ROLLING_BACK}
STATE_TO_JOB = {v: k for k, v in STEP_TO_STATE.items()}

_WORK = {State.KEYRING, State.TOOLKIT, State.BUILD, State.WAITING, State.INSTALL, State.VERIFY}
ALLOWED: Mapping[State, frozenset[State]] = {
    State.PLANNED: frozenset(_WORK | {State.SKIPPED, State.FAILED}),
    State.KEYRING: frozenset({State.TOOLKIT, State.BUILD, State.WAITING, State.INSTALL, State.VERIFY, State.FAILED,
                              State.SKIPPED}),
    State.TOOLKIT: frozenset({State.BUILD, State.WAITING, State.INSTALL, State.VERIFY, State.FAILED, State.SKIPPED}),
    State.WAITING: frozenset({State.INSTALL, State.BUILD, State.FAILED, State.SKIPPED}),
    State.BUILD: frozenset({State.INSTALL, State.VERIFY, State.FAILED, State.SKIPPED, State.SKIPPED_BUSY}),
    State.INSTALL: frozenset({State.VERIFY, State.FAILED, State.SKIPPED, State.SKIPPED_BUSY}),
    State.VERIFY: frozenset({State.DONE, State.FAILED, State.SKIPPED, State.SKIPPED_BUSY}),
    State.DONE: frozenset({State.ROLLING_BACK}),
    State.FAILED: frozenset({State.ROLLING_BACK, State.PLANNED, State.VERIFY}),  # rollback | retry | reconcile
    State.SKIPPED: frozenset({State.ROLLING_BACK}),
    State.SKIPPED_BUSY: frozenset({State.ROLLING_BACK, State.PLANNED}),  # rollback | retry
    State.ROLLING_BACK: frozenset({State.ROLLED_BACK, State.FAILED}),
    State.ROLLED_BACK: frozenset(),
}


def check_transition(old: State | str, new: State | str) -> None:
    """Raise ``ConflictError`` unless ``old → new`` is an allowed transition."""
    o, n = State(old), State(new)
    if n not in ALLOWED[o]:
        raise ConflictError(f"node state {o} → {n} is not allowed",
                            hint=f"from {o} a node may go to: {', '.join(sorted(ALLOWED[o])) or 'nothing (final)'}")


def work_states(plan: NodePlan, builder: bool) -> list[State]:
    """The step states a node goes through, in order, for its plan (the builder builds, then installs what it
    built like everyone else — one install path, with the dependency closure; others wait + install)."""
    out: list[State] = []
    for step in plan.steps:
        if step == "build-from-source":
            out += [State.BUILD, State.INSTALL] if builder else [State.WAITING, State.INSTALL]
        elif step in STEP_TO_STATE and step != "rollback":
            out.append(STEP_TO_STATE[step])
    return out


def next_state(plan: NodePlan, builder: bool, current: State) -> State:
    """The state after ``current`` finished successfully (``DONE`` after the last step)."""
    seq = work_states(plan, builder)
    if current == State.PLANNED:
        return seq[0] if seq else State.DONE
    if current not in seq:
        raise ConflictError(f"state {current} is not a step of this node's plan", hint="this is a bug")
    i = seq.index(current)
    return seq[i + 1] if i + 1 < len(seq) else State.DONE


# ---- progress ------------------------------------------------------------------------------------


class BatchStatus(enum.StrEnum):
    """A batch (or any group of a rollout's nodes) as a whole, from its nodes' states."""

    PENDING = "pending"  # no node started
    RUNNING = "running"
    DONE = "done"  # every node terminal, none failed
    FAILED = "failed"  # every node terminal, some failed


@dataclass(frozen=True)
class Progress:
    """How far a group of a rollout's nodes (the rollout, one batch) got: the one definition of done, failed
    and to go that ``fleetctl rollout status``, the API, the dashboard and ``/metrics`` all show."""

    total: int
    done: int  # DONE: installed and verified
    failed: int  # FAILED
    skipped: int  # SKIPPED or ROLLED_BACK: nothing (more) to do there
    planned: int  # not started yet

    @property
    def finished(self) -> int:
        """Nodes in a terminal state (done, failed or skipped)."""
        return self.done + self.failed + self.skipped

    @property
    def active(self) -> int:
        """Nodes still to go (not started, in a step, waiting for a build or rolling back)."""
        return self.total - self.finished

    @property
    def status(self) -> BatchStatus:
        if self.finished == self.total:
            return BatchStatus.FAILED if self.failed else BatchStatus.DONE
        return BatchStatus.PENDING if self.planned == self.total else BatchStatus.RUNNING


def progress(counts: Mapping[str, int]) -> Progress:
    """The progress of nodes counted by state (``{"done": 3, "install": 1}``); unknown states are refused."""
    by_state = {State(k): n for k, n in counts.items()}
    return Progress(total=sum(by_state.values()), done=by_state.get(State.DONE, 0),
                    failed=by_state.get(State.FAILED, 0),
                    skipped=by_state.get(State.SKIPPED, 0) + by_state.get(State.SKIPPED_BUSY, 0)
                    + by_state.get(State.ROLLED_BACK, 0),
                    planned=by_state.get(State.PLANNED, 0))


# ---- build once, install many --------------------------------------------------------------------


def group_builds(plans: Sequence[NodePlan], batches: Sequence[Sequence[str]],
                 dedicated: Mapping[str, str] | None = None) -> dict[str, str]:
    """build_key → builder hostname: the node of that key scheduled earliest (so no node ever waits on a
    later batch); ``dedicated`` overrides (a builder host per key)."""
    order = {h: i for i, b in enumerate(batches) for h in b}
    out: dict[str, str] = {}
    for p in sorted(plans, key=lambda p: (order.get(p.hostname, len(order)), p.hostname)):
        if p.builds and p.build_key and p.build_key not in out:
            out[p.build_key] = p.hostname
    for key, host in (dedicated or {}).items():
        if key in out:
            out[key] = host
    return out


def shared_env_installers(env_keys: Mapping[str, str | None], installing: Iterable[str],
                          batches: Sequence[Sequence[str]]) -> dict[str, str]:
    """hostname → the node that installs for it. Nodes whose target env is one and the same (equal ``env_keys``:
    its filesystem and path, fleet.facts ``python.env_fs``/``env_path``; an NFS venv) install it once — the node
    of the group scheduled earliest, so nobody waits on a later batch — and the others only verify, after it.
    Nodes without a key, or alone with theirs, are not in the result."""
    order = {h: i for i, b in enumerate(batches) for h in b}
    groups: dict[str, list[str]] = {}
    for host in sorted(installing, key=lambda h: (order.get(h, len(order)), h)):
        key = env_keys.get(host)
        if key:
            groups.setdefault(key, []).append(host)
    return {h: group[0] for group in groups.values() for h in group[1:]}


# ---- rollback: the wheel of the previous version -------------------------------------------------

_WHEEL_NAME_RE = re.compile(r"(?P<dist>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-[0-9][A-Za-z0-9_.]*)?"
                            r"-(?P<py>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)-(?P<plat>[A-Za-z0-9_.]+)\.whl")


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pick_previous_wheel(wheels: Iterable[tuple[str, str]], dist: str, version: str, python_tag: str | None,
                        arch: str | None) -> str | None:
    """sha256 of the stored wheel (``(filename, sha256)`` pairs) a rollback reinstalls to bring back ``dist``
    ``version`` on a node that keeps no wheel of it (it was not installed by fleetctl), or None.

    The node reports the version from package metadata, which upstream release wheels keep without the local
    label their file name carries (``2.8.3`` for ``flash_attn-2.8.3+cu12torch2.7…whl``), so versions match on
    the public part, and a local label, when the node reports one, must match exactly. The wheel must run on
    the node: a ``cpXY`` tag of its Python (``python_tag``) or a pure ``py3`` one, a ``linux_<arch>``,
    ``manylinux…_<arch>`` or ``any`` platform. Preferred: the exact local label, then the node's own CPython tag,
    then the file name (stable)."""
    want_public, _, want_local = version.partition("+")
    found: list[tuple[tuple[int, int, str], str]] = []
    for filename, sha in wheels:
        m = _WHEEL_NAME_RE.fullmatch(filename)
        if m is None or _norm_dist(m["dist"]) != _norm_dist(dist):
            continue
        public, _, local = m["version"].partition("+")
        if public != want_public or (want_local and local != want_local):
            continue
        py_tags = m["py"].split(".")
        if python_tag not in py_tags and "py3" not in py_tags:
            continue
        plats = m["plat"].split(".")
        if not any(p == "any" or (arch is not None and p.endswith("_" + arch)) for p in plats):
            continue
        found.append(((0 if local == want_local else 1, 0 if python_tag in py_tags else 1, filename), sha))
    return min(found)[1] if found else None


def describe_target(version: str, policy: Mapping[str, object] | None) -> str:
    """What a rollout installs, in words: the FA2 release, and FA4/FA3 where its policy asks for them."""
    extras = [label for key, label in (("fa4", f"FA4 {rules.FA4_VERSION}"), ("fa3", f"FA3 {rules.FA3_VERSION}"))
              if (policy or {}).get(key)]
    if (policy or {}).get("prefer") == "fastest":  # the measured ranking decides per node
        workload = (policy or {}).get('workload', 'training')
        return f"the fastest measured ({workload}) per node, else flash-attn {version}"
    if not extras:
        return f"flash-attn {version}"
    return f"{' / '.join(extras)} where supported, else flash-attn {version}"


# ---- the engine's decision step ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSnapshot:
    hostname: str
    state: State
    batch: int
    build_key: str | None = None
    busy: bool = False  # a step task of the engine driving the rollout is running for this node
    builder: bool = False  # this node is the builder of its build key
    after: str | None = None  # the installer of the shared env this node only verifies: it starts after that one
    health: NodeStatus = NodeStatus.ONLINE  # liveness and verification health (--max-unavailable counts it)


class BuildStatus(enum.StrEnum):
    """The build of one build key (``rollout_builds.status``): built once, installed by every node of the key."""

    PENDING = "pending"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class BuildSnapshot:
    build_key: str
    status: BuildStatus
    builder: str | None


@dataclass(frozen=True)
class Snapshot:
    status: RolloutStatus
    nodes: Sequence[NodeSnapshot]
    builds: Mapping[str, BuildSnapshot]
    failures: int
    total: int
    budget: Budget
    max_parallel: int
    canary_batch: bool  # batch 0 holds canaries
    canary_ack: bool = False  # an operator resumed past a failed canary
    maintenance: Maintenance = field(default_factory=lambda: Maintenance())
    now: dt.datetime | None = None  # for windows and bake time (None: no maintenance rule holds)
    approved: bool = False  # `fleetctl rollout approve` after the canary batch (--pause-after-canary)
    batch_finished_at: Mapping[int, dt.datetime] = field(default_factory=dict)  # when each finished batch ended


@dataclass(frozen=True)
class Actions:
    start: tuple[str, ...] = ()  # hostnames whose next step should start now
    fail_waiting: tuple[tuple[str, str], ...] = ()  # (hostname, build_key) whose build failed
    pause: str | None = None  # reason
    finish: RolloutStatus | None = None
    current_batch: int | None = None
    await_approval: str | None = None  # reason: the canary batch passed, --pause-after-canary asks for approval
    hold: Hold | None = None  # why nodes of the current batch wait (window, bake, max-unavailable)


def current_batch(nodes: Sequence[NodeSnapshot]) -> int | None:
    """The lowest batch with a node not yet terminal."""
    open_batches = [n.batch for n in nodes if n.state not in TERMINAL]
    return min(open_batches) if open_batches else None


def rollback_outcome(nodes: Sequence[NodeSnapshot]) -> RolloutStatus:
    """The final status of a rollback once no node is rolling back any more. Every ``done`` or ``failed`` node
    went to ``rolling-back`` when the rollback was requested (service.rollback), so a node ``failed`` now is one
    whose rollback failed: the rollout is ``rollback-failed`` (its nodes' causes say why), never ``rolled-back``."""
    failed = any(n.state == State.FAILED for n in nodes)
    return RolloutStatus.ROLLBACK_FAILED if failed else RolloutStatus.ROLLED_BACK


def next_actions(snap: Snapshot) -> Actions:
    """What to do now. Pure: the engine persists, then acts on the result."""
    def build_failed(key: str) -> bool:
        return snap.builds.get(key, BuildSnapshot(key, BuildStatus.FAILED, None)).status == BuildStatus.FAILED

    fail_waiting = tuple(sorted((n.hostname, n.build_key) for n in snap.nodes
                                if n.state == State.WAITING and n.build_key and build_failed(n.build_key)))
    if snap.status == RolloutStatus.ROLLING_BACK:
        busy = sum(1 for n in snap.nodes if n.busy)
        room = max(0, snap.max_parallel - busy)
        back = tuple(n.hostname for n in snap.nodes if n.state == State.ROLLING_BACK and not n.busy)[:room]
        if not any(n.state == State.ROLLING_BACK for n in snap.nodes):
            return Actions(finish=rollback_outcome(snap.nodes))
        return Actions(start=back)
    if snap.status != RolloutStatus.RUNNING:
        return Actions(fail_waiting=fail_waiting)
    if budget_exceeded(snap.failures, snap.total, snap.budget):
        return Actions(fail_waiting=fail_waiting, pause=(
            f"failure budget exceeded: {snap.failures} failed, --max-failures {snap.budget} allows "
            f"{snap.budget.allowed(snap.total)} of {snap.total}"))
    batch = current_batch(snap.nodes)
    if batch is None:
        final = RolloutStatus.SUCCEEDED if snap.failures == 0 and all(
            n.state in (State.DONE, State.SKIPPED) for n in snap.nodes) else RolloutStatus.PARTIAL
        return Actions(finish=final)
    if snap.canary_batch and batch > 0 and not snap.canary_ack:
        canary_failed = [n.hostname for n in snap.nodes if n.batch == 0 and n.state == State.FAILED]
        if canary_failed and not any(n.batch > 0 and n.state not in (State.PLANNED, State.SKIPPED)
                                     for n in snap.nodes):
            return Actions(fail_waiting=fail_waiting, pause=f"canary failed: {', '.join(canary_failed)}",
                           current_batch=batch)
    if (snap.canary_batch and batch > 0 and snap.maintenance.pause_after_canary and not snap.approved
            and not any(n.batch > 0 and n.state not in (State.PLANNED, State.SKIPPED) for n in snap.nodes)):
        canaries = progress(Counter(str(n.state) for n in snap.nodes if n.batch == 0))
        return Actions(fail_waiting=fail_waiting, current_batch=batch, await_approval=(
            f"canary batch finished: {canaries.done} done, {canaries.failed} failed — approve the next batches "
            f"with `fleetctl rollout approve ID`"))
    busy = sum(1 for n in snap.nodes if n.busy)
    room = max(0, snap.max_parallel - busy)
    waiting_ok = {k for k, b in snap.builds.items() if b.status == BuildStatus.SUCCEEDED}
    failing = {h for h, _ in fail_waiting}
    planned = sum(1 for n in snap.nodes if n.state == State.PLANNED and n.batch <= batch and not n.busy)
    hold = blocked = maintenance_hold(snap, batch, planned)
    unavailable_left = unavailable_room(snap)
    taken = 0  # healthy nodes this pass puts into a step (each one more unavailable)
    start: list[str] = []
    states = {n.hostname: n.state for n in snap.nodes}
    for n in sorted(snap.nodes, key=lambda n: (n.batch, n.hostname)):
        if len(start) >= room:
            break
        if n.busy or n.state in TERMINAL or n.batch > batch or n.hostname in failing:
            continue
        if n.after is not None and n.state == State.PLANNED and states.get(n.after, State.DONE) not in TERMINAL:
            continue
        if n.state == State.WAITING and n.build_key not in waiting_ok and not n.builder:
            continue
        if n.state == State.PLANNED:  # a new node: the maintenance policy decides (started ones go on)
            if blocked is not None:
                continue
            if unavailable_left is not None and n.health not in NOT_ONLINE:  # an unavailable node costs nothing
                if unavailable_left == 0:
                    hold = unavailable_hold(snap, taken)
                    continue
                unavailable_left -= 1
                taken += 1
        start.append(n.hostname)
    return Actions(start=tuple(start), fail_waiting=fail_waiting, current_batch=batch, hold=hold)


# ---- maintenance policy: max-unavailable, windows, canary approval, bake time ----------------------------


@dataclass(frozen=True)
class MaxUnavailable:
    """``--max-unavailable N|P%``: how many of a rollout's nodes may be out of service at once — offline, degraded
    or in a disturbing step. A percentage is of the rollout's nodes, rounded down but at least 1 (else a small
    rollout could never start a node)."""

    count: int | None = None
    percent: float | None = None

    def allowed(self, total: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.floor(total * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_max_unavailable(text: str | None) -> MaxUnavailable | None:
    """``--max-unavailable``: ``N`` (≥ 1) or ``P%`` (0 < P ≤ 100); None or empty: no limit."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return MaxUnavailable(percent=pct)
        n = int(text)
        if n < 1:
            raise ValueError
        return MaxUnavailable(count=n)
    except ValueError:
        raise UsageError(f"bad --max-unavailable {text!r}",
                         hint="use a count of at least 1 (--max-unavailable 2) or a percentage in (0, 100] "
                              "(--max-unavailable 25%)") from None


_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WINDOW_RE = re.compile(r"^\s*(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
                        r"(?:\s+(?P<zone>\S+))?\s*$")
_WINDOW_HINT = ("write DAYS HH:MM-HH:MM [ZONE]: days Mon..Sun, a range (Mon-Fri), a list (Sat,Sun) or daily; "
                "24-hour times; an IANA zone (Europe/Berlin, default UTC) — e.g. --window 'Sat 02:00-06:00' or "
                "--window 'Mon-Fri 22:00-04:00 America/New_York' (a window ending before it starts ends the next day)")


@dataclass(frozen=True)
class Window:
    """A maintenance window: opens on each of ``days`` (0 Monday … 6 Sunday) at ``start`` wall-clock minutes in
    ``zone`` and lasts ``minutes`` (ending the next day when it crosses midnight)."""

    days: frozenset[int]
    start: int  # minutes after local midnight
    minutes: int  # 1 … 1440
    zone: str
    text: str

    def openings(self, around: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
        """(opens, closes) in UTC of the openings from two days before ``around`` to eight days after."""
        tz = zoneinfo.ZoneInfo(self.zone)
        today = around.astimezone(tz).date()
        out = []
        for offset in range(-2, 9):
            day = today + dt.timedelta(days=offset)
            if day.weekday() in self.days:
                local = dt.datetime.combine(day, dt.time(self.start // 60, self.start % 60), tzinfo=tz)
                # wall-clock duration: a window across a DST change still closes at its local end time
                end_local = dt.datetime.combine(day, dt.time(0), tzinfo=tz) + dt.timedelta(
                    minutes=self.start + self.minutes)
                out.append((local.astimezone(dt.UTC), end_local.astimezone(dt.UTC)))
        return out


def _minutes(text: str, *, end: bool) -> int:
    hh, _, mm = text.partition(":")
    h, m = int(hh), int(mm)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise ValueError
    return h * 60 + m


def _day(name: str) -> int:
    """``sat`` or ``saturday`` → 5."""
    for i, full in enumerate(_DAY_NAMES):
        if len(name) >= 3 and full.startswith(name):
            return i
    raise ValueError(name)


def _days(text: str) -> frozenset[int]:
    """``Sat``, ``Mon-Fri``, ``Fri-Mon`` (wraps), ``Sat,Sun``, ``daily``/``*`` → weekday numbers."""
    text = text.lower()
    if text in ("daily", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        a = _day(first)
        b = _day(last) if dash else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def parse_window(text: str, default_zone: str = "UTC") -> Window:
    """``"Sat 02:00-06:00"``, ``"Mon-Fri 22:00-04:00 Europe/Berlin"``, ``"daily 01:00-05:00"`` → Window."""
    m = _WINDOW_RE.match(text or "")
    if m is None:
        raise UsageError(f"bad --window {text!r}", hint=_WINDOW_HINT)
    try:
        days = _days(m["days"])
        start, end = _minutes(m["start"], end=False), _minutes(m["end"], end=True)
    except ValueError:
        raise UsageError(f"bad --window {text!r}: unknown day or time", hint=_WINDOW_HINT) from None
    if start == end:
        raise UsageError(f"bad --window {text!r}: it opens and closes at the same time", hint=_WINDOW_HINT)
    zone = m["zone"] or default_zone
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"bad --window {text!r}: unknown time zone {zone!r}",
                         hint="use an IANA zone name such as UTC, Europe/Berlin or America/New_York") from None
    return Window(days, start, (end - start) % 1440 or 1440, zone, text.strip())


@dataclass(frozen=True)
class WindowState:
    open: bool
    change_at: dt.datetime | None  # when it closes (open) or next opens (closed); None: no windows


def window_state(windows: Sequence[Window], now: dt.datetime) -> WindowState:
    """Whether ``now`` is inside one of ``windows`` (no windows: always open), and when that changes."""
    if not windows:
        return WindowState(True, None)
    spans = sorted(span for w in windows for span in w.openings(now))
    inside = [closes for opens, closes in spans if opens <= now < closes]
    if inside:
        return WindowState(True, max(inside))
    later = [opens for opens, _ in spans if opens > now]
    return WindowState(False, min(later) if later else None)


def format_duration(seconds: float) -> str:
    """``11520`` → ``3h12m``; ``75`` → ``1m15s``; ``172800`` → ``2d0h``."""
    s = max(0, math.ceil(seconds))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str, flag: str = "--bake-time") -> float:
    """``30m``, ``1h30m``, ``90s``, ``2d``, or plain seconds → seconds (≥ 0)."""
    t = (text or "").strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = _DURATION_RE.findall(t)
    if not t or "".join(n + u for n, u in parts) != t:
        raise UsageError(f"bad {flag} {text!r}", hint=f"use a duration such as 30m, 1h30m, 90s or 2d ({flag} 1h)")
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def check_webhook_url(url: str, flag: str = "--notify-webhook") -> str:
    """An ``http://`` or ``https://`` URL with a host (stripped), else a UsageError naming ``flag``."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad {flag} {url!r}: not an http:// or https:// URL",
                         hint=f"e.g. {flag} https://hooks.example.com/fleetctl")
    return url.strip()


def redact_url(url: str) -> str:
    """``https://hooks.example.com/services/T0/B0/token`` → ``https://hooks.example.com/…``: a webhook's path and
    query often are its secret, so status, dashboard, audit and logs show only where it goes."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/…"


@dataclass(frozen=True)
class Maintenance:
    """A rollout's maintenance policy (``options``): nothing new starts while one of its rules holds it."""

    max_unavailable: MaxUnavailable | None = None
    windows: tuple[Window, ...] = ()
    pause_after_canary: bool = False
    bake_seconds: float = 0.0

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> Maintenance:
        zone = str(opts.get("window_zone") or "UTC")
        return cls(parse_max_unavailable(opts.get("max_unavailable")),
                   tuple(parse_window(w, zone) for w in opts.get("windows") or ()),
                   bool(opts.get("pause_after_canary")), float(opts.get("bake_seconds") or 0))


class HoldKind(enum.StrEnum):
    """Why a running rollout starts no new node now (it waits; running steps go on)."""

    WINDOW = "window"  # outside every maintenance window
    BAKE = "bake"  # the previous batch is baking
    MAX_UNAVAILABLE = "max-unavailable"  # starting a node would put too many out of service


@dataclass(frozen=True)
class Hold:
    kind: HoldKind
    until: dt.datetime | None = None  # when it ends by itself (window, bake); None: when nodes come back
    detail: str = ""

    def describe(self, now: dt.datetime) -> str:
        """``waiting for window (opens in 3h12m)`` — the status line, counted from ``now``."""
        left = f" in {format_duration((self.until - now).total_seconds())}" if self.until else ""
        if self.kind == HoldKind.WINDOW:  # every window opens at least weekly: ``until`` is set
            return f"waiting for window (opens{left}): {self.detail}"
        if self.kind == HoldKind.BAKE:
            return f"baking: next batch starts{left} ({self.detail})"
        return f"waiting: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "until": self.until.isoformat() if self.until else None,
                "detail": self.detail}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> Hold | None:
        if not obj:
            return None
        until = obj.get("until")
        return cls(HoldKind(obj["kind"]), dt.datetime.fromisoformat(until) if until else None,
                   str(obj.get("detail") or ""))


def unavailable(nodes: Sequence[NodeSnapshot]) -> tuple[int, int, int, int]:
    """(unavailable, offline, degraded, in a step) among a rollout's nodes: offline or degraded (liveness and
    verification health), plus the nodes in a disturbing step; a node counts once."""
    offline = sum(1 for n in nodes if n.health == NodeStatus.OFFLINE)
    degraded = sum(1 for n in nodes if n.health == NodeStatus.DEGRADED)
    stepping = sum(1 for n in nodes if n.state in STEP_STATES and n.health not in NOT_ONLINE)
    return offline + degraded + stepping, offline, degraded, stepping


def maintenance_hold(snap: Snapshot, batch: int, planned: int) -> Hold | None:
    """What holds every new node of ``batch`` (``planned`` of them wait), or None: outside every maintenance
    window; the previous batch still baking. (``--max-unavailable`` is counted node by node: ``next_actions``.)"""
    m, now = snap.maintenance, snap.now
    if planned == 0 or now is None:
        return None
    win = window_state(m.windows, now)
    if not win.open:
        return Hold(HoldKind.WINDOW, win.change_at, ", ".join(w.text for w in m.windows))
    finished = snap.batch_finished_at.get(batch - 1)
    if m.bake_seconds and batch > 0 and finished is not None:
        until = finished + dt.timedelta(seconds=m.bake_seconds)
        if now < until:
            return Hold(HoldKind.BAKE, until, f"--bake-time {format_duration(m.bake_seconds)} after batch "
                                              f"{batch - 1} finished")
    return None


def unavailable_hold(snap: Snapshot, starting: int = 0) -> Hold | None:
    """The ``--max-unavailable`` hold when the rollout's unavailable nodes (plus ``starting`` healthy ones this
    pass puts into a step) fill the allowance, else None."""
    m = snap.maintenance.max_unavailable
    if m is None:
        return None
    allowed = m.allowed(len(snap.nodes))
    count, offline, degraded, stepping = unavailable(snap.nodes)
    if count + starting < allowed:
        return None
    return Hold(HoldKind.MAX_UNAVAILABLE, None,
                f"{count + starting} of {len(snap.nodes)} nodes unavailable ({offline} offline, {degraded} degraded, "
                f"{stepping + starting} in a step); --max-unavailable {m} allows {allowed}")


def unavailable_room(snap: Snapshot) -> int | None:
    """How many healthy nodes may still enter a step under ``--max-unavailable`` (None: no limit)."""
    m = snap.maintenance.max_unavailable
    if m is None:
        return None
    return max(0, m.allowed(len(snap.nodes)) - unavailable(snap.nodes)[0])


# ---- notifications -----------------------------------------------------------------------------------------

#: The version of the webhook payload (docs/rollout.md, "Notifications"); a change that is not an addition
#: raises it.
NOTIFICATION_SCHEMA = 1


class RolloutEvent(enum.StrEnum):
    """What a webhook is told about (the payload's ``event``)."""

    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting-approval"
    FAILED = "failed"  # ended with failed nodes (partial) or a failed rollback
    COMPLETED = "completed"  # succeeded, or rolled back
    ABORTED = "aborted"


_EVENT_OF = {RolloutStatus.PAUSED: RolloutEvent.PAUSED, RolloutStatus.AWAITING_APPROVAL: RolloutEvent.AWAITING_APPROVAL,
             RolloutStatus.PARTIAL: RolloutEvent.FAILED, RolloutStatus.ROLLBACK_FAILED: RolloutEvent.FAILED,
             RolloutStatus.SUCCEEDED: RolloutEvent.COMPLETED, RolloutStatus.ROLLED_BACK: RolloutEvent.COMPLETED,
             RolloutStatus.ABORTED: RolloutEvent.ABORTED}


def notification_event(status: RolloutStatus) -> RolloutEvent | None:
    """The event a rollout entering ``status`` notifies, or None (running, aborting, rolling back)."""
    return _EVENT_OF.get(status)


def notification_payload(event: RolloutEvent, *, rollout_id: str, status: RolloutStatus, reason: str, version: str,
                         progress: Progress, failed: Sequence[tuple[str, str]], at: dt.datetime) -> dict[str, Any]:
    """The webhook body (schema 1) without the controller's URLs (the sender adds ``controller_url`` and
    ``rollout_url``). ``failed``: (hostname, cause) of each failed node; the first 100 are listed."""
    return {"schema": NOTIFICATION_SCHEMA, "event": str(event), "rollout_id": rollout_id, "status": str(status),
            "reason": reason, "version": version,
            "counts": {"total": progress.total, "done": progress.done, "failed": progress.failed,
                       "skipped": progress.skipped, "active": progress.active},
            "failed_nodes": [{"hostname": h, "reason": why} for h, why in failed[:100]],
            "time": at.isoformat()}
