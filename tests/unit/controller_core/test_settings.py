"""ControllerSettings is read once, from flags and the environment: the flag wins over its variable, the
variable over the default, and a bad value stops the start naming the knob and what to set."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from fleetctl.controller.settings import ControllerSettings, add_arguments, settings_from
from fleetctl.controller.store.db import DbTimeouts
from fleetctl.controller.verification import RegressionPolicy
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR


def read(argv: list[str], environ: dict[str, str] | None = None) -> ControllerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv), environ or {})


def test_defaults_without_flags_or_environment() -> None:
    s = read([])
    assert s == ControllerSettings(gc_tuning=True)  # `serve` tunes the collector; an embedded controller does not
    assert s.state_dir == DEFAULT_STATE_DIR
    assert (s.rollout_lease_ttl, s.scheduler, s.scheduler_tick, s.drift_debounce) == (15.0, True, 5.0, 10.0)
    assert s.dashboard_session_seconds == 8 * 3600 and s.db_timeouts == DbTimeouts(5000, 15000)
    assert s.regression == RegressionPolicy(threshold=0.15, min_samples=3)


def test_every_documented_variable_is_read() -> None:
    s = read([], {"FLEET_ROLLOUT_LEASE_TTL": "5", "FLEET_SCHEDULER": "off", "FLEET_SCHEDULER_TICK": "0.5",
                  "FLEET_DRIFT_DEBOUNCE": "2", "FLEET_DASHBOARD_SESSION_SECONDS": "60",
                  "FLEET_DB_LOCK_TIMEOUT_MS": "250", "FLEET_DB_STATEMENT_TIMEOUT_MS": "900",
                  "FLEET_LOG_LEVEL": "debug", "FLEET_VERIFY_REGRESSION_THRESHOLD": "0.4",
                  "FLEET_VERIFY_REGRESSION_MIN_SAMPLES": "2"})
    assert (s.rollout_lease_ttl, s.scheduler, s.scheduler_tick, s.drift_debounce) == (5.0, False, 0.5, 2.0)
    assert s.dashboard_session_seconds == 60 and s.db_timeouts == DbTimeouts(250, 900)
    assert s.log_level == "DEBUG"
    assert s.regression == RegressionPolicy(threshold=0.4, min_samples=2)


def test_flag_wins_over_its_variable() -> None:
    env = {"FLEET_ROLLOUT_LEASE_TTL": "5", "FLEET_SCHEDULER": "on", "FLEET_DB_LOCK_TIMEOUT_MS": "250",
           "FLEET_VERIFY_REGRESSION_THRESHOLD": "0.4", "FLEET_VERIFY_REGRESSION_MIN_SAMPLES": "2"}
    s = read(["--rollout-lease-ttl", "30", "--no-scheduler", "--db-lock-timeout-ms", "1000",
              "--verify-regression-threshold", "0.25", "--verify-regression-min-samples", "5"], env)
    assert (s.rollout_lease_ttl, s.scheduler, s.db_timeouts.lock_ms) == (30.0, False, 1000)
    assert s.regression == RegressionPolicy(threshold=0.25, min_samples=5)
    # an empty variable counts as unset
    assert read([], {"FLEET_SCHEDULER_TICK": ""}).scheduler_tick == 5.0


@pytest.mark.parametrize(("argv", "environ", "names"), [
    ([], {"FLEET_SCHEDULER_TICK": "soon"}, ("FLEET_SCHEDULER_TICK='soon'", "$FLEET_SCHEDULER_TICK")),
    ([], {"FLEET_DB_LOCK_TIMEOUT_MS": "-1"}, ("FLEET_DB_LOCK_TIMEOUT_MS='-1'", "milliseconds")),
    ([], {"FLEET_SCHEDULER": "maybe"}, ("FLEET_SCHEDULER='maybe'", "on or off")),
    (["--dashboard-session-seconds", "1.5"], {}, ("--dashboard-session-seconds='1.5'", "whole number")),
    (["--rollout-lease-ttl", "0"], {"FLEET_ROLLOUT_LEASE_TTL": "5"}, ("--rollout-lease-ttl='0'", "positive")),
    ([], {"FLEET_VERIFY_REGRESSION_THRESHOLD": "15"},
     ("FLEET_VERIFY_REGRESSION_THRESHOLD='15'", "between 0 and 1", "$FLEET_VERIFY_REGRESSION_THRESHOLD")),
    (["--verify-regression-threshold", "fast"], {}, ("--verify-regression-threshold='fast'", "e.g. 0.15")),
    ([], {"FLEET_VERIFY_REGRESSION_MIN_SAMPLES": "0"}, ("FLEET_VERIFY_REGRESSION_MIN_SAMPLES='0'", "at least 1")),
])
def test_bad_value_names_the_knob_and_what_to_do(argv: list[str], environ: dict[str, str],
                                                  names: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as caught:
        read(argv, environ)
    text = f"{caught.value.message} {caught.value.hint}"
    for name in names:
        assert name in text
    assert "leave them unset for the default" in (caught.value.hint or "")


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = read(["--state-dir", str(tmp_path), "--san", "ctl.example"])
    assert s.state_dir == tmp_path and s.extra_names == ("ctl.example",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scheduler = False  # type: ignore[misc]
