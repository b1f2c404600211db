"""The H100 attempt of 2026-11-25 (docs/gpu-e2e.md): build-from-source failed at its first ``copy: content:``
task with a bare "Task failed: [Errno 2] No such file or directory" — Ansible's ``os.getcwd()`` (``unfrackpath``,
called by every ``copy`` task) once ansible-playbook's working directory, the installed ``playbooks/`` it was
started in, had been replaced under the running agent (each device call re-sends the checkout).

Here the same happens on purpose, with connection ``local`` through ``AnsibleJobRunner``: the agent's own working
directory is gone before the job starts, the playbook's first task deletes the installed playbooks directory,
and ``ANSIBLE_LOCAL_TEMP``/``ANSIBLE_REMOTE_TEMP`` in the agent's environment point at a directory that is
deleted too. The copy-with-content tasks must still work (the job runs its own copy of the playbooks, in its
own existing temp dirs), twice (idempotent), and the run directory is ``STATE/jobs/<job_id>``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.executor import AnsibleJobRunner
from fleetctl.fleet.jobs import JobSpec

PLAYBOOK = """\
- name: Copy with content after the installed playbooks are gone
  hosts: all
  gather_facts: false
  tasks:
    - name: The installed playbooks are replaced (a checkout re-sent mid-run), the environment's temp dir goes
      ansible.builtin.command:
        argv: [sh, -c, 'cp -a "$1" "$1.new" && rm -rf "$1" "$2" && mv "$1.new" "$1"', sh,
               "{{ installed_playbooks }}", "{{ shared_tmp }}"]
      changed_when: false
    - name: The job's own temp dirs exist, under its run directory
      ansible.builtin.stat:
        path: "{{ item }}"
      loop: ["{{ lookup('env', 'ANSIBLE_LOCAL_TEMP') }}", "{{ lookup('env', 'ANSIBLE_REMOTE_TEMP') }}"]
      register: tmps
    - name: Check them
      ansible.builtin.assert:
        that:
          - tmps.results | map(attribute='stat.isdir') | list == [true, true]
          - lookup('env', 'ANSIBLE_LOCAL_TEMP') is search('/jobs/' ~ job_id ~ '/tmp/')
          - lookup('env', 'ANSIBLE_REMOTE_TEMP') is search('/jobs/' ~ job_id ~ '/tmp/')
    - name: Mark something with content
      ansible.builtin.copy:
        dest: "{{ out }}/marker"
        content: "{{ job_id }}\\n"
        mode: "0644"
    - name: Mark it again (unchanged)
      ansible.builtin.copy:
        dest: "{{ out }}/marker"
        content: "{{ job_id }}\\n"
        mode: "0644"
      register: again
    - name: Idempotent
      ansible.builtin.assert:
        that: not again.changed
"""


def _ansible() -> bool:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return shutil.which("ansible-playbook", path=path) is not None


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _ansible(), reason="ansible-playbook not installed")
async def test_copy_content_survives_a_replaced_checkout_and_a_gone_cwd(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    installed = tmp_path / "checkout" / "playbooks"
    installed.mkdir(parents=True)
    (installed / "install-wheel.yml").write_text(PLAYBOOK)
    shared_tmp = tmp_path / "shared-ansible-tmp"
    shared_tmp.mkdir()
    monkeypatch.setenv("ANSIBLE_LOCAL_TEMP", str(shared_tmp))
    monkeypatch.setenv("ANSIBLE_REMOTE_TEMP", str(shared_tmp))
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    out = tmp_path / "out"
    out.mkdir()
    state = tmp_path / "agent"
    runner = AnsibleJobRunner(state, playbooks_dir=installed, python_interpreter=sys.executable)
    gone = tmp_path / "agent-cwd"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # the agent's working directory no longer exists

    events: list[dict[str, Any]] = []
    for n, job_id in enumerate(("job-1", "job-2")):
        if n:
            shared_tmp.mkdir()
        spec = JobSpec(job_id, "install-wheel", {"installed_playbooks": str(installed), "shared_tmp": str(shared_tmp),
                                                "out": str(out), "job_id": job_id}, timeout_s=120)
        outcome = await runner.run(spec, events.append)
        assert outcome.status == "successful", (outcome.error, outcome.result)
        assert (out / "marker").read_text() == f"{job_id}\n"
        job_dir = state / "jobs" / job_id
        assert (job_dir / "artifacts" / "1" / "job_events").is_dir()
        assert (job_dir / "project" / "install-wheel.yml").is_file()  # what the job ran
        envvars = json.loads((job_dir / "env" / "envvars").read_text())
        assert envvars["ANSIBLE_LOCAL_TEMP"] == str((job_dir / "tmp" / "local").resolve())
        assert envvars["ANSIBLE_REMOTE_TEMP"] == str((job_dir / "tmp" / "remote").resolve())
        assert not (job_dir / "tmp" / "local").exists() and not (job_dir / "tmp" / "remote").exists()
    assert not (state / "jobs" / "jobs").exists()
    ok = [e["event_data"]["task"] for e in events if e.get("event") == "runner_on_ok"]
    assert ok.count("Mark something with content") == 2 and ok.count("Mark it again (unchanged)") == 2
