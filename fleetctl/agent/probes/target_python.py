"""The node's *target* Python environment (where torch and flash-attn live), probed by running it.

The agent never imports torch: it runs ``probe_target.py`` (its source passed with ``-c``)
under the target interpreter and parses the JSON line it prints.

The agent usually runs as root; the target environment may belong to someone else, and anything
that can write it can put code in it. So the probe runs (docs/security.md, "Node-reported data"):

- isolated, ``-I -S``: no ``PYTHON*`` variables, no user site, no working directory on ``sys.path``,
  and no ``site`` — the probe adds the environment's site-packages itself, without executing any
  ``.pth`` file or ``sitecustomize`` (``probe_target.isolated_site_packages``). The price: a package
  importable only through a ``.pth`` (an editable install) is not seen; its metadata still is;
- as the owner of the environment when that is not root (the venv's ``pyvenv.cfg``, else the
  interpreter file as named, not its symlink target), through ``setpriv``: importing torch runs the
  environment's own code, which then runs with no more rights than whoever could write it;
- and what it prints is data: ``python.executable`` is the path the agent was told (``--python``,
  strictly validated), never what the interpreter says it is; versions and variants must match
  their patterns or are left out with a probe error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fleetctl.agent.probes.system import CommandNotFound, CommandRunner, ProbeError, run_command
from fleetctl.fleet.facts import (
    ARCH_RE,
    DOTTED_RE,
    ENV_FS_RE,
    ENV_PATH_RE,
    MAX_FLASH_ATTN_BESIDE,
    PY_ABI_RE,
    PY_VERSION_RE,
    TORCH_HIP_RE,
    TORCH_VERSION_RE,
    FlashAttnFacts,
    PythonFacts,
    TorchFacts,
    flash_attn_rank,
    installed_together,
)

TARGET_TIMEOUT_S = 120.0  # importing torch on a cold disk can take tens of seconds
ENV_TARGET_PYTHON = "FLEET_TARGET_PYTHON"
#: The target interpreter as the playbooks accept it (their ``python`` validation): an absolute path of plain
#: characters. It becomes ``python.executable`` in the facts and the ``python`` of every job.
PYTHON_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]{1,4095}")
VARIANT_RE = re.compile(r"fa[0-9]{1,2}")
#: isolated (no PYTHON* env, user site or cwd) and without site (no .pth, no sitecustomize): see the module doc
PROBE_FLAGS = ("-I", "-S")


@dataclass(frozen=True)
class TargetResult:
    python: PythonFacts
    torch: TorchFacts | None
    flash_attn: FlashAttnFacts | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def probe_script_source() -> str:
    return resources.files("fleetctl.agent.probes").joinpath("probe_target.py").read_text(encoding="utf-8")


def default_target_python(env: Mapping[str, str] | None = None,
                          which: Callable[[str, str | None], str | None] | None = None) -> str:
    """``$FLEET_TARGET_PYTHON``, else ``python3`` on PATH, else the agent's own interpreter."""
    env = os.environ if env is None else env
    which = which or (lambda name, path: shutil.which(name, path=path))
    return env.get(ENV_TARGET_PYTHON) or which("python3", env.get("PATH")) or sys.executable


def _normalise_version(text: str) -> str:
    """'3.0.0.b1' → '3.0.0b1' (PEP 440 spelling the facts contract accepts)."""
    return re.sub(r"\.(a|b|rc)(\d+)", r"\1\2", text.strip())


