"""Regenerate docs/screenshots/*.png: one PNG of each dashboard page, in headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

The data is a simulated fleet (controller.testing: a real controller with 60 fake agents, labelled ``simulated``):
verifications recorded by the controller, a rollout driven by the real engine and paused half-way, one node
failing its first step with a diagnosed CUDA mismatch.

    .venv/bin/python scripts/screenshots.py --from-db tests/fixtures/h100_e2e/controller.db.gz --prefix h100-e2e-

shows a real controller's database instead (a copy of it; ``.gz`` is unpacked): the overview, every node's page
and every rollout's page, named PREFIX + overview / node-HOST / rollout-ID.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

from fleetctl.agent.profiles import load_profile  # noqa: E402
from fleetctl.controller.rollout import service  # noqa: E402
from fleetctl.controller.rollout.service import RolloutRequest  # noqa: E402
from fleetctl.controller.store.db import open_store  # noqa: E402
from fleetctl.controller.testing import CUDA_MISMATCH_LOG, FleetThread, JobScript, ThreadServer, usual_figures  # noqa: E402
from fleetctl.controller.web import create_standalone_app  # noqa: E402
from fleetctl.controller.web.auth import add_user  # noqa: E402
from fleetctl.fleet.errors import ConflictError  # noqa: E402
from tests.integration.web.browser import chromium, missing_reason  # noqa: E402

PASSWORD = "screenshot-pass"
PROFILES = ("h100", "a100", "l40s", "t4", "rtx4090", "a10", "l4", "h200", "apt-nopubkey", "no-toolkit")


def _schedules(store: Any, jobs: dict[str, str]) -> None:
    """Two re-verification schedules, the first with a run whose jobs are the last verifications."""
    import datetime as dt

    from fleetctl.controller.store.db import utcnow
    from fleetctl.controller.verify_store import schedules
    nightly = schedules.add_schedule(store, "0 3 * * *", "all", mode="quick", actor="user:olga")
    schedules.add_schedule(store, "30 4 * * 0", "gpu=*H100*", mode="full", actor="user:olga")
    run = schedules.claim(store, nightly["id"], utcnow() - dt.timedelta(hours=2), "screenshots")
    if run is not None:
        schedules.set_run_jobs(store, run, jobs, None)


def _simulated_fleet(ft: FleetThread) -> tuple[list[str], str]:
    """60 simulated nodes, their verifications and a rollout paused half-way; (hostnames, rollout id)."""
    fleet = ft.fleet
    hosts = ft.call(fleet.add_nodes(load_profile(PROFILES[i % len(PROFILES)], f"sim-gpu-{i:05d}")
                                    for i in range(60)))
    failing, slow = hosts[4], hosts[23]
    facts = load_profile(PROFILES[4], failing)  # a driver upgrade in its facts history
    if facts.driver is not None:
        ft.call(fleet.change_facts(failing, dataclasses.replace(
            facts, driver=dataclasses.replace(facts.driver, version="560.35.05"))))
    slow_facts = load_profile(PROFILES[23 % len(PROFILES)], slow)
    slow_gpu = slow_facts.gpus[0].name if slow_facts.gpus else None
    jobs: dict[str, str] = {}
    for round_ in range(4):  # the last two rounds of one node 40 % slower: a regression against its GPU model
        if round_ == 2:
            fleet.script(slow, "verify", JobScript(figures=usual_figures(slow_gpu).scaled(0.6)))
        jobs = ft.call(fleet.verify(hosts[20:]))
    for step in ("build-from-source", "install-wheel"):
        fleet.script(failing, step, JobScript(seconds=0.2, error=f"{step} failed (rc 2)", log=CUDA_MISMATCH_LOG))
    fleet.default_seconds = 0.2
    rid = ft.call(fleet.start_rollout(RolloutRequest(nodes=",".join(hosts[:20]), batch="4", max_failures="3",
                                                     actor="user:olga")))
    ft.call(fleet.start_engine())
    ft.call(fleet.wait_rollout(rid, "paused", until=lambda st: sum(n["state"] == "done" for n in st["nodes"]) >= 8))
    with contextlib.suppress(ConflictError):  # the engine may have paused it already (a failed canary)
        service.pause(fleet.ctx.store, rid, "user:olga")
    _schedules(fleet.ctx.store, jobs)
    return hosts, rid


def _attention_nodes(ft: FleetThread) -> None:
    """Two nodes with the real H200's facts (tests/fixtures/h200_fa4_e2e): one with FA4 and its real full
    verification replayed through a verify job, one without FlashAttention — the attention page's H200 table
    (the other nodes' simulated figures are no causal prefill shapes: their classes show the prior or none)."""
    import json

    from fleetctl.fleet.facts import parse_node
    from fleetctl.fleet.verification import parse_result
    fixture = ROOT / "tests" / "fixtures" / "h200_fa4_e2e"
    facts = parse_node(json.loads((fixture / "facts.json").read_text()))
    job = json.loads((fixture / "jobs" / "eff4c8d0c3c9471384bb02b2a3eade5f.json").read_text())
    ft.call(ft.fleet.add_nodes([dataclasses.replace(facts, hostname="h200-fa4"),
                                dataclasses.replace(facts, hostname="h200-nofa", flash_attn=None)]))
    ft.fleet.script("h200-fa4", "verify", JobScript(result=parse_result(job["result"]["verification"])))
    ft.call(ft.fleet.verify(["h200-fa4"], mode="full"))


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
    with FleetThread(state_dir=tmp / "controller") as ft:
        add_user(ft.fleet.ctx.store, "olga", "operator", PASSWORD)
        hosts, rid = _simulated_fleet(ft)
        _attention_nodes(ft)
        shots = [("overview", "/"), ("nodes", "/nodes"), ("node", f"/nodes/{hosts[4]}"),
                 ("node-verification", f"/nodes/{hosts[23]}"), ("rollouts", "/rollouts"),
                 ("rollout", f"/rollouts/{rid}"), ("schedules", "/schedules"), ("attention", "/attention")]
        _shoot(ft.fleet.ctx, args.out, [(args.prefix + name, path) for name, path in shots], login_shot="login")
    return 0


def _shoot_db(db: Path, tmp: Path, out: Path, prefix: str) -> int:
    """Screenshots of a copy of a real controller's database: the original is never opened for writing."""
    copy = tmp / "controller.db"
    with (gzip.open(db) if db.suffix == ".gz" else db.open("rb")) as src, copy.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    store = open_store(f"sqlite:///{copy}")
    add_user(store, "olga", "operator", PASSWORD)
    from fleetctl.controller.rollout.models import Rollout
    from fleetctl.controller.store.models import Node
    with store.session() as s:
        hosts = [n.hostname for n in s.query(Node).order_by(Node.hostname)]
        rollouts = [r.id for r in s.query(Rollout).order_by(Rollout.created_at)]
    shots = [(prefix + "overview", "/")] + [(f"{prefix}node-{h}", f"/nodes/{h}") for h in hosts]
    shots += [(f"{prefix}rollout-{r}", f"/rollouts/{r}") for r in rollouts]
    _shoot(types.SimpleNamespace(store=store, state_dir=tmp), out, shots, login_shot=None)
    store.close()
    return 0


def _shoot(ctx: Any, out: Path, shots: list[tuple[str, str]], login_shot: str | None) -> None:
    app = create_standalone_app(ctx)
    with ThreadServer(app) as server, chromium() as browser:
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
            if page.locator("#live").count() and page.get_attribute("body", "data-topic"):  # a live page
                page.wait_for_selector("#live.on", timeout=10_000)
            page.wait_for_timeout(300)
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
