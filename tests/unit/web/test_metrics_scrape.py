"""/metrics for Prometheus (issue 18, observability): a ``metrics`` user's API token scrapes and can read nothing
else; the exposition parses with prometheus_client's own parser, has one series per node (label ``hostname``), and
follows Prometheus' naming and type conventions (no ``quantile`` label on a gauge, ``gpu_model`` never ``gpu``).
A real controller (FakeFleet: store, registry, job dispatcher, rollout engine) with fake agents, its whole HTTP app."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.api import create_app
from fleetctl.controller.api_tokens import create_token
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import FleetThread
from fleetctl.controller.web.auth import add_user, authenticate
from tests.unit.web.test_dashboard import record_verifications

PASSWORD = "correct horse battery"
HOSTS = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    with FleetThread(state_dir=tmp_path_factory.mktemp("controller")) as ft:
        facts = [load_profile(p, f"node-{i}") for i, p in enumerate(("h100", "a100", "h100", "l4", "t4"))]
        hosts = ft.call(ft.fleet.add_nodes(facts))
        ft.call(ft.fleet.set_offline(hosts[4]))
        record_verifications(ft.fleet.ctx.store, hosts[:3], days=1, broken=(hosts[2],))
        add_user(ft.fleet.ctx.store, "prometheus", "metrics", PASSWORD)
        yield ft


@pytest.fixture(scope="module")
def scrape_token(fleet: FleetThread) -> str:
    return create_token(fleet.fleet.ctx.store, "prometheus", dt.timedelta(hours=1))[0]


@pytest.fixture(scope="module")
def client(fleet: FleetThread) -> Iterator[TestClient]:
    with TestClient(create_app(fleet.fleet.ctx)) as c:
        yield c


@pytest.fixture(scope="module")
def exposition(client: TestClient, scrape_token: str) -> str:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {scrape_token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    text: str = r.text
    return text


def samples(text: str, family: str) -> list[Sample]:
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def test_metrics_token_scrapes_and_nothing_else(client: TestClient, scrape_token: str) -> None:
    auth = {"Authorization": f"Bearer {scrape_token}"}
    assert client.get("/metrics", headers=auth).status_code == 200
    refused = client.get("/api/v1/nodes", headers=auth)
    assert refused.status_code == 403
    assert "metrics role" in refused.text
    assert client.get("/ui/api/nodes", headers=auth).status_code == 401  # the dashboard wants a login


def test_metrics_without_or_with_a_wrong_token_is_401(client: TestClient, fleet: FleetThread) -> None:
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer fleetu_" + "x" * 43})
    assert wrong.status_code == 401 and "missing or wrong API token" in wrong.json()["message"]
    assert client.get("/metrics", headers={"Authorization": f"Bearer {fleet.fleet.ctx.admin_token}"}
                      ).status_code == 200


def test_metrics_user_cannot_log_in(fleet: FleetThread) -> None:
    with fleet.fleet.ctx.store.session() as s:
        assert authenticate(s, "prometheus", PASSWORD) is None


def test_per_node_series(exposition: str) -> None:
    info = {s.labels["hostname"]: s for s in samples(exposition, "fleet_node_info")}
    assert sorted(info) == [f"node-{i}" for i in range(HOSTS)]  # one series per node
    assert info["node-0"].labels["gpu_model"].startswith("NVIDIA H100") and info["node-0"].value == 1
    assert all("flash_attn_version" in s.labels for s in info.values())  # "" where none is installed
    assert all(s.labels["agent_version"] == "" for s in info.values())  # fake agents report no version
    status = {s.labels["hostname"]: s.labels["status"] for s in samples(exposition, "fleet_node_status")}
    assert status["node-4"] == "offline" and status["node-0"] == "online" and len(status) == HOSTS
    passed = {s.labels["hostname"]: s.value for s in samples(exposition, "fleet_node_verification_passed")}
    assert passed == {"node-0": 1.0, "node-1": 1.0, "node-2": 0.0}  # node-2's latest verification failed
    now = dt.datetime.now(dt.UTC).timestamp()
    verified = samples(exposition, "fleet_node_verification_timestamp_seconds")
    assert len(verified) == 3 and all(now - 86400 < s.value <= now for s in verified)
    heartbeats = samples(exposition, "fleet_node_last_heartbeat_timestamp_seconds")
    assert len(heartbeats) >= HOSTS - 1 and all(now - 3600 < s.value <= now + 5 for s in heartbeats)
    year = 365 * 86400  # agent certificates are signed at enrollment for a year; the CA for ten
    certs = samples(exposition, "fleet_node_agent_cert_expiry_timestamp_seconds")
    assert len(certs) == HOSTS and all(now + year - 3600 < s.value <= now + year for s in certs)
    (ca,) = samples(exposition, "fleet_controller_ca_cert_expiry_timestamp_seconds")
    assert now + 9 * year < ca.value <= now + 10 * year + 3 * 86400
    slower = {s.labels["hostname"]: s for s in samples(exposition, "fleet_node_attention_slower_than_best")}
    assert sorted(slower) == sorted(info) and {s.labels["workload"] for s in slower.values()} == {"prefill"}
    recommended = samples(exposition, "fleet_attention_recommended_info")
    h100 = [s for s in recommended if s.labels["gpu_model"] == info["node-0"].labels["gpu_model"]]
    assert len(h100) == 1 and h100[0].labels["implementation"] and h100[0].value == 1
    jobs = {s.labels["status"]: s.value for s in samples(exposition, "fleet_jobs")}
    assert "pending" in jobs and "running" in jobs
    rollouts = {s.labels["status"]: s.value for s in samples(exposition, "fleet_rollouts")}
    assert rollouts["paused"] == 0


def test_names_and_types_follow_prometheus_conventions(exposition: str) -> None:
    families = list(text_string_to_metric_families(exposition))
    assert families
    for family in families:
        labels = {name for s in family.samples for name in s.labels}
        assert "gpu" not in labels, family.name  # DCGM's label for the GPU index
        if family.type == "gauge":
            assert "quantile" not in labels, family.name
        if family.name.endswith("_info"):
            assert family.type == "gauge" and {s.value for s in family.samples} <= {1.0}
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert family.name.startswith("fleet_"), family.name


def test_promtool_check_metrics(exposition: str, tmp_path: Path) -> None:
    """``promtool check metrics`` (Prometheus' own linter) finds nothing to say about the real exposition."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/bootstrap installs it as root)")
    proc = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_controller_self_metrics(client: TestClient, scrape_token: str, fleet: FleetThread) -> None:
    """HTTP latency by route template (bounded: never the filled-in path) and the store's call latency."""
    auth = {"Authorization": f"Bearer {scrape_token}"}
    client.get("/api/v1/nodes/node-0", headers=auth)  # 403: counted under its template
    fleet.call(fleet.fleet.ctx.store.call(lambda: None))
    text = client.get("/metrics", headers=auth).text
    http = samples(text, "fleet_controller_http_request_duration_seconds")
    counts = {(s.labels["method"], s.labels["route"], s.labels["code"]): s.value for s in http
              if s.name.endswith("_count")}
    assert counts[("GET", "/api/v1/nodes/{hostname}", "403")] >= 1
    assert counts[("GET", "/metrics", "200")] >= 1
    assert not any("node-0" in route for _, route, _ in counts)
    db = [s for s in samples(text, "fleet_controller_db_call_duration_seconds") if s.name.endswith("_count")]
    assert db and db[0].value >= 1
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["fleet_controller_grpc_request_duration_seconds"] == "histogram"


ROOT = Path(__file__).resolve().parents[3]
ALERTS = ROOT / "docs" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "fixtures" / "alerts" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
HISTOGRAM_SERIES = re.compile(r"_(bucket|count|sum)$")


def metric_names(expr: str) -> set[str]:
    """The fleet metric families a PromQL expression reads (a histogram's ``_bucket``/``_count``/``_sum`` series
    name their family)."""
    return {HISTOGRAM_SERIES.sub("", name) for name in re.findall(r"\bfleet_[a-z0-9_]+", expr)}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alerts_and_dashboard_read_only_exported_metrics(exposition: str) -> None:
    exported = {f.name for f in text_string_to_metric_families(exposition)}
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"FleetNodeDegraded", "FleetVerificationRegression", "FleetRolloutPaused",
                                            "FleetAgentOffline", "FleetAgentCertExpiring", "FleetCACertExpiring"}
    for expr in [r["expr"] for r in rules] + dashboard_exprs():
        names = metric_names(expr)
        assert names and names <= exported, (expr, names - exported)
    assert {n for e in dashboard_exprs() for n in metric_names(e)} >= {
        "fleet_node_info", "fleet_controller_grpc_request_duration_seconds",
        "fleet_controller_http_request_duration_seconds", "fleet_controller_db_call_duration_seconds",
        "fleet_jobs", "fleet_job_duration_seconds", "fleet_rollout_step_duration_seconds"}


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    """``promtool check rules`` on docs/alerts.yml and ``promtool test rules`` on its unit tests (two alerts fire
    and stay quiet when they should; tests/fixtures/alerts/alerts_test.yml)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/bootstrap installs it as root)")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "SUCCESS: 6 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_cli_adds_a_metrics_user_without_a_password(tmp_path: Path) -> None:
    """``fleet-controller user add NAME --role metrics`` asks no password (stdin is not a terminal here, which
    refuses any other role) and says how to make Prometheus' token; that token then scrapes."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "user", "--state-dir", str(tmp_path),
                               *args],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    refused = cli("add", "vic", "--role", "viewer")
    assert refused.returncode != 0 and "--password-stdin" in refused.stderr
    added = cli("add", "prometheus", "--role", "metrics")
    assert added.returncode == 0, added.stderr
    assert "user token create prometheus" in added.stdout
    listed = cli("list", "--json")
    assert listed.returncode == 0 and "prometheus" in listed.stdout and "metrics" in listed.stdout


