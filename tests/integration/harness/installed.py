"""fleetctl as a user installs it: its wheel built from this checkout, and fresh venvs outside the checkout.

``build_wheel`` (``pip wheel --no-deps``; with ``version`` from a copy of the sources with that version, for upgrade
tests), ``fresh_venv`` (from the base interpreter: nothing of the checkout's venv is visible), ``pip_install``
(``--no-index`` from ``WHEELHOUSE``: the hash-locked wheels scripts/bootstrap downloads), ``controller_venv``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"


def _pip_env() -> dict[str, str]:
    # no PYTHONPATH: a checkout on it (with the fleetctl.egg-info a wheel build leaves there) would make pip believe
    # fleetctl is installed already
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"} \
        | {"PIP_CONFIG_FILE": os.devnull}


def require_wheelhouse() -> None:
    if not (WHEELHOUSE / ".stamp").exists():
        pytest.fail(f"{WHEELHOUSE} is missing: run ./scripts/bootstrap (it downloads the locked wheels)")


def build_wheel(dest: Path, version: str | None = None) -> Path:
    """fleetctl's wheel from this checkout (``version`` replaces pyproject's, in a copy of the sources)."""
    src = ROOT
    if version is not None:
        src = dest / "src"
        shutil.copytree(ROOT / "fleetctl", src / "fleetctl", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "README.md", src / "README.md")
        text = (ROOT / "pyproject.toml").read_text()
        (src / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', text, count=1))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dest / "dist"), str(src)],
                   check=True, timeout=600, env=_pip_env(), capture_output=True)
    (wheel,) = (dest / "dist").glob(f"fleetctl-{version or '*'}-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    # the base interpreter, not this venv's: a fresh venv sees nothing of the checkout's
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(path)], check=True, timeout=300)
    return path


def pip_install(venv: Path, *args: str) -> None:
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--no-index", "--find-links", str(WHEELHOUSE), *args],
                          capture_output=True, text=True, timeout=600, env=_pip_env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def controller_venv(path: Path, wheel: Path) -> Path:
    """``pip install "fleetctl[controller]"`` the locked way: requirements/controller.txt, then the wheel."""
    venv = fresh_venv(path)
    pip_install(venv, "--require-hashes", "-r", str(ROOT / "requirements" / "controller.txt"))
    pip_install(venv, "--no-deps", str(wheel))
    return venv


def locked_agent_wheels() -> list[Path]:
    """The wheelhouse's wheels of requirements/agent.txt (what `fleetctl agents wheels add` stores for the nodes)."""
    names = {line.split("==")[0].lower().replace("-", "_")
             for line in (ROOT / "requirements" / "agent.txt").read_text().splitlines()
             if "==" in line and not line.startswith((" ", "#"))}
    return sorted(w for w in WHEELHOUSE.glob("*.whl") if w.name.split("-")[0].lower() in names)
