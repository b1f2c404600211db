"""The controller's side: node-reported text reaches job variables only when it fullmatches its pattern.

``apt_keyring_vars`` takes a failing source only when its URI is a plain URL, and ``checked_job_vars`` (the one
check ``RolloutEngine._job_vars`` applies to every job) sends any node-derived value that fails its pattern as
``None`` — so the playbook refuses it by name — and apt error lines as bounded, inert text. No Ansible here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fleetctl.controller.rollout.core import State
from fleetctl.controller.rollout.engine import RolloutEngine, apt_keyring_vars
from fleetctl.controller.rollout.jobvars import MAX_APT_LINE, MAX_APT_LINES, NODE_VAR_PATTERNS, checked_job_vars
from tests.integration.injection.payloads import TEMPLATES, payload

NVIDIA = "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64"
GOOD = {"python": "/opt/torch/.venv/bin/python3", "cuda_home": "/usr/local/cuda-12.4", "driver_cuda_max": "12.4",
        "repo_uri": NVIDIA, "key_url": NVIDIA + "/3bf863cc.pub", "keyring_name": "cuda-archive-keyring",
        "key_id": "A4B469963BF863CC", "gpu_archs": "gfx90a;gfx942"}


def test_good_values_pass_untouched() -> None:
    assert checked_job_vars({**GOOD, "rollout_id": "r1", "build": {"x": 1}}) == {**GOOD, "rollout_id": "r1",
                                                                                 "build": {"x": 1}}


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
@pytest.mark.parametrize("name", sorted(NODE_VAR_PATTERNS))
def test_every_payload_in_every_node_field_goes_as_null(name: str, kind: str, tmp_path: Path) -> None:
    for value in (payload(kind, tmp_path, name), GOOD[name] + payload(kind, tmp_path, name),
                  GOOD[name] + "\n", 12.4, ["/usr/bin/python3"]):
        got = checked_job_vars({**GOOD, name: value}, "node-1")
        assert got[name] is None, (name, value)
        assert {k: v for k, v in got.items() if k != name} == {k: v for k, v in GOOD.items() if k != name}


def test_apt_errors_are_bounded_inert_lines(tmp_path: Path) -> None:
    lines = [payload(kind, tmp_path, "apt") for kind in sorted(TEMPLATES)] * 10
    got = checked_job_vars({"apt_errors": lines})["apt_errors"]
    assert len(got) == MAX_APT_LINES and all(len(line) <= MAX_APT_LINE for line in got)
    assert not any(ch in line for line in got for ch in "\x1b\r\n\x07\u202e\x00")
    assert any("{{ lookup('pipe'" in line for line in got)  # still the text it was: data, not rendered


def test_a_poisoned_apt_source_is_not_taken(tmp_path: Path) -> None:
    poisoned = [f"W: GPG error: http://repo.example/{payload('lookup-nospace', tmp_path, 'u')} InRelease: "
                "NO_PUBKEY A4B469963BF863CC",
                "W: GPG error: http://developer.download.nvidia.com.evil.example/x InRelease: "
                "NO_PUBKEY A4B469963BF863CC"]
    got = apt_keyring_vars(poisoned)  # the first line is skipped, the second is not NVIDIA's
    assert got.get("repo_uri") == "http://developer.download.nvidia.com.evil.example/x"
    assert got.get("keyring_name") == "developer-download-nvidia-com-evil-example" and "key_url" not in got
    assert apt_keyring_vars(poisoned[:1]) == {"apt_errors": poisoned[:1]}
    real = apt_keyring_vars([f"W: GPG error: {NVIDIA} InRelease: The following signatures couldn't be verified "
                             "because the public key is not available: NO_PUBKEY A4B469963BF863CC"])
    assert real["keyring_name"] == "cuda-archive-keyring" and real["key_url"] == NVIDIA + "/3bf863cc.pub"


def test_the_engine_checks_every_job(tmp_path: Path) -> None:
    """``_job_vars`` as the engine calls it, for the steps that need no database (keyring, toolkit, rollback)."""
    bad = payload("lookup", tmp_path, "python")
    node = SimpleNamespace(hostname="n1", attempt=0, build_key=None, previous=None,
                           plan={"python": bad, "apt_errors": [f"E: {bad}\x1b[2J"], "driver_cuda_max": "12.4\n",
                                 "variant": "fa2-wheel", "decision": {"toolkit": "12.4"}})
    rollout = SimpleNamespace(id="r1", options={})
    plan = SimpleNamespace(version="2.8.3", variant="fa2-wheel")
    engine = cast(Any, SimpleNamespace(artifacts=None))
    engine._rollback_vars = lambda s, r, n: RolloutEngine._rollback_vars(engine, s, r, n)
    for state in (State.KEYRING, State.TOOLKIT, State.ROLLING_BACK):
        got = RolloutEngine._job_vars(engine, cast(Any, None), cast(Any, rollout), cast(Any, node),
                                      cast(Any, plan), state)
        assert got["python"] is None, state
        if state == State.KEYRING:
            assert got["apt_errors"] == [f"E: {bad}?[2J"] and "repo_uri" not in got
        if state == State.TOOLKIT:
            assert got["driver_cuda_max"] is None and got["cuda_version"] == "12.4"