def step_counts(text: str) -> dict[str, float]:
    return {s.labels["kind"]: s.value for s in samples(text, "fleet_rollout_step_duration_seconds")
            if s.name.endswith("_count")}


def test_rollout_step_durations_by_kind(tmp_path: Path) -> None:
    """Each step a rollout runs on a node (install, verify) is timed when the node moves on, by job kind."""
    with FleetThread(state_dir=tmp_path / "controller") as ft:
        hosts = ft.call(ft.fleet.add_nodes([load_profile("h100", f"step-{i}") for i in range(2)]))
        with TestClient(create_app(ft.fleet.ctx)) as c:
            auth = {"Authorization": f"Bearer {ft.fleet.ctx.admin_token}"}
            before = step_counts(c.get("/metrics", headers=auth).text)  # process-wide: other tests' rollouts too
            rid = ft.call(ft.fleet.start_rollout(RolloutRequest(nodes=",".join(hosts), actor="user:demo")))
            ft.call(ft.fleet.start_engine())
            assert ft.call(ft.fleet.wait_rollout(rid, "succeeded"))["status"] == "succeeded"
            after = step_counts(c.get("/metrics", headers=auth).text)
    grew = {kind: after[kind] - before.get(kind, 0.0) for kind in after}
    assert grew.get("install-wheel") == 2 and grew.get("verify") == 2, grew
