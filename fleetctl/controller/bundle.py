"""Air-gapped controllers: every artifact some nodes' rollouts need, carried in one tar (docs/rollout.md).

``fleetctl bundle export`` runs on a connected host. It plans each node with the controller's own planning
code (``controller.rollout.service.plan_node`` over the node's facts, or a controller's dry run), then gets
what each distinct kind of node needs with the controller's own ``Provisioner`` over a throw-away artifact
store: the release wheel (or the sdist for a source build), the dependency closure resolved for the node's
Python and platform, the pip wheel, and optionally the agent's own wheels. Same code as the controller, so
the bundle holds exactly what an offline controller's provisioner will look for.

A bundle is a plain tar::

    lock.json          {"format": 1, "created": ISO, "files": [{filename, sha256, size, kind, source}],
                        "nodes": [{hostname, variant, version, target_env, needs: [filename], agent: [filename]}]}
    files/<filename>   each file of the lock, under its own (safe) name

``fleetctl bundle import`` on the air-gapped side extracts into a temporary directory (``tarfile`` with the
``data`` filter, after refusing any member that is not ``lock.json`` or ``files/<safe name>``), checks every
file's size and sha256 against the lock *before* anything is uploaded, then fills the controller's store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from fleetctl.controller.artifacts import KINDS, ArtifactInfo, ArtifactStore, Provenance, check_sha256, safe_filename
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.provisioning import NEVER_INSTALLED, NodeNeeds, Provisioner, bundled_pip_wheel
from fleetctl.controller.store import open_store
from fleetctl.controller.upstream import TargetEnv, UpstreamConfig, normalize
from fleetctl.fleet.errors import ConflictError, FactsError, FleetError, InputError, NotFoundError
from fleetctl.fleet.facts import NodeFacts

FORMAT = 1
LOCK_NAME = "lock.json"
FILES_DIR = "files"
MAX_LOCK_BYTES = 16 * 1024 * 1024
#: variants whose steps take artifacts from the store (sdpa/blocked install nothing)
INSTALLING = frozenset({"fa2-wheel", "fa2-source", "fa1-source", "fa3-source", "fa4"})

Progress = Callable[[str], None]


# ---- the lock --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockFile:
    filename: str
    sha256: str
    size: int
    kind: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"filename": self.filename, "sha256": self.sha256, "size": self.size, "kind": self.kind,
                "source": self.source}


@dataclass(frozen=True)
class LockNode:
    hostname: str
    variant: str
    version: str | None
    needs: tuple[str, ...]
    agent: tuple[str, ...] = ()
    target_env: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "variant": self.variant, "version": self.version,
                "target_env": dict(self.target_env), "needs": list(self.needs), "agent": list(self.agent)}


@dataclass(frozen=True)
class Lock:
    created: str
    files: tuple[LockFile, ...]
    nodes: tuple[LockNode, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "created": self.created, "files": [f.to_json() for f in self.files],
                "nodes": [n.to_json() for n in self.nodes]}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def digest(self) -> str:
        """sha256 of the lock's canonical JSON: names the bundle in imported files' provenance (``bundle``)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @staticmethod
    def from_json(obj: Any, source: str) -> Lock:
        """Parse and validate a lock (every name safe, every digest well-formed, every need listed)."""
        def bad(what: str) -> InputError:
            return InputError(f"{source}: {what}", hint="this is not a bundle `fleetctl bundle export` wrote, or it "
                                                        "was damaged; export it again")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else None
            raise bad(f"lock.json is not a format-{FORMAT} lock (format {found!r})")
        files: list[LockFile] = []
        for i, f in enumerate(obj.get("files") or []):
            try:
                name = safe_filename(str(f["filename"]))
                sha = check_sha256(str(f["sha256"]))
                size, kind = f["size"], str(f["kind"])
            except (KeyError, TypeError) as exc:
                raise bad(f"files[{i}] lacks {exc}") from None
            except InputError as exc:
                raise bad(f"files[{i}]: {exc.message}") from None
            if not isinstance(size, int) or size < 0 or kind not in KINDS:
                raise bad(f"files[{i}] ({name}): bad size {size!r} or kind {kind!r}")
            files.append(LockFile(name, sha, size, kind, str(f.get("source") or "")))
        names = [f.filename for f in files]
        if len(set(names)) != len(names):
            raise bad("a file name is listed twice")
        nodes: list[LockNode] = []
        for i, n in enumerate(obj.get("nodes") or []):
            if not isinstance(n, dict) or not isinstance(n.get("hostname"), str):
                raise bad(f"nodes[{i}] has no hostname")
            needs = tuple(str(x) for x in n.get("needs") or [])
            agent = tuple(str(x) for x in n.get("agent") or [])
            unknown = [x for x in (*needs, *agent) if x not in set(names)]
            if unknown:
                raise bad(f"node {n['hostname']} needs {unknown[0]}, which the lock does not list")
            env = n.get("target_env")
            nodes.append(LockNode(n["hostname"], str(n.get("variant")), n.get("version"), needs, agent,
                                  env if isinstance(env, dict) else {}))
        return Lock(str(obj.get("created") or ""), tuple(files), tuple(nodes))


