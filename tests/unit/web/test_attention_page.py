"""The dashboard's attention table (/attention) and the node page's recommendation, rendered from the real
controller with the real H200 FA4 verification replayed on one node (the fleet of tests/unit/attention)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from fleetctl.controller.testing import FleetThread
from fleetctl.controller.web import create_standalone_app
from tests.unit.attention.test_attention_api import H100, H100_PRIOR, H200, L40S, OLD_TORCH, TORCH, fleet
from tests.unit.web.test_dashboard import login

__all__ = ["fleet"]  # the module-scoped fleet fixture, shared with the API tests


@pytest.fixture(scope="module")
def viewer(fleet: FleetThread) -> Iterator[TestClient]:
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        assert login(c, "vic").status_code == 303
        yield c


def text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def section(page: str, gpu: str, torch: str) -> str:
    m = re.search(rf'<section class="card" data-gpu="{re.escape(gpu)}" data-torch="{re.escape(torch)}">(.*?)</section>',
                  page, re.S)
    assert m is not None, f"no section for {gpu} torch {torch}"
    return m.group(1)


def rows(fragment: str, key: str) -> dict[str, list[str]]:
    """{data-KEY: [cell texts]} of the table rows in ``fragment``."""
    return {m.group(1): [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", m.group(2), re.S)]
            for m in re.finditer(rf'<tr data-{key}="([^"]+)"[^>]*>(.*?)</tr>', fragment, re.S)}


def test_the_page_needs_a_login_and_is_in_the_nav(fleet: FleetThread, viewer: TestClient) -> None:
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as anonymous:
        r = anonymous.get("/attention", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert '<a href="/attention" class="">Attention</a>' in viewer.get("/nodes").text


def test_the_table_shows_every_implementation_the_recommended_one_and_the_slower_nodes(viewer: TestClient) -> None:
    r = viewer.get("/attention", params={"workload": "prefill"})
    assert r.status_code == 200
    page = r.text
    assert '<a href="/attention" class="on">Attention</a>' in page
    assert "prefill: forward, bfloat16, head dim 128, causal, seqlen ≥ 4096" in text(page)

    h200 = section(page, H200, TORCH)
    assert "2 nodes" in text(h200)
    table = rows(h200, "impl")
    assert list(table) == ["fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]  # ranked, fastest first
    # implementation, median, measured by, install, version, excluded
    assert table["fa4"][:2] == ["fa4 recommended", "626"]
    assert table["fa4"][2].startswith("fleet (h200-fa4), 2026-12-02")
    assert "installed on 1 of 2 nodes" in table["fa4"][3] and table["fa4"][4] == "4.0.0b36"
    assert table["sdpa_cudnn"][:2] == ["sdpa_cudnn", "585"]
    assert table["sdpa_cudnn"][3] == "nothing to install (ships with torch)"
    assert [table[i][1] for i in ("sdpa_flash", "sdpa_efficient")] == ["282", "158"]
    said = text(h200)
    assert "Use fa4 : +7 % over sdpa_cudnn ." in said
    assert 'attn_implementation="flash_attention_4" ; from flash_attn.cute import flash_attn_func' in said
    assert "1 of 2 nodes runs something slower than their best: h200-bare" in said
    assert '<a href="/nodes/h200-bare">h200-bare</a>' in h200

    h100 = section(page, H100, TORCH)
    table = rows(h100, "impl")
    assert table["sdpa_cudnn"][:2] == ["sdpa_cudnn recommended", "588"]
    assert table["sdpa_cudnn"][2] == f"prior {H100_PRIOR}, 2026-11-25"
    assert table["fa2"][1] == "322"
    assert "+83 % over fa2" in text(h100) and "1 of 1 node runs something slower" in text(h100)

    old = section(page, H200, OLD_TORCH)  # another torch: the prior, with the caveat
    assert f"was measured with torch {TORCH}" in text(old)

    l40s = re.search(rf'<section class="card" data-gpu="{L40S}".*?</section>', page, re.S)
    assert l40s is not None and "No recommendation: no prefill" in text(l40s.group(0))
    assert f"run `fleetctl verify --nodes 'gpu={L40S}'`" in text(l40s.group(0)) and "<table" not in l40s.group(0)


def test_the_workload_is_chosen_by_the_query(viewer: TestClient) -> None:
    training = rows(section(viewer.get("/attention?workload=training").text, H200, TORCH), "impl")
    assert training["fa4"][:2] == ["fa4 recommended", "523"]
    assert training["sdpa_cudnn"][1] == "473"
    decode = text(section(viewer.get("/attention?workload=decode").text, H200, TORCH))
    assert "Use sdpa : +33 % over eager" in decode
    # an unknown workload shows the default rather than an error page: the page only links the known ones
    assert "seqlen ≥ 4096" in text(viewer.get("/attention?workload=nonsense").text)


def test_the_node_page_shows_the_nodes_recommendation(viewer: TestClient) -> None:
    own = rows(viewer.get("/nodes/h200-fa4").text, "workload")
    # workload, recommended, margin, measured by, install, setting, running now
    assert own["prefill"][:4] == ["prefill", "fa4 626 TFLOP/s", "+7 % over sdpa_cudnn", "node: h200-fa4"]
    assert own["prefill"][4].startswith("already installed") and own["prefill"][6] == "fa4"
    assert own["training"][1] == "fa4 523 TFLOP/s"
    bare = rows(viewer.get("/nodes/h200-bare").text, "workload")
    assert bare["prefill"][3] == "fleet: h200-fa4" and bare["prefill"][6] == "sdpa_flash (slower)"
    l40s = rows(viewer.get("/nodes/sim-l40s").text, "workload")
    assert l40s["prefill"][1].startswith("no recommendation: no prefill")
