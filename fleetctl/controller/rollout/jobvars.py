"""The one place the controller checks what it puts in a job's variables (docs/security.md, "Node-reported data").

Several job variables start as text a node reported about itself — ``python`` (``python.executable``),
``cuda_home`` (``toolkit.path``), ``driver_cuda_max`` (``driver.cuda_max``), ``apt_errors`` and what
``apt_keyring_vars`` derives from them (``repo_uri``, ``key_url``, ``keyring_name``, ``key_id``). A node is not
trusted: before a job is submitted each of these must fullmatch the same strict pattern the playbook validates it
with, or it is sent as ``None`` (the playbook then fails its validation naming the variable, and nothing runs);
``apt_errors`` are only ever data — no playbook reads them as anything else — and go as bounded plain lines.
The agent adds its own layer (every string unsafe for Ansible, agent/executor.py), the playbooks a third.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: node-derived variable → the pattern its playbook validates it with (playbooks/*.yml, "Validate …")
NODE_VAR_PATTERNS: dict[str, re.Pattern[str]] = {
    "python": re.compile(r"/[A-Za-z0-9._/-]{1,4095}"),
    "cuda_home": re.compile(r"/[A-Za-z0-9._/-]{1,4095}"),
    "driver_cuda_max": re.compile(r"[0-9]{1,2}\.[0-9]{1,2}"),
    "repo_uri": re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/%+-]{1,2000}"),
    "key_url": re.compile(r"https?://[A-Za-z0-9._~:/%+-]{1,2000}"),
    "keyring_name": re.compile(r"[a-z0-9][a-z0-9._-]{0,63}"),
    "key_id": re.compile(r"[0-9A-Fa-f]{8,40}"),
    "gpu_archs": re.compile(r"gfx[0-9a-f]{3,4}(;gfx[0-9a-f]{3,4}){0,15}"),  # the node's gfx targets (ROCm CK)
}
MAX_APT_LINES = 50
MAX_APT_LINE = 1000
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain_line(text: str, limit: int = MAX_APT_LINE) -> str:
    """One line of node text made inert for logs and terminals: control and bidi characters become ``?``, tabs
    and newlines spaces, at most ``limit`` characters. (Still text a node wrote: never use it as a name or path.)"""
    flat = _CONTROL_RE.sub("?", text.replace("\t", " ").replace("\n", " ").replace("\r", " "))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def build_target_vars(build: Mapping[str, Any]) -> dict[str, Any]:
    """build-from-source.yml's target variables for a plan's ``build`` (``BuildParams.to_json``): a ROCm build
    (its env says ``BUILD_TARGET=rocm``, controller/resolver/build.py) goes as ``gpu_backend`` ``rocm-ck`` with
    ``gpu_archs`` (its ``GPU_ARCHS``) or ``rocm-triton``, and never with ``cuda_archs`` (its archs are gfx
    targets, which FLASH_ATTN_CUDA_ARCHS cannot take); every other build as ``cuda_archs``."""
    env = build.get("env") or {}
    if env.get("BUILD_TARGET") == "rocm":
        if env.get("FLASH_ATTENTION_TRITON_AMD_ENABLE") == "TRUE":
            return {"gpu_backend": "rocm-triton"}
        return {"gpu_backend": "rocm-ck", "gpu_archs": env.get("GPU_ARCHS")}
    return {"cuda_archs": ";".join(build.get("cuda_archs") or [])}


def checked_job_vars(variables: Mapping[str, Any], hostname: str = "?") -> dict[str, Any]:
    """``variables`` with every node-derived value that fails its pattern replaced by ``None`` (logged), and
    ``apt_errors`` as at most ``MAX_APT_LINES`` plain lines."""
    out = dict(variables)
    for name, pattern in NODE_VAR_PATTERNS.items():
        value = out.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value):
            log.warning("node %s: job variable %s refused, it does not match %s: %s — sent as null, the playbook "
                        "will refuse the job", plain_line(hostname, 253), name, pattern.pattern,
                        plain_line(repr(value), 300))
            out[name] = None
    if "apt_errors" in out:
        lines = out["apt_errors"] if isinstance(out["apt_errors"], list | tuple) else []
        out["apt_errors"] = [plain_line(str(line)) for line in lines[:MAX_APT_LINES]]
    return out
