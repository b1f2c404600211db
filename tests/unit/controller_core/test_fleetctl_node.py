"""``fleetctl node HOST`` against a real controller (SQLite, real HTTP socket) when the stored facts do not parse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from fleetctl.controller.app import start_controller
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.store.models import Node
from tests.unit.controller_core.util import add_identity, facts


async def test_node_with_unreadable_facts_prints_why_instead_of_crashing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    running = await start_controller(ControllerSettings(
        state_dir=tmp_path / "c", grpc_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0"))
    try:
        ctx = running.ctx
        ctx.registry.report_facts(add_identity(ctx.store, "old"), facts("old"))
        with ctx.store.session() as s:  # a row written by an older version: python was a bare string then
            row = s.scalars(select(Node).where(Node.hostname == "old")).one()
            row.facts = {**row.facts, "python": "3.10"}
        rc = await asyncio.to_thread(fleetctl, ["node", "old", "--state-dir", str(ctx.settings.state_dir)])
    finally:
        await running.stop(grace=0.2)
    out, err = capsys.readouterr()
    assert rc == 0, err
    facts_line = next(line for line in out.splitlines() if line.startswith("  facts "))
    assert "unreadable" in facts_line and "python" in facts_line and "next facts report" in facts_line
    assert "  status      online" in out and "facts history (newest first):" in out and "\nverification:" in out
    assert "attention: unavailable (node old has no readable facts" in out  # the other sections still print
