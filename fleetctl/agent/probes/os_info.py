"""The operating system and machine: os-release, architecture, kernel, glibc, cores, memory."""

from __future__ import annotations

import os
import platform
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from fleetctl.agent.probes.platform_os import probe_l4t, probe_msvc
from fleetctl.agent.probes.system import CommandRunner, FileReader, ProbeError, read_text, run_command
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.facts import DOTTED_RE, OsFacts, ResourceFacts
from fleetctl.fleet.jetson import jetpack_for_l4t

ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")


@dataclass(frozen=True)
class OsResult:
    os: OsFacts
    resources: ResourceFacts
    errors: tuple[str, ...] = ()


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally shell-quoted."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw)
        except ValueError:
            parts = [raw.strip("\"'")]
        values[key.strip()] = parts[0] if parts else ""
    return values


def parse_meminfo_mib(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) // 1024
    return None


def parse_glibc(text: str) -> str | None:
    """'glibc 2.36' (confstr) or 'ldd (Ubuntu GLIBC 2.35-0ubuntu3.8) 2.35' (ldd --version) → '2.36'."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    if not first:
        return None
    candidate = first.split()[-1]
    return candidate if DOTTED_RE.match(candidate) else None


def _confstr_glibc() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _windows_memory_mib() -> int:
    """Physical memory through GlobalMemoryStatusEx (kernel32); 1 when it cannot be read."""
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total_phys", ctypes.c_ulonglong),
                    ("avail_phys", ctypes.c_ulonglong), ("total_page", ctypes.c_ulonglong),
                    ("avail_page", ctypes.c_ulonglong), ("total_virtual", ctypes.c_ulonglong),
                    ("avail_virtual", ctypes.c_ulonglong), ("avail_extended", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    kernel32 = getattr(getattr(ctypes, "windll", None), "kernel32", None)
    if kernel32 is None or not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return 1
    return int(status.total_phys // (1024 * 1024))


class OsProbe:
    def __init__(self, runner: CommandRunner = run_command, reader: FileReader = read_text, *,
                 machine: Callable[[], str] = platform.machine, kernel: Callable[[], str] = platform.release,
                 confstr_glibc: Callable[[], str | None] = _confstr_glibc,
                 cpu_cores: Callable[[], int] = _cpu_cores, system: Callable[[], str] = platform.system,
                 exists: Callable[[str], bool] = os.path.exists) -> None:
        self._runner = runner
        self._reader = reader
        self._machine = machine
        self._kernel = kernel
        self._confstr_glibc = confstr_glibc
        self._cpu_cores = cpu_cores
        self._system = system
        self._exists = exists

    def probe(self) -> OsResult:
        if self._system() == "Windows":
            return self._probe_windows()
        errors: list[str] = []
        release: dict[str, str] = {}
        for path in OS_RELEASE_PATHS:
            try:
                release = parse_os_release(self._reader(path))
                break
            except ProbeError:
                continue
        else:
            errors.append("os: no /etc/os-release or /usr/lib/os-release; id and version_id unknown")
        os_id = release.get("ID") or "unknown"
        version_id = release.get("VERSION_ID") or release.get("BUILD_ID") or "unknown"
        if release and not release.get("VERSION_ID"):
            errors.append(f"os: {os_id} has no VERSION_ID in os-release; reporting {version_id!r}")

        machine = self._machine()
        arch = ARCH_ALIASES.get(machine.lower())
        if arch is None:
            raise UsageError(f"this machine's architecture {machine!r} is not supported",
                             hint="fleet nodes must be x86_64 or aarch64")

        glibc = parse_glibc(self._confstr_glibc() or "")
        if glibc is None:
            try:
                result = self._runner(["ldd", "--version"], timeout=10.0)
                glibc = parse_glibc(result.stdout) if result.returncode == 0 else None
            except ProbeError:
                glibc = None
            if glibc is None:
                errors.append("os: glibc version unknown (not a glibc system, or ldd missing)")

        memory_mib: int | None = None
        try:
            memory_mib = parse_meminfo_mib(self._reader("/proc/meminfo"))
        except ProbeError as exc:
            errors.append(f"os: {exc.message}")
        if memory_mib is None:
            pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            memory_mib = max(1, pages * page_size // (1024 * 1024))

        l4t, l4t_errors = probe_l4t(self._reader, self._exists)
        errors.extend(l4t_errors)
        jetpack = jetpack_for_l4t(l4t) if l4t else None
        if l4t and jetpack is None:
            errors.append(f"os: L4T {l4t} is not in fleet/jetson.py's JetPack table; jetpack unknown")
        # family stays unset on Linux: the facts of every Linux node print exactly as before the addition
        os_facts = OsFacts(id=os_id, version_id=version_id, arch=arch, kernel=self._kernel(), glibc=glibc,
                           l4t=l4t, jetpack=jetpack[0].split()[0] if jetpack else None)
        resources = ResourceFacts(cpu_cores=max(1, self._cpu_cores()), memory_mib=max(1, memory_mib))
        return OsResult(os_facts, resources, tuple(errors))

    def _probe_windows(self) -> OsResult:
        """Windows has no os-release, glibc or /proc: its version from platform, MSVC from vswhere.exe."""
        machine = self._machine()
        arch = ARCH_ALIASES.get(machine.lower())
        if arch is None:
            raise UsageError(f"this machine's architecture {machine!r} is not supported",
                             hint="fleet nodes must be x86_64 or aarch64")
        msvc, errors = probe_msvc(self._runner, self._reader, self._exists)
        os_facts = OsFacts(id="windows", version_id=platform.version() or "unknown", arch=arch,
                           kernel=self._kernel(), glibc=None, family="windows", msvc=msvc)
        # memory: no /proc/meminfo or sysconf on Windows; the planner does not read it for Windows plans
        resources = ResourceFacts(cpu_cores=max(1, self._cpu_cores()), memory_mib=max(1, _windows_memory_mib()))
        return OsResult(os_facts, resources, tuple(errors))
