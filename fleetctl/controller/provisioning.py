"""What each node's install or build needs from the artifact store, and getting it there (docs/rollout.md).

The rollout engine asks, right before a real node's ``build-from-source`` or ``install-wheel`` step, for the
step's inputs; the dry run asks for the same thing without fetching (``preflight``). One owner for both, so
the preflight never promises what the step cannot get:

* ``fa2-wheel`` — the catalog's release wheel (store by digest or name, else ``Upstream.fetch_file`` from the
  release URL or the mirror), or the wheel an earlier build put in the store;
* ``fa2-source`` / ``fa1-source`` / ``fa3-source`` — the builder's sdist (store, else the index); the install
  after the build uses the built wheel;
* ``fa4`` — ``flash-attn-4[cu13]==V`` (``[cu13]`` for a CUDA 13 torch) resolved with its closure.

Every install also gets its **dependency closure**: the wheel's own ``Requires-Dist`` evaluated for the node
(its Python, platform and the extras asked for; torch dropped — the node's torch is never touched), resolved
by pip for the node's interpreter and platform (``Upstream.closure``), plus a pip wheel so a target env
without pip (made by uv, or ``--without-pip``) can still be installed into. The playbook installs the
flash-attn wheel hash-pinned, then the requirements from the fetched wheelhouse only (``--no-index``), and
runs ``pip check``.
"""

from __future__ import annotations

import enum
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from fleetctl.controller.artifacts import VOUCHED, ArtifactInfo, ArtifactStore, Provenance, Source
from fleetctl.controller.resolver import rules
from fleetctl.controller.upstream import TargetEnv, Upstream, UpstreamConfig, normalize, wheel_requires
from fleetctl.fleet.errors import FleetError, UpstreamError

#: what a requirement line sent to a node may contain (it ends up in an Ansible variable and a pip argv)
SAFE_REQUIREMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ]{0,199}")
NEVER_INSTALLED = frozenset({"torch"})  # the node's own; flash-attn never changes it
#: the distribution a variant installs, where it is not ``flash-attn`` (job var ``dist_name``)
DIST_NAMES: Mapping[str, str] = {"fa3-source": "flash_attn_3", "fa4": "flash-attn-4"}


class Availability(enum.StrEnum):
    IN_STORE = "in-store"
    FETCH = "fetch"  # will be fetched from upstream when the step starts
    RESOLVE = "resolve"  # resolved when the step starts (store first, then the index)
    MISSING = "missing"  # cannot be had: the step would fail


@dataclass(frozen=True)
class PreflightItem:
    """One artifact a node's steps need, and where it will come from."""

    what: str  # "flash-attn wheel", "sdist", "dependencies"
    name: str  # file name or requirement
    availability: Availability
    source: str  # "artifact store", a URL, the index
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "name": self.name, "availability": str(self.availability),
                "source": self.source, "fix": self.fix}


@dataclass(frozen=True)
class InstallSet:
    """An install step's inputs: the flash-attn wheel, its requirements for this node, and their wheels."""

    dist_name: str
    wheel: ArtifactInfo
    requirements: tuple[str, ...]
    deps: tuple[ArtifactInfo, ...]
    extras: tuple[str, ...] = ()

    def job_vars(self) -> dict[str, Any]:
        """What install-wheel.yml reads (docs/playbooks.md); the agent turns sha256s into local paths."""
        return {"wheel_sha256": self.wheel.sha256, "wheel_filename": self.wheel.filename,
                "dist_name": self.dist_name, "dep_requirements": list(self.requirements),
                "deps": [{"sha256": d.sha256, "filename": d.filename} for d in self.deps]}

    def describe(self) -> list[dict[str, Any]]:
        """Each file with where it came from (``rollout status --json``: ``result.artifacts``)."""
        return [describe_artifact(a) for a in (self.wheel, *self.deps)]


@dataclass(frozen=True)
class NodeNeeds:
    """The parts of a node's rollout plan (``PlannedNode.to_json``) that decide its artifacts."""

    variant: str
    version: str | None
    artifact: str | None  # catalog file name of the wheel to install
    artifact_url: str | None
    artifact_sha256: str | None
    env: TargetEnv
    cuda_major: int | None = None
    extras: tuple[str, ...] = field(default=())

    @staticmethod
    def from_plan(plan: Mapping[str, Any]) -> NodeNeeds:
        env = plan.get("target_env") or {}
        if not isinstance(env, Mapping) or not env.get("python"):
            raise FleetError(f"the plan of {plan.get('hostname')} has no target environment (planned by an older "
                             f"controller)", hint="start a new rollout (`fleetctl rollout flash-attn`)")
        target = TargetEnv(python=str(env["python"]), arch=str(env.get("arch") or "x86_64"),
                           glibc=env.get("glibc"), torch=env.get("torch"))
        cuda = plan.get("torch_cuda")
        cuda_major = rules.major_minor(str(cuda))[0] if cuda else None
        extras = ("cu13",) if plan.get("variant") == "fa4" and cuda_major == 13 else ()
        return NodeNeeds(variant=str(plan.get("variant")), version=plan.get("version"), artifact=plan.get("artifact"),
                         artifact_url=plan.get("artifact_url"), artifact_sha256=plan.get("artifact_sha256"),
                         env=target, cuda_major=cuda_major, extras=extras)

    @property
    def dist_name(self) -> str:
        return DIST_NAMES.get(self.variant, "flash-attn")

    @property
    def sdist_project(self) -> str:
        return "flash_attn_3" if self.variant == "fa3-source" else "flash-attn"