# ---- which nodes, planned how ----------------------------------------------------------------------------


def plan_facts(entries: Sequence[NodeFacts | FactsError], catalog: Any, policy: Any,
               version: str) -> list[dict[str, Any]]:
    """Each node's rollout plan (``PlannedNode.to_json``) from its facts, by the controller's own planner.

    The planner reads a registry record; one made here (never stored) carries the facts, as for a real node
    whose agent runs playbooks (``executor: ansible``: those are the nodes that take artifacts)."""
    # local: the planner pulls in the rollout engine, jobs and the registry (~0.3 s); `fleetctl` imports this module
    from fleetctl.controller.registry import NodeRecord
    from fleetctl.controller.rollout.service import plan_node

    out = []
    for i, facts in enumerate(entries):
        if isinstance(facts, FactsError):
            raise FactsError(f"node #{i}: {facts.message}", hint=facts.hint or "fix the facts file")
        now = dt.datetime.now(dt.UTC)
        row = NodeRecord(hostname=facts.hostname, status=NodeStatus.ONLINE, last_seen=now, status_changed_at=now,
                         simulated=False, registered_at=now, facts_updated_at=now, agent=None, facts=facts,
                         facts_error=None, facts_json=facts.to_json(), extra={"executor": "ansible"},
                         agent_version=None)
        out.append(plan_node(row, catalog, policy, version, {}, None, built=set()).to_json())
    return out


