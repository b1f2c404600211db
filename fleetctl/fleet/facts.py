"""The node facts contract (DESIGN §3.1): typed model, strict parsing, JSON output.

``parse_node`` turns a decoded JSON object into ``NodeFacts`` or raises
``FactsError`` naming the node and the field. Unknown fields are ignored; a
missing optional section (driver, toolkit, torch, flash_attn, apt) is ``None``.
``NodeFacts.to_json`` gives back exactly the contract's shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fleetctl.fleet.errors import FactsError

MAX_FACTS_BYTES = 256 * 1024
MAX_GPUS = 64
MAX_APT_ERRORS = 200

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?\Z")  # \Z: "$" lets "host\n" through
DOTTED_RE = re.compile(r"^\d+(?:\.\d+)+$")  # "550.54.15", "2.35", "12.4", "8.0"
PY_VERSION_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?(?:[a-z]+\d*)?\+?$")
TORCH_VERSION_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?(?:(?:a|b|rc|\.dev|\.post)\d+)*(?:\+[A-Za-z0-9.]+)?$")
# CUDA archs (sm_90, compute_120, sm_90a) and, on ROCm builds of torch, AMD gfx targets (gfx90a, gfx942, with
# optional feature suffixes as torch.cuda.get_arch_list() prints them: "gfx90a:sramecc+:xnack-")
TORCH_HIP_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?(?:-[0-9a-f]+)?$")  # torch.version.hip: "6.2.41133-dd7f95766"
ARCH_RE = re.compile(r"^(?:(?:sm|compute)_\d+[a-z]?|gfx[0-9a-f]{3,5}(?::[a-z]+[+-])*)$")
GFX_RE = re.compile(r"^gfx[0-9a-f]{3,5}$")
PY_ABI_RE = re.compile(r"^cp\d{2,3}t?$")  # "cp312"; "cp313t" for a free-threaded (Py_GIL_DISABLED) build
ENV_PATH_RE = re.compile(r"^/[^\x00-\x1f\x7f]{0,4095}\Z")  # the target env's directory: absolute, no control chars
ENV_FS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=,\[\]-]{0,511}\Z")  # "nfs4:srv:/export", "local:<id>:254:0"
OS_FAMILIES = ("linux", "windows")
GPU_VENDORS = ("nvidia", "amd")


@dataclass(frozen=True)
class OsFacts:
    id: str
    version_id: str
    arch: str
    kernel: str
    glibc: str | None
    # additions (DESIGN §3.1: optional, so older files still parse); None: not reported
    family: str | None = None  # "linux" | "windows"
    msvc: str | None = None  # MSVC toolset version ("14.40") from vswhere on Windows; None: no Build Tools found
    l4t: str | None = None  # Jetson: L4T release from /etc/nv_tegra_release ("36.4.0")
    jetpack: str | None = None  # Jetson: the JetPack that ships that L4T ("6.1")

    @property
    def is_windows(self) -> bool:
        return self.family == "windows" or self.id.lower() == "windows"


@dataclass(frozen=True)
class DriverFacts:
    version: str
    cuda_max: str


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    compute_capability: str
    memory_mib: int
    uuid: str
    vendor: str | None = None  # "nvidia" | "amd"; None (older agents): NVIDIA
    arch: str | None = None  # AMD GPUs: the gfx target ("gfx942")

    @property
    def is_amd(self) -> bool:
        return self.vendor == "amd"


@dataclass(frozen=True)
class ToolkitFacts:
    nvcc: str
    path: str


@dataclass(frozen=True)
class PythonFacts:
    version: str
    executable: str
    abi: str | None = None  # "cp312"; "cp313t" on a free-threaded build; None: not reported (assume GIL build)
    # where the env lives (agent/probes/probe_target.py env_identity): its directory, and the filesystem holding it
    env_path: str | None = None  # sys.prefix resolved; on a network filesystem the path inside the export
    env_fs: str | None = None  # "nfs4:server:/export" on a network filesystem, "local:<machine-id>:<device>" else

    @property
    def shared_env_key(self) -> str | None:
        """Equal on every node that uses this one environment (a venv on NFS); None when not reported."""
        return f"{self.env_fs}|{self.env_path}" if self.env_fs and self.env_path else None

    @property
    def free_threaded(self) -> bool:
        return self.abi is not None and self.abi.endswith("t")


@dataclass(frozen=True)
class TorchFacts:
    version: str
    cuda: str | None
    cxx11abi: bool
    arch_list: tuple[str, ...]
    hip: str | None = None  # torch.version.hip on ROCm builds ("6.2.41133-dd7f95766")


# The order in which the node's ``flash_attn`` is chosen when several FlashAttention distributions share one
# environment (FA4 4.x installs ``flash_attn.cute`` into the ``flash_attn`` package an FA2 already owns): what
# ``import flash_attn`` gives first (FA2, FA1), then FA3, then FA4. The others are its ``beside``.
FLASH_ATTN_ORDER = ("fa2", "fa1", "fa3", "fa4")
MAX_FLASH_ATTN_BESIDE = 8


@dataclass(frozen=True)
class FlashAttnFacts:
    version: str
    variant: str
    # addition (DESIGN §3.1: optional): the other FlashAttention distributions installed in the same environment
    # (``flash-attn-4`` beside ``flash-attn``); () where there is one; their own ``beside`` is always ()
    beside: tuple[FlashAttnFacts, ...] = ()

    @property
    def installed(self) -> tuple[FlashAttnFacts, ...]:
        """Every FlashAttention installed in the environment, this one first, each without its ``beside``."""
        return (replace(self, beside=()), *self.beside)


def same_distribution(a: str, b: str) -> bool:
    """Whether variants ``a`` and ``b`` are installed by one distribution (FA1 and FA2 are both ``flash-attn``):
    installing one replaces the other; FA3 (``flash_attn_3``) and FA4 (``flash-attn-4``) install beside them."""
    def dist(variant: str) -> str:
        return "flash-attn" if variant in ("fa1", "fa2") else variant
    return dist(a) == dist(b)


def with_installed(current: FlashAttnFacts | None, new: FlashAttnFacts) -> FlashAttnFacts:
    """An environment's ``flash_attn`` facts after ``new`` was installed into it (``current``: before; None:
    none): ``new`` replaces the one of its own distribution and the others stay, as pip does."""
    kept = [f for f in (current.installed if current else ()) if not same_distribution(f.variant, new.variant)]
    together = installed_together([*kept, new])
    assert together is not None
    return together


def flash_attn_rank(variant: str) -> int:
    """Where ``variant`` comes in ``FLASH_ATTN_ORDER`` (unknown ones last)."""
    return FLASH_ATTN_ORDER.index(variant) if variant in FLASH_ATTN_ORDER else len(FLASH_ATTN_ORDER)


def installed_together(installed: Sequence[FlashAttnFacts]) -> FlashAttnFacts | None:
    """The ``flash_attn`` facts of an environment where ``installed`` are (None: none): the first in
    ``FLASH_ATTN_ORDER``, the others ``beside`` it in that order."""
    ordered = sorted(installed, key=lambda f: flash_attn_rank(f.variant))
    if not ordered:
        return None
    return replace(ordered[0], beside=tuple(replace(f, beside=()) for f in ordered[1:]))


@dataclass(frozen=True)
class RocmFacts:
    """The AMD ROCm stack: its version (/opt/rocm/.info/version, amd-smi) and which tool reported the GPUs."""

    version: str
    smi: str  # "amd-smi" | "rocm-smi" | "amdsmi"


@dataclass(frozen=True)
class ResourceFacts:
    cpu_cores: int
    memory_mib: int


@dataclass(frozen=True)
class AptFacts:
    errors: tuple[str, ...]


@dataclass(frozen=True)
class NodeFacts:
    hostname: str
    os: OsFacts
    driver: DriverFacts | None
    gpus: tuple[GpuFacts, ...]
    toolkit: ToolkitFacts | None
    python: PythonFacts
    torch: TorchFacts | None
    flash_attn: FlashAttnFacts | None
    resources: ResourceFacts
    apt: AptFacts | None
    rocm: RocmFacts | None = None  # addition: AMD GPUs' software stack; null on NVIDIA-only nodes
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The DESIGN §3.1 object, with tuples as lists."""
        out: dict[str, Any] = _lists(asdict(self))
        out.pop("extra")
        _drop_unset_additions(out)
        return out

    def with_hostname(self, hostname: str) -> NodeFacts:
        return NodeFacts(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "hostname": hostname})