def parse_probe_output(stdout: str, *, interpreter: str) -> TargetResult:
    """Parse the JSON line ``probe_target.py`` printed; raise ``ProbeError`` when there is none."""
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise ProbeError(f"target python {interpreter}: the probe printed no JSON")
    try:
        data = json.loads(lines[-1])
    except ValueError as exc:
        raise ProbeError(f"target python {interpreter}: the probe's JSON is malformed ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("python"), dict):
        raise ProbeError(f"target python {interpreter}: the probe's JSON has no python section")
    errors: list[str] = []

    py = data["python"]
    version = str(py.get("version", ""))
    if not PY_VERSION_RE.fullmatch(version):  # fullmatch: `$` would let a trailing newline through
        raise ProbeError(f"target python {interpreter}: unrecognised Python version {version!r}")
    # the path the agent was told, never the one printed: the environment's own code may print anything
    abi = py.get("abi")
    if abi is not None and not (isinstance(abi, str) and PY_ABI_RE.fullmatch(abi)):
        errors.append(f"python: unrecognised ABI tag {str(abi)[:40]!r}; left out")
        abi = None
    # where the env lives (DESIGN §3.1 addition): taken only when both are well-formed, else left out with the reason.
    # The env's own code prints them: a wrong claim can only make the controller treat the env as shared (installed
    # once, by another node), which the verification on this node then catches.
    env_path, env_fs = py.get("env_path"), py.get("env_fs")
    well_formed = (isinstance(env_path, str) and ENV_PATH_RE.fullmatch(env_path) is not None
                   and isinstance(env_fs, str) and ENV_FS_RE.fullmatch(env_fs) is not None)
    if (env_path is not None or env_fs is not None) and not well_formed:
        errors.append(f"python: unrecognised env location {str(env_fs)[:80]!r} {str(env_path)[:200]!r}; left out")
        env_path = env_fs = None
    python = PythonFacts(version=version, executable=interpreter, abi=abi, env_path=env_path, env_fs=env_fs)
    extra: dict[str, Any] = {"python_cp_tag": py.get("cp_tag"), "python_implementation": py.get("implementation")}

    torch = None
    torch_data = data.get("torch")
    if isinstance(torch_data, dict):
        torch, torch_errors = _torch_facts(torch_data)
        errors.extend(torch_errors)
        extra["torch_cuda_available"] = torch_data.get("cuda_available")
        extra["torch_device_count"] = torch_data.get("device_count")
    else:
        errors.append(f"torch: not importable in {python.executable}: {data.get('torch_error') or 'unknown reason'}")

    installed = [d for d in data.get("flash_attn") or [] if isinstance(d, dict)]
    if data.get("flash_attn_error"):
        errors.append(f"flash-attn: {data['flash_attn_error']}")
    if installed:
        installed.sort(key=lambda d: flash_attn_rank(str(d.get("variant"))))
        extra["flash_attn_installed"] = installed
    recognised: list[FlashAttnFacts] = []
    for dist in installed[:MAX_FLASH_ATTN_BESIDE + 1]:
        fa_version = _normalise_version(str(dist.get("version", "")))
        variant = str(dist.get("variant"))
        name = str(dist.get("distribution"))[:80]
        if not VARIANT_RE.fullmatch(variant):
            errors.append(f"flash-attn: unrecognised variant {variant[:80]!r} of {name!r}; left out")
        elif TORCH_VERSION_RE.fullmatch(fa_version):
            recognised.append(FlashAttnFacts(version=fa_version, variant=variant))
        else:
            errors.append(f"flash-attn: unrecognised version {str(dist.get('version'))[:80]!r} of {name}")
    # FA2/FA1 first (what the product installs and "already at the target version" compares), the rest beside it
    flash_attn = installed_together(recognised)
    return TargetResult(python=python, torch=torch, flash_attn=flash_attn, extra=extra, errors=tuple(errors))


def _torch_facts(data: Mapping[str, Any]) -> tuple[TorchFacts | None, list[str]]:
    version = str(data.get("version", ""))
    if not TORCH_VERSION_RE.fullmatch(version):
        return None, [f"torch: unrecognised version {version!r}"]
    errors: list[str] = []
    cuda = data.get("cuda")
    if cuda is not None and not (isinstance(cuda, str) and DOTTED_RE.match(cuda)):
        errors.append(f"torch: unrecognised torch.version.cuda {cuda!r}; reported as null")
        cuda = None
    arch_list: list[str] = []
    for arch in data.get("arch_list") or []:
        if isinstance(arch, str) and ARCH_RE.match(arch):
            if arch not in arch_list:
                arch_list.append(arch)
        else:
            errors.append(f"torch: arch {str(arch)[:40]!r} is not sm_XY/compute_XY/gfxNNN; left out")
    hip = data.get("hip")
    if hip is not None and not (isinstance(hip, str) and TORCH_HIP_RE.match(hip)):
        errors.append(f"torch: unrecognised torch.version.hip {str(hip)[:40]!r}; reported as null")
        hip = None
    if (cuda is not None or hip is not None) and not arch_list:
        errors.append("torch: GPU build but no arch list could be read")
    return TorchFacts(version=version, cuda=cuda, cxx11abi=bool(data.get("cxx11abi")),
                      arch_list=tuple(arch_list), hip=hip), errors


def environment_owner(interpreter: str, root: str | None = None) -> tuple[int, int] | None:
    """Who the probe runs as when the agent is root: ``(uid, gid)`` of the target environment's owner, or None
    (run as the agent's own user: it is not root, or everything here is root's, so root's code is all that runs).

    The owner is the first one that is not root of: the venv's ``pyvenv.cfg`` (next to the interpreter or one
    level up, where ``site`` looks), then the interpreter as named (a venv's ``bin/python`` is a symlink its
    creator owns; the file it points to is usually root's). ``root``: a simulated node's root directory, the
    paths being inside it.
    """
    if os.geteuid() != 0:
        return None
    bindir = os.path.dirname(interpreter)
    for path in (os.path.join(bindir, "pyvenv.cfg"), os.path.join(os.path.dirname(bindir), "pyvenv.cfg"),
                 interpreter):
        try:
            st = os.lstat((root.rstrip("/") + path) if root else path)
        except OSError:
            continue
        if st.st_uid != 0:
            return st.st_uid, st.st_gid
    return None


def probe_argv(interpreter: str, script: str, owner: tuple[int, int] | None) -> list[str]:
    """The probe's command line: isolated, and through ``setpriv`` as ``owner`` when there is one."""
    argv = [interpreter, *PROBE_FLAGS, "-c", script]
    if owner is None:
        return argv
    uid, gid = owner
    # --clear-groups: none of root's groups; --no-new-privs: no setuid binary gets them back
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--", *argv]


class TargetPythonProbe:
    def __init__(self, runner: CommandRunner = run_command, *, script: str | None = None,
                 timeout: float = TARGET_TIMEOUT_S, root: str | None = None) -> None:
        self._runner = runner
        self._script = script
        self._timeout = timeout
        self._root = root  # the runner runs inside this root (chroot): ownership is read there

    def probe(self, interpreter: str) -> TargetResult:
        """Probe ``interpreter``. When it cannot run at all, raise ``ProbeError`` (the caller decides)."""
        if not PYTHON_PATH_RE.fullmatch(interpreter):
            raise ProbeError(f"target python {interpreter[:200]!r} is not an absolute path of letters, digits and "
                             f". _ - / (what the playbooks accept); not run",
                             hint="start the agent with --python /path/to/venv/bin/python")
        script = self._script if self._script is not None else probe_script_source()
        owner = environment_owner(interpreter, self._root)
        try:
            result = self._runner(probe_argv(interpreter, script, owner), timeout=self._timeout)
        except CommandNotFound as exc:
            if owner is None or not exc.message.startswith("setpriv"):
                raise
            raise ProbeError(f"target python {interpreter} belongs to uid {owner[0]}, and setpriv (util-linux), "
                             f"which the agent runs it through so that it does not run as root, is missing",
                             hint="install util-linux, or run the agent as the environment's owner") from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()
            raise ProbeError(f"target python {interpreter}: the probe exited {result.returncode}"
                             + (f": {tail[-1]}" if tail else ""))
        return parse_probe_output(result.stdout, interpreter=interpreter)


def fallback_python(reason: str) -> TargetResult:
    """When the target interpreter cannot run: describe the agent's own, and say so."""
    version = ".".join(str(p) for p in sys.version_info[:3])
    return TargetResult(
        python=PythonFacts(version=version, executable=sys.executable), torch=None, flash_attn=None,
        extra={"python_is_agent_fallback": True},
        errors=(reason, f"python: reporting the agent's own interpreter {sys.executable} instead; torch unknown"),
    )
