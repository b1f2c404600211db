"""The dashboard in real headless Chromium, used the way an operator uses it.

A simulated fleet and a scripted simulated rollout (controller.web.sample) write the same tables the
registry and rollout engine write; uvicorn serves the dashboard; Chromium logs in, watches the rollout
progress over Server-Sent Events, opens the failed node, reads its diagnosis and pauses the rollout
(through controller.rollout.service). A viewer can't act; an unauthenticated visit is redirected.
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.store.db import Store, open_store
from controller.web import create_standalone_app, sample
from controller.web.auth import add_user
from tests.integration.web.browser import chromium, missing_reason

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]
_missing = missing_reason()
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

PASSWORD = "operator-pass-1"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("dash")
    store: Store = open_store(f"sqlite:///{tmp / 'controller.db'}")
    add_user(store, "olga", "operator", PASSWORD)
    add_user(store, "vic", "viewer", PASSWORD)
    hosts = sample.populate(store, 40, prefix="sim-gpu")
    sample.add_history(store, hosts[2])
    rollout = sample.ScriptedRollout(store, hosts[:16], rollout_id="r-sim-live", batch=3, fail=(hosts[2],))
    app = create_standalone_app(types.SimpleNamespace(store=store, state_dir=tmp, admin_token="t0ken"))
    with sample.ThreadServer(app) as server, chromium() as browser:
        yield {"url": server.url, "browser": browser, "rollout": rollout, "hosts": hosts, "store": store}
    store.close()


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
    page.goto(fleet["url"] + "/rollouts/r-sim-live")
    assert page.url.startswith(fleet["url"] + "/login?next=")
    assert page.locator("h1").inner_text() == "Log in"
    assert "r-sim-live" not in page.content().split("name=\"next\"")[0]  # nothing of the rollout shown
    api = page.request.get(fleet["url"] + "/ui/api/nodes")
    assert api.status == 401
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "wrong-password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.locator("#login-error").inner_text()
    ctx.close()


def test_operator_watches_rollout_reads_diagnosis_and_pauses(fleet: dict[str, Any]) -> None:
    base, hosts = fleet["url"], fleet["hosts"]
    ctx = fleet["browser"].new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    _login(page, base, "olga", "/rollouts/r-sim-live")
    page.wait_for_selector("#live.on", timeout=10_000)  # the SSE stream is open
    page.evaluate("window.__noReload = 'still here'")
    before = page.locator("#progress-text").inner_text()
    assert "0 of 16" in before
    # the canary is labelled from its canary flag, the other batches as `fleetctl rollout status` does
    assert page.locator(f"#rollout-nodes tr[data-host='{hosts[0]}'] td").nth(1).inner_text() == "canary"
    assert page.locator(f"#rollout-nodes tr[data-host='{hosts[1]}'] td").nth(1).inner_text() == "batch 1"
    assert page.locator("#batches tr[data-batch='1'] td").first.inner_text() == "batch 1"
    assert "max failures 2" in page.locator("#rollout-options").inner_text()
    # its one build (the failing node's) is listed, pending
    page.wait_for_selector(f"#builds tr[data-builder='{hosts[2]}'][data-build-status='pending']")

    with sample.Ticker(fleet["rollout"], interval=0.5):
        # progress arrives over SSE, without a reload
        _wait_until(lambda: not page.locator("#progress-text").inner_text().startswith("0 of"), 20)
        page.wait_for_selector(f"#failures .diag[data-host='{hosts[2]}']", timeout=20_000)
        assert page.evaluate("window.__noReload") == "still here"
        assert int(page.evaluate("document.body.dataset.updates")) >= 2
        failure = page.locator(f"#failures .diag[data-host='{hosts[2]}']").inner_text()
        assert "nvcc_torch_cuda_major_mismatch" in failure and "What to do" in failure

        # pause while it runs
        assert page.locator("button[data-action=pause]").is_enabled()
        page.click("button[data-action=pause]")
        page.wait_for_selector("#flash")
        assert "pause requested by user:olga" in page.locator("#flash").inner_text()
        page.wait_for_selector("#rollout-status .st-paused", timeout=10_000)
        assert page.locator("button[data-action=resume]").is_enabled()
        assert not page.locator("button[data-action=pause]").is_enabled()
        frozen = page.locator("#progress-text").inner_text()
        page.wait_for_timeout(1500)  # three ticks: a paused rollout doesn't move
        assert page.locator("#progress-text").inner_text() == frozen
        assert fleet["rollout"].status() == "paused"

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
    """``--canary 0``: batch 0 is an ordinary batch; the Builds card follows the build live and shows its wheel."""
    base, hosts = fleet["url"], fleet["hosts"]
    rollout = sample.ScriptedRollout(fleet["store"], hosts[16:20], rollout_id="r-sim-nocanary", batch=2,
                                     canary=False, build=(hosts[16],))
    ctx = fleet["browser"].new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    _login(page, base, "vic", "/rollouts/r-sim-nocanary")
    page.wait_for_selector("#live.on", timeout=10_000)
    header = page.locator("#rollout-options").inner_text()
    assert "batch size 2 · no canary · max failures 2" in header and "canary_batch" not in header
    node_batch = page.locator(f"#rollout-nodes tr[data-host='{hosts[16]}'] td").nth(1)
    assert node_batch.inner_text() == "batch 0"
    assert page.locator(f"#rollout-nodes tr[data-host='{hosts[18]}'] td").nth(1).inner_text() == "batch 1"
    assert "canary" not in page.locator("#rollout-nodes").inner_text()
    assert page.locator("#batches tr[data-batch='0'] td").first.inner_text() == "batch 0"
    assert "canary" not in page.locator("#batches").inner_text()
    card = page.locator("#builds-card")
    assert card.is_visible() and "pending" in card.inner_text()
    page.evaluate("window.__noReload = 'yes'")
    with sample.Ticker(rollout, interval=0.3):
        page.wait_for_selector(f"#builds tr[data-builder='{hosts[16]}'][data-build-status='succeeded']",
                               timeout=20_000)
    assert page.evaluate("window.__noReload") == "yes"  # over SSE, without a reload
    row = page.locator(f"#builds tr[data-builder='{hosts[16]}']").inner_text()
    assert "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl" in row and "sha256 " in row
    assert "variant=fa2-source;flash_attn=2.8.3" in row  # the build key
    assert page.locator(f"#builds a[href='/nodes/{hosts[16]}']").count() == 1
    # a rollout without builds has no Builds card
    sample.ScriptedRollout(fleet["store"], hosts[20:22], rollout_id="r-sim-wheels", batch=1)
    page.goto(base + "/rollouts/r-sim-wheels")
    page.wait_for_selector("#live.on", timeout=10_000)
    assert page.locator("#builds-card").is_hidden()
    assert page.locator(f"#rollout-nodes tr[data-host='{hosts[20]}'] td").nth(1).inner_text() == "canary"
    ctx.close()


def test_viewer_cannot_act(fleet: dict[str, Any]) -> None:
    base = fleet["url"]
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "vic", "/rollouts/r-sim-live")
    assert page.locator("button.act").count() == 0
    assert "viewer role" in page.locator("#viewer-note").inner_text()
    status = fleet["rollout"].status()
    # even a hand-made request with the right CSRF token is refused
    code = page.evaluate("""async () => {
        const r = await fetch('/rollouts/r-sim-live/resume', {method: 'POST',
            headers: {'X-CSRF-Token': document.body.dataset.csrf, 'Accept': 'application/json'}});
        return r.status; }""")
    assert code == 403
    assert fleet["rollout"].status() == status
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

    from controller.store.db import utcnow
    from controller.store.models import Node

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
    from controller.web.auth import add_user, remove_user

    base, store = fleet["url"], fleet["store"]
    add_user(store, "tmp-viewer", "viewer", PASSWORD)
    ctx = fleet["browser"].new_context()
    page = ctx.new_page()
    _login(page, base, "tmp-viewer", "/")
    page.wait_for_selector("#live.on", timeout=10_000)
    remove_user(store, "tmp-viewer")
    page.wait_for_url(f"{base}/login?next=%2F", timeout=20_000)  # the live stream ends; no data after that
    ctx.close()
