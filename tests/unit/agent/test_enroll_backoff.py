"""The agent's pure pieces of enrollment at scale: backoff with jitter, when a certificate is renewed, the CA check,
and JSON log lines."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from fleetctl.agent.client import Backoff, read_ca, renewal_due
from fleetctl.controller.ca import CertAuthority
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.text import SafeLogFormatter


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0)
    waits = [b.next() for _ in range(8)]
    nominal = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(n / 2 <= w <= n for w, n in zip(waits, nominal, strict=True)), waits
    assert len({round(w, 6) for w in waits[3:]}) > 1  # jittered: agents restarted together spread out
    b.reset()
    assert b.next() <= 0.5


def test_renewal_is_due_when_a_third_of_the_lifetime_is_left() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert renewal_due(start, start + dt.timedelta(days=365)) == start + dt.timedelta(days=365 * 2 / 3)
    assert renewal_due(start, start + dt.timedelta(seconds=30)) == start + dt.timedelta(seconds=20)


def test_read_ca_refuses_what_is_not_a_certificate(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(InputError) as err:
        read_ca(garbage)
    assert "is not a PEM certificate" in err.value.message and "--ca" in (err.value.hint or "")
    with pytest.raises(InputError):
        read_ca(tmp_path / "missing.pem")
    good = CertAuthority(tmp_path / "ca").ca_path
    assert read_ca(good) == good.read_bytes()


def test_json_log_lines_are_one_object_each_and_safe() -> None:
    fmt = SafeLogFormatter(json_lines=True)
    record = logging.LogRecord("fleetctl.agent", logging.WARNING, __file__, 1, "host %s\nforged", ("n1",), None)
    line = fmt.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "fleetctl.agent"
    assert entry["message"] == "host n1\\nforged" and entry["time"].endswith("+00:00")
