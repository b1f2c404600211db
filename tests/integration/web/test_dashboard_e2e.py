"""End to end: a real controller (gRPC + HTTP + rollout engine + SQLite) with simulated agents, and the
dashboard in headless Chromium. The executor on the nodes is simulated (tests/integration/rollout/simrunner.py);
everything else is real. An operator watches the rollout progress live over SSE, opens the failed node and
reads its diagnosis, and pauses the rollout from the page.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetctl.controller.app import RunningController
from fleetctl.controller.web.auth import add_user
from tests.integration.fleet_support import SimAgents
from tests.integration.rollout.simrunner import Script, SimRunner
from tests.integration.web.browser import CHROMIUM, CHROMIUM_ARGS, missing_reason

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]
_missing = missing_reason()
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

NODES = [("h100-1", "h100"), ("a100-1", "a100"), ("l40s-1", "l40s"), ("a100-2", "a100"), ("l40s-2", "l40s"),
         ("h100-2", "h100"), ("a100-3", "a100"), ("l40s-3", "l40s")]
FAILING = "a100-2"
CUDA_MISMATCH = ("RuntimeError:\nThe detected CUDA version (11.8) mismatches the version that was used to compile\n"
                 "PyTorch (12.1). Please make sure to use the same CUDA versions.")
PASSWORD = "operator-pass-1"
KINDS = ("apt-keyring-fix", "cuda-toolkit", "build-from-source", "install-wheel", "verify")


async def _text(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text())


async def test_operator_follows_real_rollout(controller: RunningController, fleet: SimAgents, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    rc = controller
    add_user(rc.ctx.store, "olga", "operator", PASSWORD)
    script = Script(delays={"build-from-source": 1.2}, default_delay=0.9,
                    fail={(FAILING, k): CUDA_MISMATCH for k in KINDS})
    for host, profile in NODES:
        runner = SimRunner(host, script, tmp_path / "work" / host)
        sim = await fleet.start(host, profile, runner=runner)
        runner.agent = sim.agent
    base = rc.ctx.http_url
    assert base is not None
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {rc.ctx.admin_token}"}) as api:
        r = await api.post("/api/v1/rollouts", json={"batch": "1,1,2", "max_failures": "60%", "canary": 0,
                                                     "actor": "tester"})
        assert r.status_code == 200, r.text
        body = r.json()
        rid = body.get("id") or body.get("rollout", {}).get("id")
        assert rid, body

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.goto(f"{base}/rollouts/{rid}")
            assert "/login?next=" in page.url  # unauthenticated: redirected
            await page.fill("input[name=username]", "olga")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{base}/rollouts/{rid}")
            await page.wait_for_selector("#live.on", timeout=10_000)
            await page.evaluate("window.__noReload = 1")
            first = await _text(page, "#progress-text")

            # live progress, then the failed node with its diagnosis, all without a reload
            async def progressed() -> bool:
                return await _text(page, "#progress-text") != first
            try:
                await _until(progressed, 30)
            except AssertionError:
                raise AssertionError(f"no progress: {await api_status(base, rc, rid)}") from None
            await page.wait_for_selector(f"#failures .diag[data-host='{FAILING}']", timeout=30_000)
            assert await page.evaluate("window.__noReload") == 1
            failure = await _text(page, f"#failures .diag[data-host='{FAILING}']")
            assert "nvcc_torch_cuda_major_mismatch" in failure, failure

            # pause while batches remain
            assert (await _text(page, "#rollout-status")).strip() == "running"
            await page.click("button[data-action=pause]")
            await page.wait_for_selector("#flash")
            assert "pause requested by user:olga" in await _text(page, "#flash")
            await page.wait_for_selector("#rollout-status .st-paused", timeout=10_000)
            assert (await api_status(base, rc, rid))["status"] == "paused"
            assert await page.locator("button[data-action=resume]").is_enabled()

            await page.click(f"#failures .diag[data-host='{FAILING}'] a")
            await page.wait_for_url(f"{base}/nodes/{FAILING}")
            diag = await _text(page, "#diagnosis")
            assert "Diagnosis: nvcc_torch_cuda_major_mismatch" in diag and "What to do" in diag
            assert "simulated" in await _text(page, "h1")
            await page.close()
        finally:
            await browser.close()


async def _until(cond: Any, seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        await asyncio.sleep(0.2)


async def api_status(base: str, rc: Any, rid: str) -> Any:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {rc.ctx.admin_token}"}) as api:
        return (await api.get(f"/api/v1/rollouts/{rid}")).json()
