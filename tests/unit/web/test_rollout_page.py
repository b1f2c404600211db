"""The rollout page (/rollouts/<id>): its options in words, the builds in its snapshot, canary labels —
on the scripted simulated rollout and on the real H100 end-to-end run's database."""

from __future__ import annotations

import gzip
import re
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store.db import Store, open_store
from fleetctl.controller.testing import CUDA_MISMATCH_LOG, FleetThread, JobScript
from fleetctl.controller.web import app as web_app
from fleetctl.controller.web import create_standalone_app, rolloutview
from fleetctl.controller.web.auth import add_user

PASSWORD = "correct horse battery"
E2E_DB = Path(__file__).resolve().parents[2] / "fixtures" / "h100_e2e" / "controller.db.gz"
E2E_BUILD, E2E_WHEEL = "r-20261125-064043-b1f7", "r-20261125-070554-9cdb"
E2E_OPTIONS = {"batch": "1", "canary": 0, "canary_batch": False, "max_failures": "1", "max_parallel": 50,
               "step_timeouts": {"build-from-source": 5400, "verify": 1500, "install-wheel": 900},
               "verify_mode": "full"}


@pytest.mark.parametrize(("options", "words"), [
    (E2E_OPTIONS, ["batch size 1", "no canary", "max failures 1", "max parallel 50",
                   "step timeouts: build-from-source 90 min, verify 25 min, install-wheel 15 min",
                   "full verification"]),
    ({"batch": "1,5,25%", "canary": None, "canary_batch": True, "max_failures": "10%", "max_parallel": 50,
      "step_timeouts": {}}, ["batch sizes 1, 5, 25%", "canaries: one per GPU model and variant",
                             "max failures 10%", "max parallel 50"]),
    ({"canary": 1, "canary_batch": True}, ["1 canary"]),
    ({"canary": 3, "canary_batch": True}, ["3 canaries"]),
    ({"canary": 2, "canary_batch": False}, ["no canary"]),  # asked for, none chosen
    ({"canary": None, "canary_batch": False}, ["no canary"]),
    ({"canary_batch": True}, ["canary batch"]),
    ({"step_timeouts": {"install-wheel": 300, "verify": 45, "build-from-source": 9000}},
     ["step timeouts: install-wheel 5 min, verify 45 s, build-from-source 2 h 30 min"]),
    ({"verify_mode": "quick", "min_free_bytes": 1024**3}, ["quick verification", "min free artifact space 1 GiB"]),
    ({"verify_mode": "paranoid"}, ["verify mode paranoid"]),
    # keys this code does not know still show, readably; empty values are left out
    ({"simulated": True, "new_knob": 3, "some_map": {"a": 1, "b": False}, "hosts_list": ["x", "y"],
      "empty_one": "", "none_one": None, "empty_map": {}},
     ["simulated yes", "new knob 3", "some map a 1, b no", "hosts list x, y"]),
    ({}, []),
    (None, []),
])
def test_describe_options(options: dict[str, Any] | None, words: list[str]) -> None:
    assert rolloutview.describe_options(options) == words


@pytest.mark.parametrize(("seconds", "text"), [
    (None, ""), (-1, ""), (0, "0 s"), (45, "45 s"), (59.6, "1 min"), (60, "1 min"), (900, "15 min"),
    (1416.46, "23 min 36 s"), (5400, "90 min"), (5999, "99 min 59 s"), (6000, "1 h 40 min"), (7200, "2 h"),
    (9000, "2 h 30 min"), (86400, "24 h"),
])
def test_duration_text(seconds: float | None, text: str) -> None:
    assert rolloutview.duration_text(seconds) == text


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'controller.db'}")
    add_user(st, "vic", "viewer", PASSWORD)
    yield st
    st.close()


