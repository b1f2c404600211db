"""Which spelling of "unsafe" ansible-core honours in an ``-e @file`` extra-vars file, and the agent's use of it.

One ansible-playbook run (the ansible-core in this venv) reads three extra-vars files, each with its own
variable holding a ``lookup('pipe', 'touch …')`` template:

- plain JSON: the string is trusted and templated — its marker appears (this is why job vars were code);
- JSON with ``{"__ansible_unsafe": "…"}`` (what the agent writes, agent/executor.py ``extravars_json``): stays text;
- YAML with ``!unsafe``: stays text too (the alternative; the agent uses the JSON form, no YAML writer needed).

Then, without Ansible: what ``unsafe_vars``/``extravars_json`` write and refuse, and that every run gets its own
``ansible.cfg`` with ``allow_unsafe_lookups`` off, whatever an ``ansible.cfg`` next to the playbooks says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.agent.executor import (
    DEFAULT_PLAYBOOKS_DIR,
    AnsibleJobRunner,
    _RunDirs,
    extravars_json,
    unsafe_vars,
)
from fleetctl.fleet.errors import ExecutionError
from fleetctl.fleet.jobs import JobSpec

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-playbook not installed")
def test_which_form_ansible_honours(tmp_path: Path) -> None:
    def lookup(name: str) -> str:
        return "{{ lookup('pipe', 'touch " + str(tmp_path / name) + "') }}"

    (tmp_path / "plain.json").write_text(json.dumps({"v_plain": lookup("plain")}))
    (tmp_path / "unsafe.json").write_text(json.dumps({"v_json": {"__ansible_unsafe": lookup("json")},
                                                      "v_list": [{"__ansible_unsafe": lookup("list")}]}))
    (tmp_path / "unsafe.yml").write_text("v_yaml: !unsafe " + json.dumps(lookup("yaml")) + "\n")
    (tmp_path / "pb.yml").write_text("""
- hosts: localhost
  gather_facts: false
  connection: local
  tasks:
    - ansible.builtin.set_fact:
        again: "{{ v_json }}"
    - ansible.builtin.debug:
        msg: "{{ v_plain }} {{ v_json }} {{ v_yaml }} {{ v_list | join(',') }} {{ again }}"
""")
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "t"), "PATH": f"{ANSIBLE_PLAYBOOK.parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "pb.yml", "-e", "@plain.json",
                           "-e", "@unsafe.json", "-e", "@unsafe.yml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "plain").exists(), "a plain JSON extra var is templated (the hole)"
    for name in ("json", "list", "yaml"):
        assert not (tmp_path / name).exists(), f"the {name} unsafe form was templated"
    assert "touch " + str(tmp_path / "json") in proc.stdout  # printed as text


def test_every_string_is_marked_at_any_depth() -> None:
    got = unsafe_vars({"build": {"cuda_archs": ["80", "90"], "max_jobs": 4, "ok": True, "none": None},
                       "reqs": ("einops",), "x": 1.5})
    u = "__ansible_unsafe"
    assert got == {"build": {"cuda_archs": [{u: "80"}, {u: "90"}], "max_jobs": 4, "ok": True, "none": None},
                   "reqs": [{u: "einops"}], "x": 1.5}
    text = extravars_json({"python": "{{ x }}\u202e\x1b"})
    assert json.loads(text) == {"python": {u: "{{ x }}\u202e\x1b"}}
    assert text.isascii()


@pytest.mark.parametrize(("variables", "message"), [
    ({"python": "/usr/bin/python3\x00"}, "refused job variable python: it contains a NUL character"),
    ({"build": {"{{ k }}": 1}}, "refused job variable build: key '{{ k }}' is not a plain name"),
    ({"build": {"__ansible_unsafe": "x"}}, "refused job variable build: key '__ansible_unsafe'"),
    ({"apt_errors": [object()]}, "refused job variable apt_errors[0]: a object is not JSON data"),
    ({"x": float("nan")}, "job vars are not JSON"),
    ({"x": "A" * (5 * 1024 * 1024)}, "more than 4194304"),
])
def test_what_cannot_be_data_is_refused(variables: dict[str, object], message: str) -> None:
    with pytest.raises(ExecutionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        extravars_json(variables)


async def test_refused_vars_never_start_a_run(tmp_path: Path) -> None:
    runner = AnsibleJobRunner(tmp_path / "agent", python_interpreter=sys.executable)
    out = await runner.run(JobSpec("j1", "rollback", {"python": "/x\x00"}), lambda e: None)
    assert out.status == "error" and out.error and "NUL character" in out.error
    assert not (tmp_path / "agent" / "jobs" / "j1").exists()


def test_each_run_has_its_own_config_without_unsafe_lookups(tmp_path: Path) -> None:
    books = tmp_path / "playbooks"
    shutil.copytree(DEFAULT_PLAYBOOKS_DIR, books)
    (books / "ansible.cfg").write_text("[defaults]\nallow_unsafe_lookups = True\n")  # becomes the run's cwd
    runner = AnsibleJobRunner(tmp_path / "agent", playbooks_dir=books, python_interpreter=sys.executable,
                              extra_env={"ANSIBLE_CONFIG": str(books / "ansible.cfg")})
    job = JobSpec("j1", "rollback", {"python": "{{ 1 }}"})
    dirs = runner._prepare(job, runner.job_dir("j1"))
    kwargs = runner._runner_kwargs(job, books / "rollback.yml", dirs, "1", lambda e: True, lambda: False)
    cfg = Path(kwargs["envvars"]["ANSIBLE_CONFIG"])
    assert cfg == dirs.ansible_cfg and "allow_unsafe_lookups = False" in cfg.read_text()
    assert "extravars" not in kwargs
    assert json.loads(dirs.extravars.read_text())["python"] == {"__ansible_unsafe": "{{ 1 }}"}
    assert dirs.extravars.stat().st_mode & 0o777 == 0o600
    assert isinstance(dirs, _RunDirs)