# Fields added to §3.1 after its first version: written only when known, so the facts of a node that has none of
# them (every NVIDIA Linux node of an older agent) print exactly as before.
_ADDITIONS = {"os": ("family", "msvc", "l4t", "jetpack"), "python": ("abi", "env_path", "env_fs"), "torch": ("hip",)}
_GPU_ADDITIONS = ("vendor", "arch")


def _drop_unset_additions(out: dict[str, Any]) -> None:
    if out.get("rocm") is None:
        out.pop("rocm", None)
    fa = out.get("flash_attn")
    for entry in ([fa, *(fa.get("beside") or [])] if isinstance(fa, dict) else []):
        if not entry.get("beside"):
            entry.pop("beside", None)
    for section, keys in _ADDITIONS.items():
        if isinstance(out.get(section), dict):
            for key in keys:
                if out[section].get(key) is None:
                    out[section].pop(key, None)
    for gpu in out.get("gpus") or []:
        for key in _GPU_ADDITIONS:
            if gpu.get(key) is None:
                gpu.pop(key, None)


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


class _Reader:
    """Reads typed fields out of one JSON object, naming the field in every error."""

    def __init__(self, obj: Any, node: str | None, path: str) -> None:
        if not isinstance(obj, Mapping):
            raise FactsError(f"expected an object, got {type(obj).__name__}", node=node, field=path or None)
        self.obj = obj
        self.node = node
        self.path = path

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _error(self, key: str, message: str) -> FactsError:
        return FactsError(message, node=self.node, field=self._where(key),
                          hint="fix the agent's output or the facts file; see DESIGN §3.1 for the shape")

    def raw(self, key: str, *, required: bool = True) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self._error(key, "missing")
            return None
        return self.obj[key]

    def text(self, key: str, pattern: re.Pattern[str] | None = None, *, required: bool = True,
             what: str = "") -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._error(key, f"expected a string, got {type(value).__name__} {value!r}")
        if len(value) > 4096:
            raise self._error(key, "longer than 4096 characters")
        if pattern is not None and not pattern.match(value):
            raise self._error(key, f"{value!r} is not a valid {what or 'value'}")
        return value

    def req_text(self, key: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        value = self.text(key, pattern, what=what)
        assert value is not None
        return value

    def integer(self, key: str, *, minimum: int = 0) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(key, f"expected an integer, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise self._error(key, f"{value} is below {minimum}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self._error(key, f"expected true or false, got {value!r}")
        return value

    def items(self, key: str, *, limit: int, required: bool = True) -> list[Any] | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._error(key, f"expected a list, got {type(value).__name__}")
        if len(value) > limit:
            raise self._error(key, f"{len(value)} entries, more than the limit of {limit}")
        return value

    def section(self, key: str, *, required: bool) -> _Reader | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        return _Reader(value, self.node, self._where(key))


def _strings(reader: _Reader, key: str, limit: int, pattern: re.Pattern[str] | None = None,
             what: str = "") -> tuple[str, ...]:
    values = reader.items(key, limit=limit) or []
    for i, value in enumerate(values):
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise reader._error(f"{key}[{i}]", f"{value!r} is not a valid {what or 'string'}")
    return tuple(values)


def parse_node(obj: Any) -> NodeFacts:
    """Parse one node object of the facts contract; raise ``FactsError`` on any violation."""
    if not isinstance(obj, Mapping):
        raise FactsError(f"a node must be an object, got {type(obj).__name__}")
    claimed = obj.get("hostname")
    node = claimed if isinstance(claimed, str) and claimed else None
    top = _Reader(obj, node, "")
    hostname = top.req_text("hostname", HOSTNAME_RE, "hostname (letters, digits, '.', '-', '_')")

    os_r = top.section("os", required=True)
    assert os_r is not None
    arch = os_r.req_text("arch")
    if arch not in ("x86_64", "aarch64"):
        raise os_r._error("arch", f"{arch!r} is not one of x86_64, aarch64")
    os_facts = OsFacts(
        id=os_r.req_text("id"),
        version_id=os_r.req_text("version_id"),
        arch=arch,
        kernel=os_r.req_text("kernel"),
        glibc=os_r.text("glibc", DOTTED_RE, required=False, what="glibc version"),
        family=_choice(os_r, "family", OS_FAMILIES),
        msvc=os_r.text("msvc", DOTTED_RE, required=False, what="MSVC version"),
        l4t=os_r.text("l4t", DOTTED_RE, required=False, what="L4T release"),
        jetpack=os_r.text("jetpack", DOTTED_RE, required=False, what="JetPack version"),
    )

    driver_r = top.section("driver", required=False)
    driver = None if driver_r is None else DriverFacts(
        version=driver_r.req_text("version", DOTTED_RE, "driver version"),
        cuda_max=driver_r.req_text("cuda_max", DOTTED_RE, "CUDA version"),
    )

    gpus: list[GpuFacts] = []
    for i, gpu_obj in enumerate(top.items("gpus", limit=MAX_GPUS) or []):
        g = _Reader(gpu_obj, node, f"gpus[{i}]")
        gpus.append(GpuFacts(
            index=g.integer("index"),
            name=g.req_text("name"),
            compute_capability=g.req_text("compute_capability", DOTTED_RE, "compute capability"),
            memory_mib=g.integer("memory_mib"),
            uuid=g.req_text("uuid"),
            vendor=_choice(g, "vendor", GPU_VENDORS),
            arch=g.text("arch", GFX_RE, required=False, what="AMD GPU arch (gfxNNN)"),
        ))

    tk_r = top.section("toolkit", required=False)
    toolkit = None if tk_r is None else ToolkitFacts(
        nvcc=tk_r.req_text("nvcc", DOTTED_RE, "nvcc version"), path=tk_r.req_text("path"))

    py_r = top.section("python", required=True)
    assert py_r is not None
    python = PythonFacts(version=py_r.req_text("version", PY_VERSION_RE, "Python version"),
                         executable=py_r.req_text("executable"),
                         abi=py_r.text("abi", PY_ABI_RE, required=False, what="CPython ABI tag (cp312, cp313t)"),
                         env_path=py_r.text("env_path", ENV_PATH_RE, required=False, what="absolute env path"),
                         env_fs=py_r.text("env_fs", ENV_FS_RE, required=False, what="filesystem id"))

    torch_r = top.section("torch", required=False)
    torch = None if torch_r is None else TorchFacts(
        version=torch_r.req_text("version", TORCH_VERSION_RE, "torch version"),
        cuda=torch_r.text("cuda", DOTTED_RE, required=False, what="CUDA version"),
        cxx11abi=torch_r.boolean("cxx11abi"),
        arch_list=_strings(torch_r, "arch_list", 64, ARCH_RE, "GPU arch (sm_XY, compute_XY or gfxNNN)"),
        hip=torch_r.text("hip", TORCH_HIP_RE, required=False, what="HIP version"),
    )

    fa_r = top.section("flash_attn", required=False)
    flash_attn = None
    if fa_r is not None:
        beside = [_Reader(v, node, f"flash_attn.beside[{i}]")
                  for i, v in enumerate(fa_r.items("beside", limit=MAX_FLASH_ATTN_BESIDE, required=False) or [])]
        flash_attn = FlashAttnFacts(
            version=fa_r.req_text("version", TORCH_VERSION_RE, "flash-attn version"),
            variant=fa_r.req_text("variant"),
            beside=tuple(FlashAttnFacts(version=b.req_text("version", TORCH_VERSION_RE, "flash-attn version"),
                                        variant=b.req_text("variant")) for b in beside))

    res_r = top.section("resources", required=True)
    assert res_r is not None
    resources = ResourceFacts(cpu_cores=res_r.integer("cpu_cores", minimum=1),
                              memory_mib=res_r.integer("memory_mib", minimum=1))

    apt_r = top.section("apt", required=False)
    apt = None if apt_r is None else AptFacts(errors=_strings(apt_r, "errors", MAX_APT_ERRORS))

    rocm_r = top.section("rocm", required=False)
    rocm = None if rocm_r is None else RocmFacts(version=rocm_r.req_text("version", DOTTED_RE, "ROCm version"),
                                                 smi=rocm_r.req_text("smi"))

    known = {"hostname", "os", "driver", "gpus", "toolkit", "python", "torch", "flash_attn", "resources", "apt",
             "rocm"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return NodeFacts(hostname=hostname, os=os_facts, driver=driver, gpus=tuple(gpus), toolkit=toolkit,
                     python=python, torch=torch, flash_attn=flash_attn, resources=resources, apt=apt,
                     rocm=rocm, extra=extra)


def _choice(reader: _Reader, key: str, choices: tuple[str, ...]) -> str | None:
    value = reader.text(key, required=False)
    if value is not None and value not in choices:
        raise reader._error(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def parse_fleet(obj: Any) -> list[NodeFacts | FactsError]:
    """Parse ``{"nodes": [...]}`` into one entry per node, in input order: its facts or its error.

    A bare node object (what ``fleet-agent facts --json`` prints) counts as a fleet of one.
    """
    if isinstance(obj, Mapping) and "nodes" not in obj and "hostname" in obj:
        obj = {"nodes": [obj]}
    if not isinstance(obj, Mapping) or not isinstance(obj.get("nodes"), list):
        raise FactsError('expected an object with a "nodes" list', field="nodes",
                         hint='the file must look like {"nodes": [node, ...]} (DESIGN §3.1)')
    parsed: list[NodeFacts | FactsError] = []
    for i, item in enumerate(obj["nodes"]):
        try:
            parsed.append(parse_node(item))
        except FactsError as exc:
            if exc.node is None:
                exc = FactsError(exc.message, node=f"#{i}", hint=exc.hint)
            parsed.append(exc)
    return parsed


def version_tuple(text: str) -> tuple[int, ...]:
    """'12.4' → (12, 4); '2.7.1+cu126' → (2, 7, 1). Callers pass validated strings."""
    core = re.match(r"^(\d+(?:\.\d+)*)", text)
    if core is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in core.group(1).split("."))