def _login(c: TestClient) -> None:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
    assert token is not None
    r = c.post("/login", data={"username": "vic", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
               follow_redirects=False)
    assert r.status_code == 303


def _header(page: str) -> str:
    m = re.search(r'<p class="muted" id="rollout-options">(.*?)</p>', page, re.S)
    assert m is not None
    return m.group(1)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    """A real controller (rollout service and engine) with fake agents (controller.testing)."""
    with FleetThread(state_dir=tmp_path / "controller") as ft:
        add_user(ft.fleet.ctx.store, "vic", "viewer", PASSWORD)
        yield ft


def _rollout(ft: FleetThread, profiles: tuple[str, ...], **options: Any) -> tuple[list[str], str]:
    hosts = ft.call(ft.fleet.add_nodes(load_profile(p, f"sim-node-{i:05d}") for i, p in enumerate(profiles)))
    rid = ft.call(ft.fleet.start_rollout(RolloutRequest(nodes=",".join(hosts), actor="user:demo", **options)))
    return hosts, rid


def test_canary0_rollout_snapshot_builds_live(fleet: FleetThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_app, "SSE_MAX_SECONDS", 0.5)
    monkeypatch.setattr(web_app, "SSE_POLL_SECONDS", 0.1)
    # the L40S and the T4 build from source (a build key each); the T4's build fails with a CUDA mismatch
    hosts, rid = _rollout(fleet, ("l40s", "a100", "a100", "t4"), batch="2", canary=0, max_failures="2")
    fleet.fleet.script(hosts[3], "build-from-source", JobScript(error="build-from-source failed (rc 2)",
                                                                log=CUDA_MISMATCH_LOG))
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        _login(c)
        d = c.get(f"/ui/api/rollouts/{rid}").json()
        assert [(n["batch"], n["canary"]) for n in d["nodes"]] == [(0, False), (0, False), (1, False), (1, False)]
        assert [(b["index"], b["canary"]) for b in d["batches"]] == [(0, False), (1, False)]
        assert {b["builder"]: b["status"] for b in d["builds"]} == {hosts[0]: "pending", hosts[3]: "pending"}
        page = c.get(f"/rollouts/{rid}").text
        assert "· batch size 2 · no canary · max failures 2" in _header(page)
        assert 'id="builds-card">' in page  # shown: the rollout has builds
        fleet.call(fleet.fleet.start_engine())
        fleet.call(fleet.fleet.wait_rollout(rid, "succeeded", "partial", "paused", "aborted"))
        builds = {b["builder"]: b for b in c.get(f"/ui/api/rollouts/{rid}").json()["builds"]}
        ok, failed = builds[hosts[0]], builds[hosts[3]]
        assert ok["status"] == "succeeded"
        assert ok["artifact_filename"].startswith("flash_attn-") and ok["artifact_filename"].endswith(".whl")
        assert ok["attempts"] == 1 and ok["sha256_short"] == ok["artifact_sha256"][:12]
        assert ok["build_key"].startswith("variant=fa2-source;") and not ok["reused"]
        assert failed["status"] == "failed" and "nvcc major version differs" in failed["error"]
        # the live updates carry the builds too
        with c.stream("GET", "/ui/events", params={"topic": f"rollout:{rid}"}) as r:
            body = "".join(r.iter_text())
        assert ok["artifact_filename"] in body and '"builds": [' in body


def test_rollout_without_builds_hides_the_card(fleet: FleetThread) -> None:
    _, rid = _rollout(fleet, ("h100", "h100", "h100"), batch="2", max_failures="2")
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        _login(c)
        d = c.get(f"/ui/api/rollouts/{rid}").json()
        assert d["builds"] == [] and [n["canary"] for n in d["nodes"]] == [True, False, False]
        page = c.get(f"/rollouts/{rid}").text
        assert 'id="builds-card" hidden>' in page
        assert "max failures 2" in _header(page)


@pytest.fixture
def e2e_client(tmp_path: Path) -> Iterator[TestClient]:
    copy = tmp_path / "controller.db"
    with gzip.open(E2E_DB) as src, copy.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    st = open_store(f"sqlite:///{copy}")
    add_user(st, "vic", "viewer", PASSWORD)
    with TestClient(create_standalone_app(types.SimpleNamespace(store=st, state_dir=tmp_path))) as c:
        _login(c)
        yield c
    st.close()


def test_real_h100_run_rollout_pages(e2e_client: TestClient) -> None:
    c = e2e_client
    page = c.get(f"/rollouts/{E2E_BUILD}").text
    header = _header(page)
    assert header.endswith("· batch size 1 · no canary · max failures 1 · max parallel 50 · step timeouts: "
                           "build-from-source 90 min, verify 25 min, install-wheel 15 min · full verification")
    assert "canary_batch" not in header and "{" not in header and "&#39;" not in header
    d = c.get(f"/ui/api/rollouts/{E2E_BUILD}").json()
    assert [(n["hostname"], n["batch"], n["canary"]) for n in d["nodes"]] == [("vm", 0, False)]
    assert [(b["index"], b["canary"]) for b in d["batches"]] == [(0, False)]
    [build] = d["builds"]
    assert build["status"] == "succeeded" and build["builder"] == "vm" and build["attempts"] == 1
    assert build["artifact_filename"] == "flash_attn-2.8.3.post1-cp312-cp312-linux_x86_64.whl"
    assert build["sha256_short"] == "483afb9e9c4a" and build["duration"] == "23 min 36 s"
    assert build["build_key"].startswith("variant=fa2-source;flash_attn=2.8.3.post1;") and build["error"] is None
    page2 = c.get(f"/rollouts/{E2E_WHEEL}").text
    assert _header(page2).endswith("· batch size 1 · no canary · max failures 1 · max parallel 50 · "
                                   "step timeouts: install-wheel 5 min, verify 10 min")
    assert 'id="builds-card" hidden>' in page2
    assert c.get(f"/ui/api/rollouts/{E2E_WHEEL}").json()["builds"] == []
