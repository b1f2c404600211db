"""What the rules share while one node is resolved: the ``Resolution`` the platform rules are written against,
the wheel query and the catalog lookup. Pure: no I/O.

``core`` (the general rules, whose ``_Resolution`` is a ``Resolution``) and ``platforms`` (ROCm, Jetson,
Windows) both import this module and not each other's internals, so the resolver has no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from fleetctl.controller.resolver import rules
from fleetctl.controller.resolver.model import BuildParams, Decision, Policy
from fleetctl.fleet.facts import NodeFacts

if TYPE_CHECKING:  # controller.catalog imports controller.resolver.rules; keep this package import-light
    from fleetctl.controller.catalog import Catalog, Wheel


class Resolution(Protocol):
    """One node's resolution in progress: its inputs, the reasons and rejections so far, and how it ends."""

    facts: NodeFacts
    catalog: Catalog
    policy: Policy
    target: str | None
    reasons: list[str]

    def reject(self, candidate: str, reason: str) -> None: ...

    def finish(self, variant: str, version: str | None, steps: tuple[str, ...], *, artifact: Wheel | None = None,
               toolkit: str | None = None, build: BuildParams | None = None) -> Decision: ...

    def apt_first(self, steps: tuple[str, ...]) -> tuple[str, ...]: ...

    def toolkit(self, release_floor: tuple[int, int], what: str, *, needs_blackwell: bool) -> Toolkit: ...

    def release_for_torch(self, target: str) -> str | None: ...


@dataclass(frozen=True)
class WheelQuery:
    """The node properties a wheel must match (hashable, for the cached release scan)."""

    torch_cuda: str
    torch_mm: str
    cxx11abi: bool
    python_tag: str
    platform: str
    glibc: str | None
    ccs: tuple[tuple[int, int], ...]
    os_family: str = ""

    def describe(self) -> str:
        abi = "TRUE" if self.cxx11abi else "FALSE"
        return f"torch{self.torch_mm} (CUDA {self.torch_cuda}) cxx11abi{abi} {self.python_tag} {self.platform}"


@dataclass(frozen=True)
class Toolkit:
    """The nvcc a source build will use, and the cuda-toolkit step that provides it if needed."""

    nvcc: tuple[int, int] | None  # None: no toolkit can qualify
    install: str | None  # "12.4" when a cuda-toolkit step is needed
    reason: str


def arch_label(archs: tuple[int, ...]) -> str:
    return ", ".join(f"sm_{a}" for a in archs)


def python_mm(facts: NodeFacts) -> tuple[int, int]:
    return rules.major_minor(facts.python.version)


def python_tag(facts: NodeFacts) -> str:
    """The wheel tag pip matches: the probed ABI ("cp313t" on a free-threaded build, which cannot load cp313
    wheels), else cpXY from the version (agents before the ABI probe; always a GIL build then)."""
    if facts.python.abi:
        return facts.python.abi
    py = python_mm(facts)
    return f"cp{py[0]}{py[1]}"


def wheel_query(facts: NodeFacts) -> WheelQuery:
    torch = facts.torch
    assert torch is not None and torch.cuda is not None
    return WheelQuery(torch_cuda=torch.cuda, torch_mm=rules.fmt_mm(rules.major_minor(torch.version)),
                      cxx11abi=torch.cxx11abi, python_tag=python_tag(facts),
                      platform="win_amd64" if facts.os.is_windows else f"linux_{facts.os.arch}",
                      glibc=facts.os.glibc,
                      ccs=tuple(sorted({rules.parse_cc(g.compute_capability) for g in facts.gpus})),
                      os_family=rules.os_family(facts.os.id))


@lru_cache(maxsize=8192)
def pick_wheel(catalog: Catalog, release: str, query: WheelQuery) -> tuple[Wheel | None, str]:
    """The first catalog wheel of ``release`` that installs and runs on the node, or why none does."""
    tag = rules.wheel_cuda_tag(release, query.torch_cuda, query.torch_mm)
    torch_major = rules.major_minor(query.torch_cuda)[0]
    if rules.cuda_tag_major(tag) != torch_major:
        return None, (f"flash-attn {release}'s setup.py maps CUDA {query.torch_cuda} to {tag}, whose binaries need "
                      f"libcudart.so.{rules.cuda_tag_major(tag)}, not CUDA {torch_major}'s (fixed in 2.8.3.post1)")
    wheels = catalog.lookup(release, tag, query.torch_mm, query.cxx11abi, query.python_tag, query.platform)
    if not wheels:
        return None, f"no {tag} wheel for {query.describe()} in the catalog"
    problems = []
    for wheel in wheels:
        if wheel.min_glibc and query.glibc and rules._v(query.glibc) < rules._v(wheel.min_glibc):
            problems.append(f"{wheel.filename} needs glibc ≥ {wheel.min_glibc}, the node has {query.glibc}")
            continue
        if wheel.os_family and wheel.os_family != query.os_family:
            problems.append(f"{wheel.filename} was built on {wheel.os_family}, the node's OS family is "
                            f"{query.os_family}")
            continue
        missing = [cc for cc in query.ccs if rules.best_sass(wheel.cuda_archs, cc) is None]
        if missing:
            problems.append(f"{wheel.filename} carries {arch_label(wheel.cuda_archs)}, no code for cc "
                            f"{', '.join(rules.fmt_mm(c) for c in missing)}")
            continue
        return wheel, ""
    return None, "; ".join(problems)
