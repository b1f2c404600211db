"""The dashboard in real headless Chromium, used the way an operator uses it.

A real controller with fake agents (controller.testing): the registry, the rollout engine and the job
dispatcher write every table, the agents' outcomes are scripted; uvicorn serves the dashboard; Chromium logs in,
watches the rollout progress over Server-Sent Events, opens the failed node, reads its diagnosis and pauses the rollout
(through controller.rollout.service). A viewer can't act; an unauthenticated visit is redirected.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import CUDA_MISMATCH_LOG, FleetThread, JobScript, ThreadServer
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user
from tests.integration.web.browser import chromium, missing_reason

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]
_missing = missing_reason()
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

PASSWORD = "operator-pass-1"
PROFILES = ("h100", "a100", "l40s", "t4")


def start_rollout(ft: FleetThread, hosts: list[str], **options: Any) -> str:
    return ft.call(ft.fleet.start_rollout(RolloutRequest(nodes=",".join(hosts), actor="user:demo", **options)))


def labels(store: Any, rid: str) -> dict[str, str]:
    """What the page must call each node's batch: ``canary`` for canaries, else ``batch N``."""
    return {n["hostname"]: "canary" if n.get("canary") else f"batch {n['batch']}"
            for n in service.get_status(store, rid)["nodes"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("dash")
    with FleetThread(state_dir=tmp / "controller", job_seconds=0.4) as ft:
        store = ft.fleet.ctx.store
        add_user(store, "olga", "operator", PASSWORD)
        add_user(store, "vic", "viewer", PASSWORD)
        hosts = ft.call(ft.fleet.add_nodes(load_profile(PROFILES[i % len(PROFILES)], f"sim-gpu-{i:05d}")
                                           for i in range(40)))
        facts = load_profile(PROFILES[2], hosts[2])  # its driver was upgraded since it registered
        assert facts.driver is not None
        ft.call(ft.fleet.change_facts(hosts[2], dataclasses.replace(
            facts, driver=dataclasses.replace(facts.driver, version="999.1.2"))))
        for step in ("build-from-source", "install-wheel"):  # its first step fails with a CUDA mismatch
            ft.fleet.script(hosts[2], step,
                            JobScript(seconds=0.4, error=f"{step} failed (rc 2)", log=CUDA_MISMATCH_LOG))
        rid = start_rollout(ft, hosts[:16], batch="3", max_failures="2")
        app = create_standalone_app(ft.fleet.ctx)
        app.state.rollout_engine = ft.fleet.engine  # the dashboard's actions wake it, as in the controller
        with ThreadServer(app) as server, chromium() as browser:
            yield {"url": server.url, "browser": browser, "ft": ft, "rollout": rid, "hosts": hosts, "store": store}


def _wait_until(cond: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(0.2)


def _login(page: Any, base: str, user: str, target: str = "/") -> None:
    page.goto(base + target)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + target)


def test_unauthenticated_visit_is_redirected(fleet: dict[str, Any]) -> None:
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    page.goto(fleet["url"] + f"/rollouts/{fleet['rollout']}")
    assert page.url.startswith(fleet["url"] + "/login?next=")
    assert page.locator("h1").inner_text() == "Log in"
    assert fleet["rollout"] not in page.content().split("name=\"next\"")[0]  # nothing of the rollout shown
    api = page.request.get(fleet["url"] + "/ui/api/nodes")
    assert api.status == 401
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "wrong-password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.locator("#login-error").inner_text()
    ctx.close()


def test_operator_watches_rollout_reads_diagnosis_and_pauses(fleet: dict[str, Any]) -> None:
    base, hosts, rid, ft = fleet["url"], fleet["hosts"], fleet["rollout"], fleet["ft"]
    ctx = fleet["browser"].new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    _login(page, base, "olga", f"/rollouts/{rid}")
    page.wait_for_selector("#live.on", timeout=10_000)  # the SSE stream is open
    page.evaluate("window.__noReload = 'still here'")
    before = page.locator("#progress-text").inner_text()
    assert "0 of 16" in before
    # canaries are labelled from their canary flag, the other batches as `fleetctl rollout status` does
    for host, label in labels(fleet["store"], rid).items():
        assert page.locator(f"#rollout-nodes tr[data-host='{host}'] td").nth(1).inner_text() == label
    assert "max failures 2" in page.locator("#rollout-options").inner_text()

    ft.call(ft.fleet.start_engine())
    # progress arrives over SSE, without a reload
    _wait_until(lambda: not page.locator("#progress-text").inner_text().startswith("0 of"), 20)
    page.wait_for_selector(f"#failures .diag[data-host='{hosts[2]}']", timeout=20_000)
    assert page.evaluate("window.__noReload") == "still here"
    assert int(page.evaluate("document.body.dataset.updates")) >= 2
    failure = page.locator(f"#failures .diag[data-host='{hosts[2]}']").inner_text()
    assert "nvcc_torch_cuda_major_mismatch" in failure and "What to do" in failure

    # a failed canary pauses the rollout; resume it, then pause it while it runs
    if service.get_status(fleet["store"], rid)["status"] == "paused":
        page.wait_for_selector("button[data-action=resume]:enabled", timeout=10_000)
        page.click("button[data-action=resume]")
        page.wait_for_selector("#rollout-status .st-running", timeout=10_000)
    if service.get_status(fleet["store"], rid)["status"] == "running":
        page.click("button[data-action=pause]")
        page.wait_for_selector("#flash")
        assert "pause requested by user:olga" in page.locator("#flash").inner_text()
        page.wait_for_selector("#rollout-status .st-paused", timeout=10_000)
        assert page.locator("button[data-action=resume]").is_enabled()
        assert not page.locator("button[data-action=pause]").is_enabled()
        assert service.get_status(fleet["store"], rid)["status"] == "paused"

    # open the failed node and read its diagnosis
    page.click(f"#failures .diag[data-host='{hosts[2]}'] a")
    page.wait_for_url(f"{base}/nodes/{hosts[2]}")
    diag = page.locator("#diagnosis").inner_text()
    assert "Diagnosis: nvcc_torch_cuda_major_mismatch" in diag
    assert "same major as torch" in diag  # the remedy
    assert "simulated" in page.locator("h1").inner_text()
    assert "driver.version" in page.locator("body").inner_text()  # facts history
    ctx.close()


def test_canary0_rollout_batches_and_builds(fleet: dict[str, Any]) -> None:
    """``--canary 0``: batch 0 is an ordinary batch, labelled so on the page."""
    base, hosts, ft = fleet["url"], fleet["hosts"], fleet["ft"]
    rid = start_rollout(ft, hosts[16:20], batch="2", canary=0)
    ctx = fleet["browser"].new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    _login(page, base, "vic", f"/rollouts/{rid}")
    page.wait_for_selector("#live.on", timeout=10_000)
    header = page.locator("#rollout-options").inner_text()
    assert "no canary" in header and "canary_batch" not in header
    for host, label in labels(fleet["store"], rid).items():
        assert label != "canary"
        assert page.locator(f"#rollout-nodes tr[data-host='{host}'] td").nth(1).inner_text() == label
    assert "canary" not in page.locator("#rollout-nodes").inner_text()
    assert page.locator("#batches tr[data-batch='0'] td").first.inner_text() == "batch 0"
    ctx.close()


def test_viewer_cannot_act(fleet: dict[str, Any]) -> None:
    base, rid = fleet["url"], fleet["rollout"]
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "vic", f"/rollouts/{rid}")
    assert page.locator("button.act").count() == 0
    assert "viewer role" in page.locator("#viewer-note").inner_text()
    status = service.get_status(fleet["store"], rid)["status"]
    # even a hand-made request with the right CSRF token is refused
    code = page.evaluate("""async (rid) => {
        const r = await fetch('/rollouts/' + rid + '/resume', {method: 'POST',
            headers: {'X-CSRF-Token': document.body.dataset.csrf, 'Accept': 'application/json'}});
        return r.status; }""", rid)
    assert code == 403
    assert service.get_status(fleet["store"], rid)["status"] == status
    ctx.close()


def test_node_table_filters_sorts_and_pages(fleet: dict[str, Any]) -> None:
    base = fleet["url"]
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "vic", "/nodes?per_page=10")
    assert page.locator("#node-table tbody tr").count() == 10
    assert "page 1 of 4" in page.locator("#pager").inner_text()
    page.click("#pager a[rel=next]")
    assert "page 2 of 4" in page.locator("#pager").inner_text()
    page.fill("#node-search", "sim-gpu-0001")
    page.click("#node-filters button[type=submit]")
    rows = page.locator("#node-table tbody tr")
    found = page.eval_on_selector_all("#node-table tbody tr", "r => r.map(x => x.dataset.host)")
    assert rows.count() == 10 and all(h.startswith("sim-gpu-0001") for h in found)
    page.goto(base + "/nodes?sort=hostname&dir=desc")
    assert page.locator("#node-table tbody tr").first.get_attribute("data-host") == "sim-gpu-00039"
    ctx.close()


