"""Node-reported text never becomes Ansible template code, through the agent's real runner (issue 13).

Every fact that reaches a job variable — ``python.executable`` (→ ``python``), ``apt.errors`` (→ ``apt_errors``
and the ``repo_uri``/``keyring_name``/``key_id`` the controller derives from them), ``toolkit.path``
(→ ``cuda_home``), ``driver.cuda_max`` (→ ``driver_cuda_max``), and for good measure host names, GPU names,
versions and artifact file names — carries every payload of :mod:`payloads` through the real
:class:`AnsibleJobRunner` (connection ``local``, run and state dirs in tmp):

- ``test_values_are_plain_text``: a stand-in playbook uses every variable the ways the real playbooks do
  (set_fact, filters, concatenation, loops, module arguments, conditionals, set_stats) and echoes it back; the
  echo must equal what was sent, byte for byte, and no marker may appear;
- ``test_real_playbook_refuses_poisoned_vars``: each real playbook (one run each) gets payloads in every
  variable it reads; it must fail in its validation, no marker may appear, and the rendered form of the
  templating probes (``INJECTED``) must not appear in any event or in the outcome.

Each ansible-playbook run costs ~3-5 s, hence one run per playbook with all payloads at once.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.executor import DEFAULT_PLAYBOOKS_DIR, AnsibleJobRunner
from fleetctl.controller.rollout.engine import apt_keyring_vars
from fleetctl.fleet.jobs import JobOutcome, JobSpec
from tests.integration.injection.payloads import RENDERED, TEMPLATES, fired, payload

pytestmark = pytest.mark.skipif(shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) is None,
                                reason="ansible-playbook not installed")

#: scalar job variables fed from node facts (or, for the last ones, from names the node influences)
SCALARS = ("python", "repo_uri", "key_id", "keyring_name", "key_url", "cuda_home", "driver_cuda_max",
           "cuda_version", "flash_attn_version", "hostname", "gpu_name", "torch_version", "wheel_filename",
           "rollout_id")
LISTS = ("apt_errors", "dep_requirements")
KINDS = tuple(TEMPLATES)


def combined(markers: Path, field: str) -> str:
    """Every payload kind in one value: one field exercises them all in one run."""
    return " | ".join(payload(kind, markers, field) for kind in KINDS)


def poisoned_vars(markers: Path) -> dict[str, Any]:
    out: dict[str, Any] = {name: combined(markers, name) for name in SCALARS}
    for name in LISTS:
        out[name] = [payload(kind, markers, f"{name}{i}") for i, kind in enumerate(KINDS)]
    out["build"] = {"cuda_archs": [payload("lookup", markers, "build-archs")],
                    **{kind.replace("-", "_"): payload(kind, markers, f"build-{kind}") for kind in KINDS}}
    return out


class Runner:
    def __init__(self, tmp: Path, playbooks_dir: Path = DEFAULT_PLAYBOOKS_DIR) -> None:
        self.runner = AnsibleJobRunner(tmp / "agent", node_state_dir=tmp / "node", playbooks_dir=playbooks_dir,
                                       python_interpreter=sys.executable)
        self.events: list[dict[str, Any]] = []
        self.n = 0

    async def run(self, kind: str, variables: dict[str, Any]) -> JobOutcome:
        self.n += 1
        return await self.runner.run(JobSpec(f"inj-{self.n}", kind, variables, timeout_s=180), self.events.append)

    def everything(self, outcome: JobOutcome) -> str:
        """All a job said: its events (as streamed) and its outcome."""
        return json.dumps([self.events, outcome.status, outcome.error, outcome.result], default=str)


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    return d


def echo_playbook() -> str:
    """A playbook using every variable the ways the real ones do, echoing each back through set_stats."""
    names = (*SCALARS, *LISTS, "build")
    copy = "\n".join(f"        e_{n}: \"{{{{ {n} }}}}\"" for n in names)
    mangle = "\n".join(f"        f_{n}: \"{{{{ 'x' ~ ({n} | string | upper | lower | basename) ~ '/' ~ "
                       f"({n} | string | regex_replace('[^a-z]', '')) }}}}\"" for n in SCALARS)
    echo = "\n".join(f"            {n}: \"{{{{ e_{n} }}}}\"" for n in names)
    return f"""---