def needing_artifacts(plans: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The plans whose steps take artifacts from the store, and a line for each node left out (and why)."""
    chosen: list[Mapping[str, Any]] = []
    left: list[str] = []
    for p in plans:
        host, variant = p.get("hostname"), p.get("variant")
        if variant not in INSTALLING:
            left.append(f"{host}: {variant} installs nothing")
        elif p.get("executor") == "simulated":
            left.append(f"{host}: simulated node (its executor installs nothing real)")
        else:
            chosen.append(p)
    return chosen, left


# ---- collecting the artifacts ----------------------------------------------------------------------------


def sdist_requirements(path: Path, env: TargetEnv) -> tuple[str, ...]:
    """An sdist's ``Requires-Dist`` (PKG-INFO) that apply on this node, torch dropped: what the wheel a node
    builds from it will ask for at install time (an offline controller resolves those from the store)."""
    text = ""
    with contextlib.suppress(tarfile.TarError, OSError, KeyError), tarfile.open(path) as tf:
        member = next((m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")), None)
        handle = tf.extractfile(member) if member is not None else None
        text = handle.read(1 << 20).decode("utf-8", "replace") if handle is not None else ""
    marker_env = {k: str(v) for k, v in default_environment().items()}
    marker_env.update(python_version=env.python, python_full_version=f"{env.python}.0", platform_machine=env.arch,
                      sys_platform="linux", platform_system="Linux", os_name="posix", extra="")
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
        except InvalidRequirement:
            continue  # the build itself will complain; the bundle just cannot prefetch it
        if normalize(req.name) in NEVER_INSTALLED or req.url or (req.marker and not req.marker.evaluate(marker_env)):
            continue
        req.marker = None
        out.append(str(req))
    return tuple(dict.fromkeys(out))


def agent_requirements() -> list[str]:
    """What ``fleet-agent`` needs at run time on a node (its own wheel aside): fleetctl's requirements outside
    every extra, with the ranges pyproject.toml pins (the agent install target, docs/deploy.md)."""
    try:
        declared = importlib.metadata.requires("fleetctl") or []
    except importlib.metadata.PackageNotFoundError:
        raise FleetError("fleetctl's own package metadata is missing, so the agent's dependencies are unknown",
                         hint="install fleetctl (`pip install -e .` in a checkout, or its wheel)") from None
    out: list[str] = []
    for line in declared:
        with contextlib.suppress(InvalidRequirement):
            req = Requirement(line)
            if req.marker is None:  # extras carry an `extra == "…"` marker
                out.append(str(req))
    return out


def project_root() -> Path | None:
    """The source checkout this fleetctl runs from (pyproject.toml naming fleetctl), or None if installed."""
    root = Path(__file__).resolve().parents[2]
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if 'name = "fleetctl"' in text else None


def pip_env() -> dict[str, str]:
    """pip without this machine's pip configuration (find-links/constraints there break resolution), as
    ``controller.upstream`` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def build_fleetctl_wheel(root: Path, dest: Path) -> Path:
    """``pip wheel --no-deps`` of the checkout (without build isolation when setuptools is here: no index)."""
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--no-cache-dir",
            "--quiet", "-w", str(dest), str(root)]
    if importlib.util.find_spec("setuptools") is not None:  # the backend pyproject.toml names: no index needed
        argv.insert(4, "--no-build-isolation")
    proc = subprocess.run(argv, capture_output=True, text=True, env=pip_env(), timeout=600, check=False)
    wheels = sorted(dest.glob("fleetctl-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FleetError(f"building the fleetctl wheel from {root} failed: {' / '.join(tail) or 'no wheel'}",
                         hint="fix the build (`pip wheel --no-deps .` in the checkout), or --no-agent-wheels")
    return wheels[-1]


class Collector:
    """Gets each distinct node kind's artifacts once into a scratch store; remembers where each came from."""

    def __init__(self, provisioner: Provisioner, scratch: Path, *, agent_wheels: bool, progress: Progress) -> None:
        self.provisioner = provisioner
        self.config = provisioner.upstream.config
        self.scratch = scratch
        self.agent_wheels = agent_wheels
        self.progress = progress
        self.sources: dict[str, str] = {}  # sha256 → where the file came from (first source wins)
        self.infos: dict[str, ArtifactInfo] = {}
        self._rollout: dict[tuple[NodeNeeds, bool], tuple[str, ...]] = {}
        self._agent: dict[tuple[str, str, str | None], tuple[str, ...]] = {}
        self._fleetctl: ArtifactInfo | None = None
        self._agent_note_done = False

    def node(self, plan: Mapping[str, Any]) -> LockNode:
        needs = NodeNeeds.from_plan(plan)
        builds = "build-from-source" in (plan.get("steps") or [])
        key = (needs, builds)
        if key not in self._rollout:
            self._rollout[key] = self._names(self._rollout_files(needs, builds))
        agent: tuple[str, ...] = ()
        if self.agent_wheels:
            akey = (needs.env.python, needs.env.arch, needs.env.glibc)
            if akey not in self._agent:
                self._agent[akey] = self._names(self._agent_files(needs.env))
            agent = self._agent[akey]
        self.progress(f"{plan.get('hostname')}: {needs.variant} {needs.version or ''} for {needs.env.key()}: "
                      f"{len(self._rollout[key])} file(s)" + (f" + {len(agent)} agent file(s)" if agent else ""))
        return LockNode(str(plan.get("hostname")), needs.variant, needs.version, self._rollout[key], agent,
                        dict(plan.get("target_env") or {}))

    def _names(self, infos: Sequence[tuple[ArtifactInfo, str]]) -> tuple[str, ...]:
        for info, source in infos:
            self.infos.setdefault(info.sha256, info)
            self.sources.setdefault(info.sha256, source)
        return tuple(dict.fromkeys(info.filename for info, _ in infos))

    def _index(self) -> str:
        return f"index {self.config.index_url}"

    def _rollout_files(self, needs: NodeNeeds, builds: bool) -> list[tuple[ArtifactInfo, str]]:
        prov = self.provisioner
        if builds:
            sdist = prov.sdist(needs)
            reqs = sdist_requirements(prov.artifacts.path_for(sdist.sha256), needs.env)
            deps = prov.upstream.closure(reqs, needs.env) if reqs else []
            return [(sdist, self._index()), *((d, self._index()) for d in deps), *self._pip()]
        got = prov.install_set(needs)
        wheel_source = self._index()
        if needs.variant != "fa4" and needs.artifact_url:
            wheel_source = self.config.release_urls(needs.artifact_url, needs.artifact or "")[0]
        pip = {a.sha256 for a, _ in self._pip()}
        return [(got.wheel, wheel_source),
                *((d, "ensurepip (bundled with Python)" if d.sha256 in pip else self._index()) for d in got.deps)]

    def _pip(self) -> list[tuple[ArtifactInfo, str]]:
        wheel = bundled_pip_wheel()
        if wheel is None:
            return []
        return [(self.provisioner.artifacts.put_file(wheel, kind="wheel", provenance=Provenance.upstream(
            wheel.as_uri())), "ensurepip (bundled with Python)")]

    def _agent_files(self, env: TargetEnv) -> list[tuple[ArtifactInfo, str]]:
        out: list[tuple[ArtifactInfo, str]] = []
        root = project_root()
        if root is None:
            if not self._agent_note_done:
                self.progress("agent: fleetctl is installed, not run from a checkout: its own wheel is skipped "
                              "(add it with `fleetctl artifact add fleetctl-*.whl`)")
                self._agent_note_done = True
        else:
            if self._fleetctl is None:
                dest = self.scratch / "fleetctl-wheel"
                dest.mkdir(exist_ok=True)
                built = build_fleetctl_wheel(root, dest)
                self._fleetctl = self.provisioner.artifacts.put_file(built, kind="wheel",
                                                                     provenance=Provenance.upstream(root.as_uri()))
            out.append((self._fleetctl, f"built from {root}"))
        # the agent never imports torch: resolve without the torch stub the flash-attn closures use
        agent_env = TargetEnv(python=env.python, arch=env.arch, glibc=env.glibc, torch=None)
        deps = self.provisioner.upstream.closure(agent_requirements(), agent_env)
        out += [(d, self._index()) for d in deps]
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def scratch_provisioner(config: UpstreamConfig) -> Iterator[tuple[Provisioner, Path]]:
    """A ``Provisioner`` over a throw-away SQLite artifact store (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="fleet-bundle-") as tmp:
        root = Path(tmp)
        store = open_store(f"sqlite:///{root / 'store.db'}")
        try:
            yield Provisioner.create(ArtifactStore(root / "artifacts", store), config), root
        finally:
            store.engine.dispose()


def export_bundle(plans: Sequence[Mapping[str, Any]], out: Path, config: UpstreamConfig, *, agent_wheels: bool,
                  progress: Progress) -> Lock:
    """Fetch everything ``plans`` need and write the bundle to ``out`` (a temporary name, renamed at the end:
    a failure leaves no partial bundle)."""
    if not plans:
        raise NotFoundError("no node needs artifacts: nothing to export",
                            hint="every selected node is sdpa/blocked or simulated; check the plan (`fleetctl plan`)")
    with scratch_provisioner(config) as (prov, scratch):
        collector = Collector(prov, scratch, agent_wheels=agent_wheels, progress=progress)
        nodes = [collector.node(p) for p in plans]
        by_name: dict[str, ArtifactInfo] = {}
        for info in collector.infos.values():
            other = by_name.setdefault(info.filename, info)
            if other.sha256 != info.sha256:
                raise ConflictError(f"two different files are both named {info.filename} ({other.sha256[:12]}…, "
                                    f"{info.sha256[:12]}…)", hint="upstream serves two contents under one name; "
                                                                  "find out why before carrying either")
        files = tuple(LockFile(i.filename, i.sha256, i.size, i.kind, collector.sources.get(i.sha256, ""))
                      for i in sorted(by_name.values(), key=lambda a: a.filename))
        lock = Lock(_now(), files, tuple(nodes))
        write_tar(out, lock, {i.filename: prov.artifacts.path_for(i.sha256) for i in by_name.values()})
    return lock


def write_tar(out: Path, lock: Lock, paths: Mapping[str, Path]) -> None:
    out = out.resolve()
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            data = (json.dumps(lock.to_json(), indent=2) + "\n").encode()
            tf.addfile(_member(LOCK_NAME, len(data)), io.BytesIO(data))
            for f in lock.files:
                with paths[f.filename].open("rb") as handle:
                    tf.addfile(_member(f"{FILES_DIR}/{f.filename}", f.size), handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(dt.datetime.now(dt.UTC).timestamp())
    return info


# ---- reading a bundle ------------------------------------------------------------------------------------


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise InputError(f"no bundle at {path}", hint="check the path") from None
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path} is not a readable tar: {exc}",
                         hint="give a file `fleetctl bundle export` wrote") from None


def _check_members(path: Path, members: Sequence[tarfile.TarInfo]) -> None:
    """Only ``lock.json`` and ``files/<safe name>`` regular files (and the ``files`` folder) may be in it."""
    for m in members:
        name = m.name.rstrip("/")
        if m.isdir() and name == FILES_DIR:
            continue
        ok = m.isfile() and (name == LOCK_NAME or (name.startswith(FILES_DIR + "/")
                                                   and _safe(name[len(FILES_DIR) + 1:])))
        if not ok:
            raise InputError(f"{path} holds an unexpected member {m.name!r} ({'file' if m.isfile() else 'not a file'})",
                             hint="a bundle holds only lock.json and files/<name>; this one was not written by "
                                  "`fleetctl bundle export` or was tampered with — nothing was extracted or uploaded")


def _safe(name: str) -> bool:
    try:
        safe_filename(name)
    except InputError:
        return False
    return True


def read_lock(path: Path) -> Lock:
    """The lock of a bundle (members checked, nothing extracted)."""
    with _open(path) as tf:
        members = tf.getmembers()
        _check_members(path, members)
        member = next((m for m in members if m.name == LOCK_NAME), None)
        handle = tf.extractfile(member) if member is not None else None
        if handle is None:
            raise InputError(f"{path} has no lock.json", hint="give a file `fleetctl bundle export` wrote")
        if member is not None and member.size > MAX_LOCK_BYTES:
            raise InputError(f"{path}: lock.json is larger than {MAX_LOCK_BYTES >> 20} MiB", hint="export it again")
        try:
            obj = json.loads(handle.read())
        except ValueError as exc:
            raise InputError(f"{path}: lock.json is not JSON ({exc})", hint="export it again") from None
    return Lock.from_json(obj, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def extract_verified(path: Path, dest: Path) -> tuple[Lock, dict[str, Path]]:
    """Extract the bundle into ``dest`` (a temporary directory) and check every file against the lock.

    Raises before returning on any difference — a file missing, one not in the lock, a size or a sha256
    that is not the lock's — so the caller uploads nothing from a damaged or altered bundle."""
    lock = read_lock(path)
    with _open(path) as tf:
        _check_members(path, tf.getmembers())
        try:
            tf.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"cannot extract {path}: {exc}", hint="the bundle is damaged; export it again") from None
    folder = dest / FILES_DIR
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    listed = {f.filename for f in lock.files}
    extra = sorted(present - listed)
    if extra:
        raise InputError(f"{path} holds files/{extra[0]}, which lock.json does not list; nothing was uploaded",
                         hint="the bundle was altered after export; export it again")
    out: dict[str, Path] = {}
    for f in lock.files:
        p = folder / f.filename
        if not p.is_file():
            raise InputError(f"{path} lacks files/{f.filename}, which lock.json lists; nothing was uploaded",
                             hint="the bundle is incomplete; export it again")
        size = p.stat().st_size
        if size != f.size:
            raise InputError(f"files/{f.filename} in {path} has {size} bytes, lock.json says {f.size}; nothing was "
                             f"uploaded", hint="the bundle was damaged or altered in transit; export it again")
        digest = _sha256(p)
        if digest != f.sha256:
            raise InputError(f"files/{f.filename} in {path} has sha256 {digest}, lock.json says {f.sha256}; nothing "
                             f"was uploaded", hint="the bundle was damaged or altered in transit; export it again "
                                                   "(and find out how it changed)")
        out[f.filename] = p
    return lock, out