def test_node_table_and_node_page_update_live(fleet: dict[str, Any]) -> None:
    from sqlalchemy import select

    from fleetctl.controller.store.db import utcnow
    from fleetctl.controller.store.models import Node

    base, store = fleet["url"], fleet["store"]
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "vic", "/nodes?q=sim-gpu-0003&sort=hostname")
    page.wait_for_selector("#live.on", timeout=10_000)
    page.evaluate("window.__noReload = 'yes'")
    page.focus("#node-search")
    page.keyboard.type("typing")
    with store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == "sim-gpu-00031")).one()
        node.status, node.status_changed_at = ("degraded" if node.status != "degraded" else "online"), utcnow()
        wanted = node.status
    page.wait_for_selector(f"#node-table tr[data-host='sim-gpu-00031'] .st-{wanted}", timeout=15_000)
    assert page.evaluate("window.__noReload") == "yes"
    assert "typing" in page.input_value("#node-search")  # what the user typed survives the update
    page2 = ctx.new_page()
    page2.goto(base + "/nodes/sim-gpu-00031")
    page2.wait_for_selector("#live.on", timeout=10_000)
    with store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == "sim-gpu-00031")).one()
        node.status, node.status_changed_at = "offline", utcnow()
    page2.wait_for_selector("#node-status .st-offline", timeout=15_000)
    ctx.close()


def test_removed_user_is_sent_to_login(fleet: dict[str, Any]) -> None:
    from fleetctl.controller.web.auth import add_user, remove_user

    base, store = fleet["url"], fleet["store"]
    add_user(store, "tmp-viewer", "viewer", PASSWORD)
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "tmp-viewer", "/")
    page.wait_for_selector("#live.on", timeout=10_000)
    remove_user(store, "tmp-viewer")
    page.wait_for_url(f"{base}/login?next=%2F", timeout=20_000)  # the live stream ends; no data after that
    ctx.close()
