"""The registry's typed NodeRecord and the one node summary, over a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleetctl.controller.api import create_app
from fleetctl.controller.context import ControllerContext
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.node_summary import summarize
from fleetctl.controller.registry import Registry
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import Node
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.facts import parse_node
from tests.unit.controller_core.util import EXAMPLE, add_identity
from tests.unit.web.test_dashboard import PASSWORD, login


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'c.db'}")


def example(hostname: str) -> dict[str, object]:
    node: dict[str, object] = json.loads(EXAMPLE.read_text())["nodes"][0]
    node["hostname"] = hostname
    return node


def test_facts_json_round_trips_through_the_store_into_the_record(store: Store) -> None:
    raw = example("n1")
    ident = add_identity(store, "n1")
    Registry(store).report_facts(ident, parse_node(raw))
    record = Registry(store).record("n1")  # a fresh registry: read back from the database
    assert record.facts == parse_node(json.loads(json.dumps(raw)))
    assert record.facts_error is None and record.status is NodeStatus.ONLINE
    assert record.agent is not None and record.agent.agent_id == ident.agent_id


def test_unreadable_stored_facts_give_a_record_without_facts_and_a_reason(tmp_path: Path) -> None:
    ctx = ControllerContext(ControllerSettings(state_dir=tmp_path / "c"))
    reg = ctx.registry
    reg.report_facts(add_identity(ctx.store, "old"), parse_node(example("old")))
    with ctx.store.session() as s:  # a row written by an older version: python was a bare string then
        row = s.scalars(select(Node).where(Node.hostname == "old")).one()
        row.facts = {**row.facts, "python": "3.10"}
    [record] = reg.records()
    assert record.facts is None
    assert record.facts_error is not None
    assert "python" in record.facts_error and "next facts report" in record.facts_error
    summary = summarize(record)
    assert summary.facts_error == record.facts_error and summary.gpu is None and summary.torch is None
    add_user(ctx.store, "vic", "viewer", PASSWORD)
    with TestClient(create_app(ctx)) as c:
        listed = c.get("/api/v1/nodes", headers={"Authorization": f"Bearer {ctx.admin_token}"}).json()["nodes"]
        assert listed[0]["facts_error"] == record.facts_error
        login(c, "vic")
        page = c.get("/nodes/old")
        assert page.status_code == 200 and "next facts report" in page.text
        assert c.get("/ui/api/nodes").json()["nodes"][0]["hostname"] == "old"
    ctx.close()


SHARED = {  # API key → dashboard node-table key, for every summary field both show
    "hostname": "hostname", "status": "status", "simulated": "simulated", "gpu_model": "gpu",
    "gpu_count": "gpu_count", "compute_capability": "compute_capability", "driver": "driver",
    "cuda_max": "cuda_max", "nvcc": "nvcc", "torch": "torch", "torch_cuda": "torch_cuda", "cxx11abi": "cxx11abi",
    "python": "python", "flash_attn": "fa_version", "flash_attn_variant": "fa_variant",
}


def test_api_cli_and_dashboard_show_the_same_summary(tmp_path: Path) -> None:
    ctx = ControllerContext(ControllerSettings(state_dir=tmp_path / "c"))
    for i, host in enumerate(("a1", "b2")):
        raw = json.loads(EXAMPLE.read_text())["nodes"][i]
        raw["hostname"] = host
        ctx.registry.report_facts(add_identity(ctx.store, host), parse_node(raw))
    add_user(ctx.store, "vic", "viewer", PASSWORD)
    with TestClient(create_app(ctx)) as c:
        auth = {"Authorization": f"Bearer {ctx.admin_token}"}
        api = {n["hostname"]: n for n in c.get("/api/v1/nodes", headers=auth).json()["nodes"]}
        one = c.get("/api/v1/nodes/a1", headers=auth).json()  # `fleetctl node a1` prints this
        login(c, "vic")
        board = {n["hostname"]: n for n in c.get("/ui/api/nodes").json()["nodes"]}
        page = c.get("/nodes/a1").text
    ctx.close()
    assert sorted(api) == sorted(board) == ["a1", "b2"]
    for host in api:
        record = summarize(ctx.registry.record(host))
        assert api[host]["gpu"] == record.gpu and api[host]["gpu_count"] == record.gpu_count >= 1
        for api_key, board_key in SHARED.items():
            assert (api[host][api_key] or "") == (board[host][board_key] or ""), (host, api_key)
    assert {k: one[k] for k in SHARED} == {k: api["a1"][k] for k in SHARED}
    assert str(api["a1"]["gpu_model"]) in page and str(api["a1"]["torch"]) in page