def describe_artifact(info: ArtifactInfo) -> dict[str, Any]:
    """A file a step uses, as the rollout records it on the node: name, digest, size and provenance."""
    return {"filename": info.filename, "sha256": info.sha256, "size": info.size,
            "source": str(info.provenance.source), "provenance": info.provenance.to_json()}


def plan_env(facts: Any) -> dict[str, Any]:
    """``target_env`` of a plan: what pip needs to resolve for this node (``TargetEnv`` as JSON)."""
    env = TargetEnv.from_facts(facts)
    return {"python": env.python, "arch": env.arch, "glibc": env.glibc, "torch": env.torch}


def node_requirements(wheel: Path, dist_name: str, env: TargetEnv, extras: Sequence[str] = ()) -> tuple[str, ...]:
    """The wheel's ``Requires-Dist`` that apply on this node (markers evaluated for its Python and platform,
    with ``extras``), torch dropped, markers stripped — plain lines a requirements file can hold."""
    marker_env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    marker_env.update(python_version=env.python, python_full_version=f"{env.python}.0", platform_machine=env.arch,
                      sys_platform="linux", platform_system="Linux", os_name="posix",
                      implementation_name="cpython", platform_python_implementation="CPython")
    out: list[str] = []
    for line in wheel_requires(wheel):
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise UpstreamError(f"{wheel.name} declares a requirement pip cannot read: {line!r} ({exc})",
                                hint="this wheel is broken; use another release") from None
        if normalize(req.name) in NEVER_INSTALLED:
            continue
        if req.marker is not None and not any(
                req.marker.evaluate({**marker_env, "extra": extra}) for extra in (*extras, "")):
            continue
        req.marker = None
        text = str(req)
        if not SAFE_REQUIREMENT_RE.fullmatch(text) or req.url:
            raise UpstreamError(f"{wheel.name} ({dist_name}) declares a requirement fleetctl will not pass to a "
                                f"node: {text!r}",
                                hint="only plain name[extras]<specifiers> requirements are installed")
        out.append(text)
    return tuple(dict.fromkeys(out))


def bundled_pip_wheel() -> Path | None:
    """The pip wheel that ships with the controller's Python (ensurepip): bootstraps envs without pip."""
    try:
        bundled = importlib.resources.files("ensurepip") / "_bundled"
        return next((Path(str(p)) for p in bundled.iterdir() if p.name.startswith("pip-") and p.name.endswith(".whl")),
                    None)
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return None


