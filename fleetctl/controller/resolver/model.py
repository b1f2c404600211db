"""The resolver's inputs (policy) and output (decision), in the DESIGN §3.2 shape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.controller.resolver import rules
from fleetctl.fleet.errors import InputError, UsageError

PREFER = ("compatible", "fastest")
WORKLOADS = ("training", "prefill", "decode", "decode-kernel")  # controller/attention.py PROFILES, one each
VARIANTS = ("fa2-wheel", "fa2-source", "fa1-source", "fa3-source", "fa4", "sdpa", "blocked")
STEPS = ("apt-keyring-fix", "cuda-toolkit", "install-wheel", "build-from-source", "verify")


@dataclass(frozen=True)
class Policy:
    """What the operator asked for. Defaults are DESIGN §3.2's default policy."""

    version: str | None = None  # target FA2 release; None: the newest FA2 release in the catalog
    fa3: bool = False  # FA3 (hopper/) source builds on Hopper GPUs
    fa4: bool = False  # flash-attn-4 (CuTe DSL) where its arch/python/driver limits allow
    source_builds: bool = True  # allow compiling on the node when no wheel matches
    # "compatible" (default): FA2, FA3/FA4 only when asked. "fastest": the implementation measured fastest for
    # ``workload`` among those the node may install (controller/attention.py ranks them; docs/resolver.md)
    prefer: str = "compatible"
    workload: str = "training"  # training | prefill | decode: which measurements "fastest" reads

    @staticmethod
    def check_version(version: str) -> str:
        """Validate a ``--version``/policy target: a PEP 440 FA2 version from 2.0.6 on."""
        parsed = rules.parse_version(version)
        if parsed is None or version.strip() != version or not version[0].isdigit():
            raise UsageError(f"--version {version!r} is not a version",
                             hint="give an exact FA2 release such as 2.8.3 (see `fleetctl catalog list`)")
        if parsed.major != 2 or parsed < rules._v(rules.MIN_WHEEL_RELEASE):
            raise UsageError(f"--version {version} is not a FlashAttention 2 release this tool installs",
                             hint="FA2 targets are 2.0.6 or newer; FA1/FA3/FA4 are chosen per GPU and by --fa3/--fa4")
        return version

    @staticmethod
    def from_json(obj: Any, source: str) -> Policy:
        """Parse a policy file: ``{"version"?, "fa3"?, "fa4"?, "source_builds"?, "prefer"?, "workload"?}``;
        unknown keys are errors."""
        if not isinstance(obj, Mapping):
            raise InputError(f"{source}: a policy must be a JSON object", hint='e.g. {"version": "2.8.3", "fa4": true}')
        known = {"version", "fa3", "fa4", "source_builds", "prefer", "workload"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"{source}: unknown policy field(s) {', '.join(unknown)}",
                             hint=f"known fields: {', '.join(sorted(known))}")
        for key in ("fa3", "fa4", "source_builds"):
            if key in obj and not isinstance(obj[key], bool):
                raise InputError(f"{source}: field {key} must be true or false, got {obj[key]!r}",
                                 hint="use JSON true/false")
        version = obj.get("version")
        if version is not None and not isinstance(version, str):
            raise InputError(f"{source}: field version must be a string, got {version!r}", hint='e.g. "2.8.3"')
        for key, choices in (("prefer", PREFER), ("workload", WORKLOADS)):
            if key in obj and obj[key] not in choices:
                raise InputError(f"{source}: field {key} must be one of {', '.join(choices)}, got {obj[key]!r}",
                                 hint=f'e.g. "{key}": "{choices[-1] if key == "prefer" else choices[0]}"')
        return Policy(version=Policy.check_version(version) if version is not None else None,
                      fa3=obj.get("fa3", False), fa4=obj.get("fa4", False),
                      source_builds=obj.get("source_builds", True), prefer=obj.get("prefer", "compatible"),
                      workload=obj.get("workload", "training"))

    @staticmethod
    def load(path: Path) -> Policy:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot read policy {path}: {exc.strerror or exc}", hint="check --policy") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"policy {path} is not JSON: {exc}", hint='e.g. {"version": "2.8.3"}') from None
        return Policy.from_json(obj, str(path))


@dataclass(frozen=True)
class MeasuredImpl:
    """One attention implementation's measured speed for the policy's workload (controller/attention.py)."""

    impl: str  # fa2 | fa1 | fa3 | fa4 | sdpa_cudnn | sdpa_flash | sdpa_efficient | sdpa_math | an e2e setting
    value: float  # median over the compared shapes, in Measurements.unit
    source: str  # "this node, 2026-12-02" | "fleet (h1, h2)" | "prior tests/fixtures/…"
    shapes: int = 0
    setting: str = ""  # how to use it ('attn_implementation="sdpa"; with sdpa_kernel(...)')


@dataclass(frozen=True)
class Measurements:
    """The resolver's typed view of the attention recommendation: correct implementations, fastest first."""

    workload: str
    unit: str
    ranked: tuple[MeasuredImpl, ...]
    notes: tuple[str, ...] = ()

    def get(self, impl: str) -> MeasuredImpl | None:
        return next((m for m in self.ranked if m.impl == impl), None)


@dataclass(frozen=True)
class Rejected:
    candidate: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"candidate": self.candidate, "reason": self.reason}


@dataclass(frozen=True)
class BuildParams:
    """How to run a source build, and what makes its wheel reusable on other nodes."""

    cuda_archs: tuple[str, ...]  # FLASH_ATTN_CUDA_ARCHS entries, narrowed to the node's GPUs
    max_jobs: int
    nvcc_threads: int
    estimated_minutes: int
    nvcc: str  # the toolkit the build uses (the node's, or the one the plan installs)
    build_key: str
    env: Mapping[str, str] = field(default_factory=dict)
    # the builder's OS family and glibc (both in build_key): its wheel serves only nodes of that family with
    # glibc ≥ this one (controller/local_wheels.py turns them into the catalog entry's os_family/min_glibc)
    os_family: str = ""
    glibc: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "cuda_archs": list(self.cuda_archs), "max_jobs": self.max_jobs,
                "nvcc_threads": self.nvcc_threads, "nvcc": self.nvcc, "estimated_minutes": self.estimated_minutes,
                "build_key": self.build_key, "os_family": self.os_family, "glibc": self.glibc}


@dataclass(frozen=True)
class Decision:
    hostname: str
    variant: str
    flash_attn_version: str | None
    artifact: str | None
    toolkit: str | None
    steps: tuple[str, ...]
    reasons: tuple[str, ...]
    rejected: tuple[Rejected, ...]
    build: BuildParams | None = None
    artifact_url: str | None = None  # where install-wheel fetches the artifact from (not a §3.2 field)
    # additions for plans the agent cannot carry out yet (Windows): the exact commands for a person to run, and
    # a label saying so. Written to JSON only when set, so every other plan prints as before.
    commands: tuple[str, ...] = ()
    execution: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The §3.2 decision object, plus ``build`` (null unless a source build)."""
        return {
            "hostname": self.hostname,
            "variant": self.variant,
            "flash_attn_version": self.flash_attn_version,
            "artifact": self.artifact,
            "toolkit": self.toolkit,
            "steps": list(self.steps),
            "reasons": list(self.reasons),
            "rejected": [r.to_json() for r in self.rejected],
            "build": self.build.to_json() if self.build is not None else None,
            **({"execution": self.execution, "commands": list(self.commands)} if self.execution else {}),
        }
