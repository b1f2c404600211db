"""The target-Python probe runs the node's interpreter isolated, and only the path it was given is reported.

A hostile environment — a ``.pth`` file, ``sitecustomize``/``usercustomize``, all of which ``site`` executes at
start, and ``PYTHON*`` variables — tries to run code as the agent's user (root) and to make the probe report a
template as ``python.executable``. With ``-I -S`` none of it runs, site-packages is still seen (a flash-attn
installed there is found), and the executable is the path the agent was told. An environment that is not
root's is probed as its owner (``setpriv``), so its own code (torch's import) runs with the owner's rights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.agent.probes.system import ProbeError
from fleetctl.agent.probes.target_python import PROBE_FLAGS, TargetPythonProbe, parse_probe_output, probe_argv

SYSTEM_PYTHON = "/usr/bin/python3"
needs_system_python = pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no /usr/bin/python3")
POISON = "/opt/x{{ lookup('pipe', 'id') }}/bin/python"


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory anyone may traverse (pytest's tmp dirs are root's, 0700): another user's venv lives here."""
    d = Path(tempfile.mkdtemp(prefix="fleet-probe-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def hostile_venv(where: Path, markers: Path) -> Path:
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(where / "venv")], check=True, timeout=120)
    python = where / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    def touch(name: str) -> str:
        return (f"import os, sys; open(os.path.join({str(markers)!r}, {name!r}), 'w').close(); "
                f"sys.executable = {POISON!r}\n")

    (site / "evil.pth").write_text(touch("pth"))
    fake = json.dumps({"python": {"version": "3.11.0", "executable": POISON}})
    (site / "sitecustomize.py").write_text(touch("sitecustomize") + f"print({fake!r})\n")
    (site / "usercustomize.py").write_text(touch("usercustomize"))
    info = site / "flash_attn-2.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\n")
    return python


@needs_system_python
def test_hostile_environment_runs_nothing_and_cannot_choose_the_answer(world: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    markers = tmp_path / "m"
    markers.mkdir()
    python = hostile_venv(world, markers)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "json.py").write_text(f"open({str(markers / 'cwd')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path / "cwd")  # a module in the working directory must not shadow the stdlib
    monkeypatch.setenv("PYTHONSTARTUP", str(tmp_path / "cwd" / "json.py"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "cwd"))
    result = TargetPythonProbe().probe(str(python))
    assert sorted(p.name for p in markers.iterdir()) == [], "the environment's code ran in the probe"
    assert result.python.executable == str(python)
    assert result.flash_attn is not None and result.flash_attn.version == "2.8.3"  # site-packages still seen
    assert "lookup" not in json.dumps(result.extra)


@needs_system_python
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_someone_elses_environment_is_probed_as_its_owner(world: Path, tmp_path: Path) -> None:
    markers = tmp_path / "m"
    markers.mkdir()
    python = hostile_venv(world, markers)
    subprocess.run(["chown", "-R", "65534:65534", str(world / "venv")], check=True)
    who = ('import json, os; print(json.dumps({"python": {"version": "3.11.0", '
           '"implementation": "%d:%d:%s" % (os.getuid(), os.getgid(), os.getgroups())}}))')
    result = TargetPythonProbe(script=who).probe(str(python))
    assert result.extra["python_implementation"] == "65534:65534:[]"
    real = TargetPythonProbe().probe(str(python))  # the real probe works as that user
    assert real.flash_attn is not None and real.python.executable == str(python)
    assert sorted(p.name for p in markers.iterdir()) == []


def test_the_command_line_is_isolated() -> None:
    assert PROBE_FLAGS == ("-I", "-S")
    assert probe_argv("/v/bin/python", "S", None) == ["/v/bin/python", "-I", "-S", "-c", "S"]
    assert probe_argv("/v/bin/python", "S", (1000, 100))[:6] == [
        "setpriv", "--reuid=1000", "--regid=100", "--clear-groups", "--no-new-privs", "--"]


@pytest.mark.parametrize("path", ["python3", "/opt/venv/bin/python\n", POISON, "/opt/v env/bin/python",
                                  "/opt/$(id)/python", "/opt/`id`/python", "/opt/a;b/python", "/" + "a" * 5000])
def test_an_odd_interpreter_path_is_never_run(path: str) -> None:
    def runner(argv: object, **kw: object) -> object:
        raise AssertionError(f"ran {argv!r}")

    with pytest.raises(ProbeError, match="is not an absolute path of letters, digits"):
        TargetPythonProbe(runner, script="pass").probe(path)  # type: ignore[arg-type]


def test_what_the_interpreter_prints_is_data() -> None:
    out = {"python": {"version": "3.11.2", "executable": POISON},
           "flash_attn": [{"distribution": "flash_attn", "version": "2.8.3", "variant": "{{ 'fa' ~ 2 }}"}]}
    result = parse_probe_output(json.dumps(out), interpreter="/opt/venv/bin/python")
    assert result.python.executable == "/opt/venv/bin/python"
    assert result.flash_attn is None and any("unrecognised variant" in e for e in result.errors)
    with pytest.raises(ProbeError, match="unrecognised Python version"):
        parse_probe_output(json.dumps({"python": {"version": "3.11.2\n{{ x }}"}}), interpreter="/p")
