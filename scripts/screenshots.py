"""Regenerate docs/screenshots/*.png: one PNG of each dashboard page, in headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

The data is a simulated fleet (controller.web.sample: 60 nodes, labelled ``simulated``) with a
scripted simulated rollout stopped half-way, one node failing its build with a diagnosed error.

    .venv/bin/python scripts/screenshots.py --from-db tests/fixtures/h100_e2e/controller.db.gz --prefix h100-e2e-

shows a real controller's database instead (a copy of it; ``.gz`` is unpacked): the overview, every node's page
and every rollout's page, named PREFIX + overview / node-HOST / rollout-ID.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
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
    ap.add_argument("--from-db", type=Path, metavar="DB", help="a controller's SQLite database (or DB.gz)")
    ap.add_argument("--prefix", default="", help="file name prefix of the PNGs")
    args = ap.parse_args()
    reason = missing_reason()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dash-shots-"))
    if args.from_db is not None:
        if not args.from_db.is_file():
            print(f"cannot take screenshots: no database at {args.from_db}", file=sys.stderr)
            return 1
        return _shoot_db(args.from_db, tmp, args.out, args.prefix)
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
    shots = [("overview", "/"), ("nodes", "/nodes"), ("node", f"/nodes/{failing}"),
             ("node-verification", f"/nodes/{hosts[23]}"), ("rollouts", "/rollouts"),
             ("rollout", "/rollouts/r-20261125-demo"), ("schedules", "/schedules")]
    _shoot(store, tmp, args.out, [(args.prefix + name, path) for name, path in shots], login_shot="login")
    store.close()
    return 0


def _shoot_db(db: Path, tmp: Path, out: Path, prefix: str) -> int:
    """Screenshots of a copy of a real controller's database: the original is never opened for writing."""
    copy = tmp / "controller.db"
    with (gzip.open(db) if db.suffix == ".gz" else db.open("rb")) as src, copy.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    store = open_store(f"sqlite:///{copy}")
    add_user(store, "olga", "operator", PASSWORD)
    from controller.rollout.models import Rollout
    from controller.store.models import Node
    with store.session() as s:
        hosts = [n.hostname for n in s.query(Node).order_by(Node.hostname)]
        rollouts = [r.id for r in s.query(Rollout).order_by(Rollout.created_at)]
    shots = [(prefix + "overview", "/")] + [(f"{prefix}node-{h}", f"/nodes/{h}") for h in hosts]
    shots += [(f"{prefix}rollout-{r}", f"/rollouts/{r}") for r in rollouts]
    _shoot(store, tmp, out, shots, login_shot=None)
    store.close()
    return 0


def _shoot(store: Any, tmp: Path, out: Path, shots: list[tuple[str, str]], login_shot: str | None) -> None:
    app = create_standalone_app(types.SimpleNamespace(store=store, state_dir=tmp))
    with sample.ThreadServer(app) as server, chromium() as browser:
        ctx = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        page = ctx.new_page()
        page.goto(server.url + "/login")
        page.fill("input[name=username]", "olga")
        if login_shot:
            page.screenshot(path=str(out / f"{login_shot}.png"))
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(server.url + "/")
        for name, path in shots:
            page.goto(server.url + path, wait_until="load")
            if page.locator("#live").count():
                page.wait_for_selector("#live.on", timeout=10_000)
            page.wait_for_timeout(300)
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
