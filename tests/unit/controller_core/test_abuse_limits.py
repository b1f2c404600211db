"""Abuse limits (issue 13): log forging through an enrollment hostname, one audit row per refused enrollment,
unbounded enrollment inputs, token buckets, and node text that drives the operator's terminal."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleetctl.controller.ca import CertAuthority
from fleetctl.controller.commands import nodes as nodes_cmd
from fleetctl.controller.commands.table import render
from fleetctl.controller.enrollment import MAX_TOKEN_CHARS, Enrollment
from fleetctl.controller.ratelimit import Rate, RateLimits, source_address
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import AuditLog
from fleetctl.fleet.errors import AuthError, InputError
from fleetctl.fleet.text import SafeLogFormatter, safe_text, terminal_safe

PEER = "ipv4:203.0.113.9:51234"
FORGED = "node-1\n2025-01-01 00:00:00 INFO fleet.audit admin token.create token:x"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'c.db'}")


@pytest.fixture
def enrollment(store: Store, tmp_path: Path) -> Enrollment:
    return Enrollment(store, CertAuthority(tmp_path / "ca"))


def refused_rows(store: Store) -> list[AuditLog]:
    with store.session() as s:
        rows = list(s.scalars(select(AuditLog).where(AuditLog.action == "enroll.refused")))
        for r in rows:
            s.expunge(r)
        return rows


def test_a_newline_in_the_hostname_cannot_forge_a_log_line(enrollment: Enrollment,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for hostname in (FORGED, "node-1\n"):  # "node-1\n" passed the old HOSTNAME_RE ("$" matches before "\n")
        with pytest.raises(InputError, match="not a valid hostname"):
            enrollment.enroll("fleet_whatever", hostname, b"", PEER)
    for rec in caplog.records:
        assert "\n" not in rec.getMessage(), rec.getMessage()


def test_the_log_formatter_keeps_every_message_on_one_line_and_bounded() -> None:
    fmt = SafeLogFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "refused %s", (FORGED + "\x1b[2J" + "A" * 70_000,),
                            None)
    out = fmt.format(rec)
    assert "\n" not in out and "\x1b" not in out
    assert "\\n2025-01-01" in out and "\\x1b[2J" in out
    assert len(out) < 4200 and out.endswith("chars)")


def test_refused_enrollments_write_one_audit_row_per_source_per_minute(enrollment: Enrollment, store: Store) -> None:
    now = [1000.0]
    enrollment.refusals._clock = lambda: now[0]
    for i in range(50):
        with pytest.raises(AuthError, match="wrong token"):
            enrollment.enroll("fleet_wrong", f"node-{i}", b"", f"ipv4:203.0.113.9:{40000 + i}")  # new port each
    assert len(refused_rows(store)) == 1
    with pytest.raises(AuthError):  # another source gets its own row
        enrollment.enroll("fleet_wrong", "node-x", b"", "ipv4:198.51.100.1:5000")
    assert len(refused_rows(store)) == 2
    now[0] += 61
    with pytest.raises(AuthError):
        enrollment.enroll("fleet_wrong", "node-y", b"", PEER)
    rows = [r for r in refused_rows(store) if r.detail.get("source") == "203.0.113.9"]
    assert len(rows) == 2 and rows[-1].detail["coalesced"] == 49  # the row says how many it stands for


def test_enrollment_inputs_are_capped_before_any_work(enrollment: Enrollment, store: Store) -> None:
    with pytest.raises(AuthError, match=f"at most {MAX_TOKEN_CHARS}"):
        enrollment.enroll("fleet_" + "x" * 70_000, "node-1", b"", PEER)
    with pytest.raises(InputError, match="not a valid hostname"):
        enrollment.enroll("fleet_x", "n" * 300, b"", "ipv4:198.51.100.2:1")
    with pytest.raises(InputError, match="CSR of 100000 bytes"):
        enrollment.enroll("fleet_x", "node-1", b"-" * 100_000, "ipv4:198.51.100.3:1")
    with store.session() as s:
        assert s.scalar(select(func.max(func.length(AuditLog.target)))) <= 253


def test_token_buckets_per_source_and_overall() -> None:
    now = [0.0]
    limits = RateLimits(Rate(burst=3, per_second=1), Rate(burst=5, per_second=2), clock=lambda: now[0])
    assert [limits.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.take("a") == pytest.approx(1.0)  # a's bucket is empty: wait one refill
    assert limits.take("b") == 0.0 and limits.take("c") == 0.0
    assert limits.take("d") == pytest.approx(0.5)  # the global bucket is empty: new addresses do not help
    now[0] = 1.0
    assert limits.take("a") == 0.0
    assert limits.refused == 2


def test_source_address_drops_the_port() -> None:
    assert source_address("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert source_address("ipv6:[::1]:51234") == "::1"
    assert source_address("unix:/tmp/x") == "unix:/tmp/x"


def test_safe_text_and_terminal_safe() -> None:
    assert safe_text("a\nb\r\x1b[31m\u202ex") == "a\\nb\\r\\x1b[31m\\u202ex"
    assert safe_text("x" * 10, 4) == "xxxx…(+6 chars)"
    assert terminal_safe("NVIDIA \x1b[2J\x1b]52;c;ZXZpbA==\x07H100\x9b31m\r\n") == "NVIDIA H100  "
    assert terminal_safe("plain A100 (sim)") == "plain A100 (sim)"


def test_tables_strip_control_characters_from_every_cell() -> None:
    out = render([["node-1", "NVIDIA H100\x1b[2J\x1b[H  FAKE", "a\nb"]], ["host", "gpu\x1b[31m", "x"])
    assert "\x1b" not in out and out.count("\n") == 1  # header + one row: no injected line


def test_fleetctl_nodes_and_node_print_no_escape_sequences(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    evil = "NVIDIA H100\x1b]0;pwned\x07\x1b[1A\x1b[2K"
    node = {"hostname": "node-1", "simulated": False, "status": "online", "gpu": evil, "compute_capability": "9.0",
            "driver": "550", "nvcc": "12.4", "torch": "2.4", "python": "3.11\n", "flash_attn": None,
            "last_seen": "2025-01-01T00:00:00", "status_changed_at": "x", "identity": {}, "history": [],
            "status_history": [], "facts": {"gpus": [{"index": 0, "name": evil, "compute_capability": "9.0",
                                                       "memory_mib": 1}], "apt": {"errors": ["E: bad\x1b[31m"]}}}

    class Client:
        def get(self, path: str, **_: Any) -> Any:
            if path == "/nodes":
                return {"nodes": [node]}
            if path.startswith("/rollouts/nodes/"):
                return {"rollouts": []}
            if path.startswith("/verify/nodes/"):
                return {}
            if path.startswith("/attention/"):
                return {"error": "not computed \x1b[31m"}
            return node

    monkeypatch.setattr("fleetctl.controller.commands.nodes.ControllerClient.from_args",
                        staticmethod(lambda _: Client()))
    monkeypatch.setattr("fleetctl.controller.commands.verify.print_node_health", lambda _: None)
    nodes_cmd.handle_nodes(argparse.Namespace(output="table", facts=False, labels=None))
    nodes_cmd.handle_node(argparse.Namespace(output="table", hostname="node-1"))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "NVIDIA H100" in out
