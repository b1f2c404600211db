"""The regression threshold an operator sets on ``fleet-controller serve`` is the one the controller judges
with: the same slow node is a regression under the default threshold and passes under a looser one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.settings import add_arguments, settings_from
from fleetctl.controller.testing import FakeFleet, JobScript, usual_figures
from fleetctl.controller.verify_store import store as vs

SLOWDOWN = 0.7  # the slow node measures 30 % below the other H100s


async def _slow_node_status(tmp_path: Path, argv: list[str]) -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from(parser.parse_args(argv), {})
    fleet = FakeFleet.create(tmp_path / "controller", settings=settings)
    try:
        peers = await fleet.add_nodes(load_profile("h100", f"h100-{i}") for i in range(4))
        slow = await fleet.add_node(load_profile("h100", "h100-slow"))
        fleet.script(slow, "verify", JobScript(figures=usual_figures("NVIDIA H100 80GB HBM3").scaled(SLOWDOWN)))
        await fleet.verify(peers)  # the fleet baseline first: a node is compared with the others' latest results
        jobs = await fleet.verify([slow])
        with fleet.ctx.store.session() as s:
            return str(vs.get_result(s, jobs[slow])["status"])
    finally:
        await fleet.close()


@pytest.mark.parametrize(("argv", "status"), [
    ([], "regression"),  # default: 15 % below the median regresses
    (["--verify-regression-threshold", "0.5"], "pass"),  # only 50 % below would
])
async def test_threshold_flag_decides_the_regression_verdict(tmp_path: Path, argv: list[str], status: str) -> None:
    assert await _slow_node_status(tmp_path, argv) == status