- name: Echo the job variables
  hosts: all
  gather_facts: false
  tasks:
    - name: Copy every variable through set_fact
      ansible.builtin.set_fact:
{copy}
    - name: Run every scalar through filters and concatenation
      ansible.builtin.set_fact:
{mangle}
    - name: Use them in conditionals
      ansible.builtin.assert:
        quiet: true
        that:
          - python is string and python | length > 0
          - e_python == python
          - (build.cuda_archs | length) == 1
          - apt_errors | select('search', 'lookup') | list | length > 0
    - name: Loop over the lists and the dict
      ansible.builtin.debug:
        msg: "{{{{ item }}}} / {{{{ e_python | truncate(40) }}}}"
      loop: "{{{{ apt_errors + dep_requirements + (build | dict2items | map(attribute='value') | list) }}}}"
    - name: Hand values to a module
      ansible.builtin.command:
        argv: [/bin/echo, "{{{{ e_python }}}}", "{{{{ e_cuda_home }}}}", "{{{{ apt_errors | join(' ') }}}}"]
      changed_when: false
    - name: Echo them back
      ansible.builtin.set_stats:
        per_host: false
        data:
          echo:
{echo}
"""


async def test_values_are_plain_text(tmp_path: Path, markers: Path) -> None:
    books = tmp_path / "playbooks"
    shutil.copytree(DEFAULT_PLAYBOOKS_DIR, books)
    (books / "rollback.yml").write_text(echo_playbook())
    runner = Runner(tmp_path, books)
    sent = poisoned_vars(markers)
    out = await runner.run("rollback", sent)
    assert fired(markers) == [], "payloads ran"
    assert out.status == "successful", out.error
    echoed = out.result["echo"]
    for name, value in sent.items():
        assert echoed[name] == value, f"{name} came back changed: Ansible treated it as a template"
    assert RENDERED not in runner.everything(out)


def real_vars(kind: str, markers: Path) -> dict[str, Any]:
    """What the controller would send for this playbook from poisoned facts, plus poison in every var it reads."""
    every = poisoned_vars(markers)
    base = {"rollout_id": every["rollout_id"], "attempt": 0, "python": every["python"],
            "flash_attn_version": every["flash_attn_version"]}
    if kind == "apt-keyring-fix":
        lines = [f"W: GPG error: http://repo.example/{payload('lookup-nospace', markers, 'apt-uri')} InRelease: "
                 f"The following signatures couldn't be verified: NO_PUBKEY A4B469963BF863CC",
                 *every["apt_errors"]]
        # the controller's own derivation first (a poisoned URI must not come through), then a controller that
        # let everything through: the playbook and the agent must still treat it all as data
        return {**base, **apt_keyring_vars(lines), "apt_errors": lines}
    if kind == "cuda-toolkit":
        return {**base, "cuda_version": "12.4", "driver_cuda_max": every["driver_cuda_max"]}
    if kind == "install-wheel":
        return {**base, "wheel_path": "/nonexistent/flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl",
                "wheel_sha256": "0" * 64, "wheel_filename": every["wheel_filename"],
                "dep_requirements": every["dep_requirements"]}
    if kind == "build-from-source":
        return {**base, "sdist_path": "/nonexistent/flash_attn-2.8.3.tar.gz", "sdist_sha256": "0" * 64,
                "cuda_archs": "80;90", "cuda_home": every["cuda_home"], "build": every["build"], "install": False}
    return base


@pytest.mark.parametrize("kind", ["apt-keyring-fix", "cuda-toolkit", "install-wheel", "build-from-source",
                                  "rollback"])
async def test_real_playbook_refuses_poisoned_vars(kind: str, tmp_path: Path, markers: Path) -> None:
    runner = Runner(tmp_path)
    out = await runner.run(kind, real_vars(kind, markers))
    assert fired(markers) == [], "payloads ran"
    assert out.status == "failed", out.error
    assert out.error and out.error.startswith("Validate"), out.error  # stopped by validation, before anything ran
    assert out.result["stats"]["changed"] == 0
    assert RENDERED not in runner.everything(out)
