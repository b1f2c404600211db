#!/usr/bin/env python3
"""Describe this Python environment as one JSON line: python, torch, flash-attn.

Standalone on purpose: standard library only (torch is imported if present), so it can be
copied to a node and run with the node's target interpreter:

    /opt/torch/.venv/bin/python3 probe_target.py

The last line of stdout is the JSON object; anything torch prints while importing goes to
stderr. Missing or broken torch is reported as ``"torch": null`` with ``"torch_error"``.
Works on Python 3.8+.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from typing import Any

PROBE_VERSION = 1

# distribution name (normalised: lowercase, "-") → variant, when the version does not decide it
_FA_DISTRIBUTIONS: dict[str, str | None] = {
    "flash-attn": None,  # 1.x → fa1, 2.x → fa2
    "flash-attn-3": "fa3",
    "flash-attn3": "fa3",
    "flash-attn-hopper": "fa3",
    "flash-attn-4": "fa4",
    "flash-attn4": "fa4",
    "fa4": "fa4",
    "flash-attn-cute": "fa4",
}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _variant(dist: str, version: str) -> str:
    fixed = _FA_DISTRIBUTIONS.get(dist)
    if fixed:
        return fixed
    major = version.split(".", 1)[0]
    return {"1": "fa1", "2": "fa2", "3": "fa3", "4": "fa4"}.get(major, "fa" + major)


def probe_flash_attn() -> tuple[list[dict[str, str]], str | None]:
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return [], "importlib.metadata unavailable"
    found: list[dict[str, str]] = []
    seen: set[str] = set()
    try:
        for dist in metadata.distributions():
            name = dist.metadata["Name"] or ""
            key = _normalise(name)
            if key not in _FA_DISTRIBUTIONS or key in seen:
                continue
            seen.add(key)
            version = dist.version
            found.append({"distribution": name, "version": version, "variant": _variant(key, version)})
    except Exception as exc:
        return found, f"reading installed distributions failed: {exc}"
    return found, None


def _arch_list(torch: Any) -> list[str]:
    arch: list[Any] = []
    try:
        arch = list(torch.cuda.get_arch_list())
    except Exception:
        arch = []
    if not arch:
        # get_arch_list() is empty when no GPU is visible; the compiled-in flags are not.
        flags_fn = getattr(torch._C, "_cuda_getArchFlags", None)
        try:
            flags = flags_fn() if flags_fn is not None else None
        except Exception:
            flags = None
        if flags:
            arch = str(flags).split()
    return [str(a) for a in arch]


def probe_torch() -> tuple[dict[str, Any] | None, str | None]:
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import torch  # type: ignore[import-not-found, unused-ignore]
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return None, f"{type(exc).__name__}: {exc}"
    try:
        version = getattr(torch, "version", None)
        info: dict[str, Any] = {
            "version": str(torch.__version__),
            "cuda": getattr(version, "cuda", None),
            "hip": getattr(version, "hip", None),
            "cxx11abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
            "arch_list": _arch_list(torch),
            "cuda_available": None,
            "device_count": None,
        }
        try:
            with contextlib.redirect_stdout(sys.stderr):
                info["cuda_available"] = bool(torch.cuda.is_available())
                info["device_count"] = int(torch.cuda.device_count())
        except Exception:
            pass
        return info, None
    except Exception as exc:
        return None, (f"torch {getattr(torch, '__version__', '?')} imported but could not be read: "
                      f"{type(exc).__name__}: {exc}")


def isolated_site_packages() -> list[str]:
    """Under ``-S`` (how the agent runs this probe): put the environment's site-packages on ``sys.path`` as
    ``site`` would — a venv's own (found by its ``pyvenv.cfg``, as ``site.venv`` finds it), plus the system's
    when the venv includes them, or the system's alone — minus everything ``site`` *executes*: no ``.pth``
    file, no ``sitecustomize``/``usercustomize``. The agent may run this as root, and those files belong to
    whoever can write the environment. Returns the directories added.
    """
    import os
    import site  # under -S importing it runs nothing: site.main() is skipped when sys.flags.no_site

    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    venv_prefix = os.path.dirname(exe_dir)
    prefixes = list(site.PREFIXES)
    for conf in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(venv_prefix, "pyvenv.cfg")):
        if not os.path.isfile(conf):
            continue
        system_site = False
        with open(conf, encoding="utf-8") as fh:
            for line in fh:
                key, sep, value = line.partition("=")
                if sep and key.strip().lower() == "include-system-site-packages":
                    system_site = value.strip().lower() == "true"
        sys.prefix = sys.exec_prefix = venv_prefix  # what site.venv() sets; getsitepackages() reads it
        prefixes = [venv_prefix, *(prefixes if system_site else [])]
        break
    added: list[str] = []
    for path in site.getsitepackages(prefixes):
        if os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
            added.append(path)
    return added


# network filesystems: one environment on them can be shared by several nodes (an NFS venv)
_SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph",
                    "beegfs", "gpfs", "fuse.sshfs", "9p", "virtiofs")


def env_identity(prefix: str | None = None) -> dict[str, str] | None:
    """Where this environment lives, so that the controller can tell when several nodes share one: ``env_path``
    (``sys.prefix``, symlinks resolved) and ``env_fs`` (the filesystem holding it). On a network filesystem
    ``env_fs`` is its type and source (``nfs4:server:/export``) and ``env_path`` the path inside the export, the
    same from every client whatever its mount point; on a local one it is ``local:<machine-id>:<device>``, so
    two machines' own ``/opt/venv`` never match. None when it cannot be told (no /proc, no machine id)."""
    import os

    try:
        path = os.path.realpath(prefix or sys.prefix)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    best: list[str] | None = None
    for fields in mounts:
        if "-" not in fields[6:] or len(fields) < 10:
            continue
        point = fields[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[4])):
            best = fields
    if best is None:
        return None
    dash = best.index("-", 6)
    fstype, source = best[dash + 1], best[dash + 2]
    rel = os.path.relpath(path, best[4].replace("\\040", " "))
    if fstype in _SHARED_FS_TYPES:
        inner = os.path.normpath(os.path.join(best[3], rel))
        return {"env_path": inner, "env_fs": f"{fstype}:{source}"}
    try:
        with open("/etc/machine-id", encoding="ascii") as fh:
            machine = fh.read().strip()
    except OSError:
        return None
    if not machine:
        return None
    return {"env_path": path, "env_fs": f"local:{machine}:{best[2]}"}


def python_abi() -> str:
    """The CPython ABI tag pip matches wheels against: "cp312", or "cp313t" on a free-threaded build
    (``Py_GIL_DISABLED`` in the build's config vars, PEP 703), which cannot load "cp313" wheels."""
    import sysconfig

    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return f"cp{sys.version_info[0]}{sys.version_info[1]}{'t' if free_threaded else ''}"


def main() -> int:
    if sys.flags.no_site:
        isolated_site_packages()
    torch_info, torch_error = probe_torch()
    flash_attn, fa_error = probe_flash_attn()
    out = {
        "probe_version": PROBE_VERSION,
        "python": {
            "version": platform.python_version(),
            "executable": sys.executable,
            "implementation": platform.python_implementation(),
            "cp_tag": f"cp{sys.version_info[0]}{sys.version_info[1]}",
            "abi": python_abi(),
            **(env_identity() or {}),
        },
        "torch": torch_info,
        "torch_error": torch_error,
        "flash_attn": flash_attn,
        "flash_attn_error": fa_error,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
