"""GET /api/v1/attention/nodes/HOST and /api/v1/attention/report over the real controller (SQLite store, fake
agents at the job seam, controller/testing.py); the measured node replays the real H200 FA4 verification of
tests/fixtures/h200_fa4_e2e through a verify job, so the controller judges and stores it as a real node's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.api import create_app
from fleetctl.controller.api_tokens import create_token
from fleetctl.controller.testing import FleetThread, JobScript
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.facts import NodeFacts, parse_node
from fleetctl.fleet.verification import VerificationResult, parse_result

FIX = Path(__file__).resolve().parents[2] / "fixtures"
H200_VERIFY_JOB = FIX / "h200_fa4_e2e" / "jobs" / "eff4c8d0c3c9471384bb02b2a3eade5f.json"  # full, FA4 4.0.0b36
H200, H100, L40S = "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA L40S"
TORCH, OLD_TORCH = "2.11.0+cu130", "2.9.1+cu128"
PASSWORD = "correct horse battery"
# the fixture's prefill figures (fwd, bf16, hd128, causal, seqlen ≥ 4096; median TFLOP/s): FA4 beats cuDNN by 7 %
FA4_PREFILL, CUDNN_PREFILL = 626.1, 584.8
# the built-in prior's H100 prefill (tests/fixtures/h100/verify_full_fa2.json): cuDNN 588, FA2 322
H100_PRIOR = "tests/fixtures/h100/verify_full_fa2.json"
H200_PRIOR = "tests/fixtures/h200_fa4/verify_full_fa4.json"


def facts_of(rel: str, hostname: str) -> NodeFacts:
    return replace(parse_node(json.loads((FIX / rel).read_text())), hostname=hostname)


def h200_verification() -> VerificationResult:
    return parse_result(json.loads(H200_VERIFY_JOB.read_text())["result"]["verification"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """h200-fa4 (FA4 installed, verified: its own measurements), h200-bare (no FlashAttention, unverified: the
    fleet's), h200-oldtorch (another torch: neither its own nor the fleet's apply, the prior does), h100-fa2
    (FA2 installed, unverified: the prior) and sim-l40s (no prior for its GPU)."""
    with FleetThread(state_dir=tmp_path_factory.mktemp("attention") / "controller") as ft:
        fa4 = facts_of("h200_fa4_e2e/facts.json", "h200-fa4")
        old = replace(fa4, hostname="h200-oldtorch", flash_attn=None,
                      torch=replace(fa4.torch, version=OLD_TORCH) if fa4.torch else None)
        nodes = [fa4, replace(fa4, hostname="h200-bare", flash_attn=None), old,
                 facts_of("h100_e2e/facts.json", "h100-fa2"), load_profile("l40s", "sim-l40s")]
        ft.call(ft.fleet.add_nodes(nodes))
        ft.fleet.script("h200-fa4", "verify", JobScript(result=h200_verification()))
        ft.call(ft.fleet.verify(["h200-fa4"], mode="full"))
        store = ft.fleet.ctx.store
        add_user(store, "vic", "viewer", PASSWORD)
        yield ft


@pytest.fixture(scope="module")
def client(fleet: FleetThread) -> Iterator[TestClient]:
    token, _ = create_token(fleet.fleet.ctx.store, "vic")
    with TestClient(create_app(fleet.fleet.ctx), headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def get(c: TestClient, path: str, **params: str) -> dict[str, Any]:
    r = c.get(f"/api/v1{path}", params=params)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def rec(c: TestClient, host: str, workload: str) -> dict[str, Any]:
    data = get(c, f"/attention/nodes/{host}", workload=workload)
    [one] = data["recommendations"]
    assert one["workload"] == workload
    out: dict[str, Any] = one
    return out


@pytest.mark.parametrize("path", ["/api/v1/attention/nodes/h200-fa4", "/api/v1/attention/report"])
def test_no_token_is_401(fleet: FleetThread, path: str) -> None:
    with TestClient(create_app(fleet.fleet.ctx)) as c:
        r = c.get(path)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth" and "token" in r.json()["error"]["hint"]


def test_a_viewer_token_reads_both(client: TestClient) -> None:
    node = get(client, "/attention/nodes/h200-fa4")
    assert [r["workload"] for r in node["recommendations"]] == ["training", "prefill", "decode", "decode-kernel"]
    assert node["running"] == {"training": "fa4", "prefill": "fa4", "decode": "sdpa", "decode-kernel": "fa4"}
    assert get(client, "/attention/report")["workload"] == "prefill"


def test_unknown_host_is_404_and_says_what_to_do(client: TestClient) -> None:
    r = client.get("/api/v1/attention/nodes/nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not-found" and "nope" in err["message"] and "fleetctl nodes" in err["hint"]


def test_unknown_workload_is_refused_with_the_choices(client: TestClient) -> None:
    r = client.get("/api/v1/attention/report", params={"workload": "inference"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad-input"
    assert "training, prefill, decode, decode-kernel" in r.json()["error"]["hint"]


def test_a_node_with_its_own_fa4_and_sdpa_measurements_gets_fa4_for_prefill_with_the_margin(
        client: TestClient) -> None:
    r = rec(client, "h200-fa4", "prefill")
    choice = r["choice"]
    assert (choice["impl"], r["runner_up"]) == ("fa4", "sdpa_cudnn")
    assert choice["value"] == pytest.approx(FA4_PREFILL, abs=0.1)
    assert r["margin"] == pytest.approx(FA4_PREFILL / CUDNN_PREFILL - 1, abs=0.001)
    assert choice["source"]["kind"] == "node" and choice["source"]["origin"] == "h200-fa4"
    assert choice["version"] == "4.0.0b36"
    assert choice["install"]["kind"] == "installed"
    assert choice["setting"]["transformers"] == "flash_attention_4"
    assert "flash_attn.cute" in choice["setting"]["code"]
    values = {c["impl"]: c["value"] for c in r["candidates"]}
    assert values["sdpa_cudnn"] == pytest.approx(CUDNN_PREFILL, abs=0.1)
    assert values["sdpa_flash"] < values["sdpa_cudnn"]


def test_a_bare_node_gets_the_fleets_measurements_of_its_gpu_and_torch(client: TestClient) -> None:
    r = rec(client, "h200-bare", "prefill")
    fa4 = next(c for c in r["candidates"] if c["impl"] == "fa4")
    assert fa4["source"]["kind"] == "fleet" and fa4["source"]["origin"] == "h200-fa4"
    assert fa4["value"] == pytest.approx(FA4_PREFILL, abs=0.1)
    assert fa4["install"]["kind"] != "installed"


@pytest.mark.parametrize(("host", "choice", "origin", "value"), [
    ("h100-fa2", "sdpa_cudnn", H100_PRIOR, 588.2),
    ("h200-oldtorch", "fa4", H200_PRIOR, None),
])
def test_a_node_without_measurements_gets_the_prior_with_its_source(
        client: TestClient, host: str, choice: str, origin: str, value: float | None) -> None:
    r = rec(client, host, "prefill")
    candidates = {c["impl"]: c for c in r["candidates"]}
    assert candidates[choice]["source"]["kind"] == "prior"
    assert candidates[choice]["source"]["origin"] == origin
    assert candidates[choice]["source"]["measured_at"] is not None
    if value is not None:
        assert r["choice"]["impl"] == choice and r["choice"]["value"] == pytest.approx(value, abs=0.1)


def test_the_prior_of_another_torch_says_so(client: TestClient) -> None:
    r = rec(client, "h200-oldtorch", "prefill")
    assert any(f"was measured with torch {TORCH}" in n and OLD_TORCH in n for n in r["notes"])


def test_another_gpu_gets_no_recommendation_until_verified(client: TestClient) -> None:
    for r in get(client, "/attention/nodes/sim-l40s")["recommendations"]:
        assert r["choice"] is None and r["candidates"] == []
        assert "run `fleetctl verify sim-l40s`" in r["notes"][0]


def test_the_report_groups_by_gpu_model_and_torch_and_counts_the_slower_nodes(client: TestClient) -> None:
    data = get(client, "/attention/report", workload="prefill")
    groups = {(g["gpu_model"], g["torch"]): g for g in data["groups"]}
    l40s_torch = next(t for (gpu, t) in groups if gpu == L40S)
    assert list(groups) == [(H100, TORCH), (H200, TORCH), (H200, OLD_TORCH), (L40S, l40s_torch)]

    h200 = groups[(H200, TORCH)]
    assert h200["nodes"] == 2 and h200["recommended"] == "fa4" and h200["runner_up"] == "sdpa_cudnn"
    assert h200["margin"] == pytest.approx(FA4_PREFILL / CUDNN_PREFILL - 1, abs=0.001)
    # h200-fa4 runs its best; h200-bare runs SDPA's default (flash backend, 282 TFLOP/s)
    assert (h200["slower_than_best"], h200["slower_hosts"]) == (1, ["h200-bare"])
    assert h200["setting"]["transformers"] == "flash_attention_4"
    impls = {i["impl"]: i for i in h200["implementations"]}
    assert set(impls) == {"fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"}
    assert impls["fa4"]["median"] == pytest.approx(FA4_PREFILL, abs=0.1)
    assert "installed on 1 of 2 nodes" in impls["fa4"]["install"]["text"]
    assert impls["sdpa_cudnn"]["install"]["kind"] == "none"

    h100 = groups[(H100, TORCH)]  # FA2 installed, the prior says cuDNN is ~1.8x faster
    assert (h100["recommended"], h100["slower_hosts"]) == ("sdpa_cudnn", ["h100-fa2"])
    assert "prior" in {i["impl"]: i for i in h100["implementations"]}["sdpa_cudnn"]["source"]

    l40s = groups[(L40S, l40s_torch)]
    assert (l40s["recommended"], l40s["slower_than_best"], l40s["implementations"]) == (None, 0, [])


def test_the_report_takes_a_node_selector(client: TestClient) -> None:
    data = get(client, "/attention/report", nodes="h200-fa4,h100-fa2", workload="training")
    assert data["selector"] == "h200-fa4,h100-fa2"
    assert [(g["gpu_model"], g["nodes"]) for g in data["groups"]] == [(H100, 1), (H200, 1)]
    h200 = data["groups"][1]
    assert (h200["workload"], h200["recommended"], h200["slower_than_best"]) == ("training", "fa4", 0)