class Provisioner:
    """Gets a node's step inputs into the artifact store (``inputs``) or says where they'd come from
    (``preflight``). Blocking (network, pip): the engine calls it from a worker thread."""

    def __init__(self, artifacts: ArtifactStore, upstream: Upstream) -> None:
        self.artifacts = artifacts
        self.upstream = upstream

    @staticmethod
    def create(artifacts: ArtifactStore, config: UpstreamConfig) -> Provisioner:
        return Provisioner(artifacts, Upstream(config, artifacts))

    # ---- the steps' inputs ----------------------------------------------------------------------

    def sdist(self, needs: NodeNeeds) -> ArtifactInfo:
        if not needs.version:
            raise UpstreamError(f"the {needs.variant} plan names no version to build", hint="this is a bug")
        return self.upstream.sdist(needs.sdist_project, needs.version)

    def install_set(self, needs: NodeNeeds, built: ArtifactInfo | None = None) -> InstallSet:
        """The wheel to install (``built``: the one the build step stored) with its dependency closure."""
        if built is not None:
            wheel = built
        elif needs.variant == "fa4":
            return self._fa4(needs)
        else:
            wheel = self._release_wheel(needs)
        path = self.artifacts.path_for(wheel.sha256)
        reqs = node_requirements(path, needs.dist_name, needs.env, needs.extras)
        deps = self._closure(reqs, needs.env)
        return InstallSet(needs.dist_name, wheel, reqs, deps, needs.extras)

    def _release_wheel(self, needs: NodeNeeds) -> ArtifactInfo:
        if not needs.artifact:
            raise UpstreamError(f"the {needs.variant} plan names no wheel to install", hint="this is a bug")
        urls = self.upstream.config.release_urls(needs.artifact_url, needs.artifact) if needs.artifact_url else []
        if not urls:
            found = self._planned_wheel(needs) or self.upstream.stored(needs.artifact, needs.artifact_sha256)
            if found is None:
                raise UpstreamError(f"{needs.artifact} is not in the artifact store and the catalog gives no URL "
                                    f"for it", hint=f"`fleetctl artifact add {needs.artifact}`")
            return found
        return self.upstream.fetch_file(urls, needs.artifact, "wheel", expected_sha256=needs.artifact_sha256)

    def _planned_wheel(self, needs: NodeNeeds) -> ArtifactInfo | None:
        """The stored wheel a plan names by digest. Plans carry a digest only for entries of the controller's own
        catalog, which admits a build's wheel only as that succeeded build's own upload (local_wheels.py): such a
        file is handed out by digest even though, by name, only vouched-for files are (Upstream.stored)."""
        if not needs.artifact_sha256:
            return None
        try:
            info = self.artifacts.get(needs.artifact_sha256)
        except FleetError:
            return None
        trusted = info.vouched or any(p.source in (Source.BUILD, Source.LEGACY) for p in info.sources)
        return info if trusted else None

    def _fa4(self, needs: NodeNeeds) -> InstallSet:
        extras = f"[{','.join(needs.extras)}]" if needs.extras else ""
        wanted = f"flash-attn-4{extras}=={needs.version}"
        got = self.upstream.closure([wanted], needs.env)
        main = next((a for a in got if normalize(a.filename.split("-", 1)[0]) == "flash-attn-4"), None)
        if main is None:
            raise UpstreamError(f"resolving {wanted} gave no flash_attn_4 wheel", hint="check the index")
        reqs = node_requirements(self.artifacts.path_for(main.sha256), needs.dist_name, needs.env, needs.extras)
        deps = tuple(a for a in got if a.sha256 != main.sha256)
        return InstallSet(needs.dist_name, main, reqs, (*deps, *self._pip()), needs.extras)

    def _closure(self, requirements: Sequence[str], env: TargetEnv) -> tuple[ArtifactInfo, ...]:
        deps = tuple(self.upstream.closure(requirements, env)) if requirements else ()
        return (*deps, *self._pip())

    def _pip(self) -> tuple[ArtifactInfo, ...]:
        """A pip wheel in every wheelhouse: the playbook runs it when the target env has no pip of its own."""
        found = next((a for a in self.artifacts.list_all(sources=VOUCHED) if a.filename.startswith("pip-")
                      and a.filename.endswith("-py3-none-any.whl")), None)
        if found is not None:
            return (found,)
        wheel = bundled_pip_wheel()
        if wheel is None:
            return ()
        return (self.artifacts.put_file(wheel, kind="wheel", provenance=Provenance.upstream(wheel.as_uri())),)

    # ---- the dry run ------------------------------------------------------------------------------

    def preflight(self, needs: NodeNeeds, *, builds: bool, built: bool) -> list[PreflightItem]:
        """Where each input of this node's steps will come from, without fetching anything."""
        cfg = self.upstream.config
        items: list[PreflightItem] = []
        if builds and not built and needs.version:
            names = [f"{needs.sdist_project.replace('-', '_')}-{needs.version}.tar.gz"]
            found = self.upstream.stored(names[0])
            if found is not None:
                items.append(PreflightItem("sdist", found.filename, Availability.IN_STORE, "artifact store"))
            elif cfg.can_fetch and cfg.index_url:
                items.append(PreflightItem("sdist", names[0], Availability.FETCH, cfg.index_url))
            else:
                items.append(PreflightItem("sdist", names[0], Availability.MISSING, cfg.describe(),
                                           self.upstream.offline_hint(names[0])))
        if needs.variant == "fa4":
            extras = f"[{','.join(needs.extras)}]" if needs.extras else ""
            items.append(self._resolvable(f"flash-attn-4{extras}=={needs.version}", "flash-attn-4 and dependencies"))
            return items
        if needs.variant == "fa2-wheel" and needs.artifact:
            found = self._planned_wheel(needs) or self.upstream.stored(needs.artifact, needs.artifact_sha256)
            if found is not None:
                items.append(PreflightItem("flash-attn wheel", found.filename, Availability.IN_STORE,
                                           "artifact store"))
            elif needs.artifact_url and cfg.can_fetch:
                items.append(PreflightItem("flash-attn wheel", needs.artifact, Availability.FETCH,
                                           cfg.release_urls(needs.artifact_url, needs.artifact)[0]))
            else:
                items.append(PreflightItem("flash-attn wheel", needs.artifact, Availability.MISSING,
                                           cfg.describe(), self.upstream.offline_hint(needs.artifact)))
        if needs.variant in ("fa2-wheel", "fa2-source", "fa1-source", "fa3-source"):
            items.append(self._resolvable(f"{needs.dist_name} requirements", "dependencies"))
        return items

    def _resolvable(self, name: str, what: str) -> PreflightItem:
        cfg = self.upstream.config
        if cfg.can_fetch and cfg.index_url:
            return PreflightItem(what, name, Availability.RESOLVE, f"artifact store, then {cfg.index_url}")
        return PreflightItem(what, name, Availability.RESOLVE, "artifact store only (offline)",
                             "if a wheel is missing the step fails saying which: `fleetctl bundle export` on a "
                             "connected host, `fleetctl bundle import` here")


def describe_failure(exc: FleetError) -> str:
    return exc.message + (f" — {exc.hint}" if exc.hint else "")
