r"""CUDA toolkits: every ``nvcc`` found on PATH, under ``$CUDA_HOME`` and in ``/usr/local/cuda*``.

The active toolkit is the one a build would use: ``nvcc`` on PATH first, then
``$CUDA_HOME/bin/nvcc``, then ``/usr/local/cuda/bin/nvcc``, then the newest other one found.

On Windows the CUDA installer puts each toolkit under ``%ProgramFiles%\NVIDIA GPU Computing Toolkit\CUDA\vX.Y``,
sets ``CUDA_PATH`` to the newest one it installed and ``CUDA_PATH_VX_Y`` to each: there the active toolkit is
``nvcc.exe`` on PATH, then ``%CUDA_PATH%\bin\nvcc.exe``, then the newest other one found (the ``CUDA_PATH_V*``
ones and the installer's folders).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fleetctl.agent.probes.system import CommandRunner, ProbeError, run_command
from fleetctl.fleet.facts import ToolkitFacts, version_tuple

NVCC_TIMEOUT_S = 20.0
_RELEASE_RE = re.compile(r"Cuda compilation tools, release (\d+\.\d+), V(\d+(?:\.\d+)*)")
_BUILD_RE = re.compile(r"^Build (cuda_(\d+\.\d+)\S*)", re.MULTILINE)
# under %ProgramFiles%: where the CUDA installer puts toolkit vX.Y (its default; CUDA_PATH_VX_Y names each)
WINDOWS_TOOLKITS_DIR = ("NVIDIA GPU Computing Toolkit", "CUDA")


@dataclass(frozen=True)
class NvccVersion:
    release: str   # "13.0"
    full: str      # "13.0.88"
    build: str | None  # "cuda_13.0.r13.0/compiler.36424714_0"


@dataclass(frozen=True)
class FoundToolkit:
    nvcc: str
    path: str
    active: bool
    full_version: str

    def to_json(self) -> dict[str, object]:
        return {"nvcc": self.nvcc, "path": self.path, "active": self.active, "full_version": self.full_version}


@dataclass(frozen=True)
class NvccResult:
    active: ToolkitFacts | None
    toolkits: tuple[FoundToolkit, ...]
    errors: tuple[str, ...] = field(default=())


def parse_nvcc_version(text: str) -> NvccVersion | None:
    """Parse ``nvcc -V`` output; ``None`` when it is not nvcc's format."""
    match = _RELEASE_RE.search(text)
    if match is None:
        build = _BUILD_RE.search(text)
        if build is None:
            return None
        return NvccVersion(release=build.group(2), full=build.group(2), build=build.group(1))
    build = _BUILD_RE.search(text)
    return NvccVersion(release=match.group(1), full=match.group(2), build=build.group(1) if build else None)


class NvccProbe:
    def __init__(self, runner: CommandRunner = run_command, *, env: Mapping[str, str] | None = None,
                 which: Callable[[str, str | None], str | None] | None = None,
                 glob_paths: Callable[[str], list[str]] | None = None,
                 is_executable: Callable[[str], bool] | None = None,
                 realpath: Callable[[str], str] = os.path.realpath, windows: bool | None = None) -> None:
        self._windows = platform.system() == "Windows" if windows is None else windows
        self._runner = runner
        self._env = os.environ if env is None else env
        self._which = which or (lambda name, path: shutil.which(name, path=path))
        self._glob = glob_paths or (lambda pattern: sorted(glob.glob(pattern)))
        self._is_executable = is_executable or (lambda p: os.path.isfile(p) and os.access(p, os.X_OK))
        self._realpath = realpath

    def candidates(self) -> list[str]:
        """Paths to try, most preferred first; a symlink to one already listed is left out."""
        ordered = self._preferred()
        ordered.extend(self._others())
        seen: set[str] = set()
        unique: list[str] = []
        for path in ordered:
            real = self._realpath(path)
            if real not in seen and self._is_executable(path):
                seen.add(real)
                unique.append(path)
        return unique

    def probe(self) -> NvccResult:
        errors: list[str] = []
        found: list[tuple[str, NvccVersion]] = []
        for path in self.candidates():
            try:
                result = self._runner([path, "-V"], timeout=NVCC_TIMEOUT_S)
            except ProbeError as exc:
                errors.append(f"nvcc: {exc.message}")
                continue
            version = parse_nvcc_version(result.stdout + "\n" + result.stderr)
            if result.returncode != 0 or version is None:
                detail = (result.stderr or result.stdout).strip().splitlines()
                errors.append(f"nvcc: {path} -V failed (exit {result.returncode})"
                              + (f": {detail[-1]}" if detail else ""))
                continue
            found.append((path, version))
        if not found:
            if not errors:
                where = (r"PATH, %CUDA_PATH%, %CUDA_PATH_V*%, %ProgramFiles%\NVIDIA GPU Computing Toolkit\CUDA"
                         if self._windows else "PATH, $CUDA_HOME, /usr/local/cuda*")
                errors.append(f"nvcc: no CUDA toolkit found ({where})")
            return NvccResult(None, (), tuple(errors))
        # Candidates are already in preference order except the tail (/usr/local/cuda-*, or Windows' per-version
        # toolkits): newest wins there.
        preferred_heads = set(self._preferred())
        active_path, active_version = next(
            ((p, v) for p, v in found if p in preferred_heads),
            max(found, key=lambda pv: version_tuple(pv[1].full)))
        toolkits = tuple(FoundToolkit(nvcc=v.release, path=p, active=p == active_path, full_version=v.full)
                         for p, v in found)
        return NvccResult(ToolkitFacts(nvcc=active_version.release, path=active_path), toolkits, tuple(errors))

    def _preferred(self) -> list[str]:
        heads: list[str] = []
        if self._windows:
            on_path = self._which("nvcc.exe", self._getenv("PATH"))
            cuda_path = self._getenv("CUDA_PATH") or self._getenv("CUDA_HOME")
            return ([on_path] if on_path else []) + ([os.path.join(cuda_path, "bin", "nvcc.exe")] if cuda_path else [])
        on_path = self._which("nvcc", self._env.get("PATH"))
        if on_path:
            heads.append(on_path)
        cuda_home = self._env.get("CUDA_HOME") or self._env.get("CUDA_PATH")
        if cuda_home:
            heads.append(os.path.join(cuda_home, "bin", "nvcc"))
        heads.append("/usr/local/cuda/bin/nvcc")
        return heads

    def _others(self) -> list[str]:
        """Every other toolkit this OS's installers leave, in no order of preference."""
        if not self._windows:
            return self._glob("/usr/local/cuda-*/bin/nvcc")
        per_version = [os.path.join(v, "bin", "nvcc.exe") for k, v in sorted(self._env.items())
                       if k.upper().startswith("CUDA_PATH_V") and v]
        program_files = self._getenv("ProgramFiles") or r"C:\Program Files"
        pattern = os.path.join(glob.escape(program_files), *WINDOWS_TOOLKITS_DIR, "v*", "bin", "nvcc.exe")
        return per_version + self._glob(pattern)

    def _getenv(self, name: str) -> str | None:
        """An environment variable by name, ignoring case as Windows does (``Path``, ``ProgramFiles``)."""
        if name in self._env:
            return self._env[name]
        return next((v for k, v in self._env.items() if k.upper() == name.upper()), None)
