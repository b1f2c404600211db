"""Regenerate docs/screenshots/*.png: one PNG of each dashboard page, in headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

The data is a simulated fleet (controller.web.sample: 60 nodes, labelled ``simulated``) with a
scripted simulated rollout stopped half-way, one node failing its build with a diagnosed error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.store.db import open_store  # noqa: E402
from controller.web import create_standalone_app, sample  # noqa: E402
from controller.web.auth import add_user  # noqa: E402
from tests.integration.web.browser import chromium, missing_reason  # noqa: E402

PASSWORD = "screenshot-pass"


def _schedules(store: Any, verified: list[str]) -> None:
    """Two re-verification schedules, the first with a run whose jobs are the last day's verifications."""
    try:
        from controller.verify_store import schedules
    except ImportError:  # verification storage not in this checkout: the page says so
        return
    import datetime as dt

    from controller.store.db import utcnow
    nightly = schedules.add_schedule(store, "0 3 * * *", "all", mode="quick", actor="user:olga")
    schedules.add_schedule(store, "30 4 * * 0", "gpu=*H100*", mode="full", actor="user:olga")
    run = schedules.claim(store, nightly["id"], utcnow() - dt.timedelta(hours=2), "screenshots")
    if run is not None:
        schedules.set_run_jobs(store, run, {h: f"job-verify-{h}-1" for h in verified}, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = ap.parse_args()
    reason = missing_reason()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dash-shots-"))
    store = open_store(f"sqlite:///{tmp / 'controller.db'}")
    add_user(store, "olga", "operator", PASSWORD)
    hosts = sample.populate(store, 60, seed=3, prefix="sim-gpu")
    failing = hosts[4]
    sample.add_history(store, failing)
    sample.add_verifications(store, hosts[20:], days=10, regress=(hosts[23],))
    rollout = sample.ScriptedRollout(store, hosts[:20], rollout_id="r-20261125-demo", batch=4, fail=(failing,))
    for _ in range(6):
        rollout.tick()
    _schedules(store, hosts[20:])
    app = create_standalone_app(types.SimpleNamespace(store=store, state_dir=tmp))
    shots = [("overview", "/"), ("nodes", "/nodes"), ("node", f"/nodes/{failing}"),
             ("node-verification", f"/nodes/{hosts[23]}"), ("rollouts", "/rollouts"),
             ("rollout", "/rollouts/r-20261125-demo"), ("schedules", "/schedules")]
    with sample.ThreadServer(app) as server, chromium() as browser:
        ctx = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        page = ctx.new_page()
        page.goto(server.url + "/login")
        page.fill("input[name=username]", "olga")
        page.screenshot(path=str(args.out / "login.png"))
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(server.url + "/")
        for name, path in shots:
            page.goto(server.url + path, wait_until="load")
            if page.locator("#live").count():
                page.wait_for_selector("#live.on", timeout=10_000)
            page.wait_for_timeout(300)
            target = args.out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        ctx.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
