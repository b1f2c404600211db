"""The controller's TOML config file: every knob of `fleet-controller serve` is a key; a flag wins over its
environment variable, which wins over the file, which wins over the default; an unknown key, a wrong type
or a bad value stops the start naming the key, the file and what to do; `fleet-controller config example`
prints every key at its default and reads back as the defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fleetctl.controller.main import main
from fleetctl.controller.ratelimit import Rate
from fleetctl.controller.settings import FILE_KEYS, ControllerSettings, add_arguments, config_example, settings_from
from fleetctl.controller.store.db import DbTimeouts
from fleetctl.controller.upstream import UpstreamConfig
from fleetctl.controller.verification import RegressionPolicy
from fleetctl.fleet.errors import UsageError


def read(argv: list[str], environ: dict[str, str] | None = None) -> ControllerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(argv), environ or {})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_flag_of_serve_is_a_key_of_the_file() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    assert dests == set(FILE_KEYS)


def test_docs_deploy_lists_every_key() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert all(f"| `{key}` |" in text for key in FILE_KEYS)


def test_the_example_reads_back_as_the_defaults(tmp_path: Path) -> None:
    example = config_example()
    assert all(f"{key} =" in example for key in FILE_KEYS)
    assert read(["--config", str(write(tmp_path, example))]) == read([])


def test_every_key_is_read_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys.asc").write_text("keys", encoding="utf-8")
    path = write(tmp_path, f'''
state_dir = "{tmp_path}/state"
db = "postgresql+psycopg://fleet@db/fleet"
grpc_listen = "0.0.0.0:9443"
enroll_listen = "0.0.0.0:9444"
http_listen = "0.0.0.0:9480"
heartbeat_interval = 4
missed_heartbeats = 5
san = ["ctl.example", "10.0.0.1"]
gc_tuning = false
upstream_index = "none"
wheel_mirror = "https://mirror.example/fa"
offline = true
enroll_rate = 500
trusted_keyring = "{tmp_path}/keys.asc"
require_signed = true
rollout_lease_ttl = 30
scheduler = false
scheduler_tick = 0.5
drift_debounce = 2
dashboard_session_seconds = 60
db_lock_timeout_ms = 250
db_statement_timeout_ms = 900
log_level = "debug"
verify_regression_threshold = 0.4
verify_regression_min_samples = 2
''')
    s = read(["--config", str(path)])
    assert s == ControllerSettings(
        state_dir=tmp_path / "state", db_url="postgresql+psycopg://fleet@db/fleet", grpc_listen="0.0.0.0:9443",
        enroll_listen="0.0.0.0:9444", http_listen="0.0.0.0:9480", heartbeat_interval=4.0, missed_heartbeats=5,
        extra_names=("ctl.example", "10.0.0.1"), gc_tuning=False,
        upstream=UpstreamConfig(index_url=None, wheel_mirror="https://mirror.example/fa", offline=True),
        enroll_per_source=Rate(burst=2000, per_second=500), enroll_overall=Rate(burst=2000, per_second=500),
        trusted_keyring=tmp_path / "keys.asc", require_signed=True, rollout_lease_ttl=30.0, scheduler=False,
        scheduler_tick=0.5, drift_debounce=2.0, dashboard_session_seconds=60, db_timeouts=DbTimeouts(250, 900),
        log_level="DEBUG", regression=RegressionPolicy(threshold=0.4, min_samples=2))


def test_flag_beats_variable_beats_file_beats_default(tmp_path: Path) -> None:
    path = write(tmp_path, 'scheduler_tick = 1\ndrift_debounce = 3\ngrpc_listen = "0.0.0.0:9443"\n'
                           'http_listen = "0.0.0.0:9480"\nscheduler = false\n')
    env = {"FLEET_CONFIG": str(path), "FLEET_SCHEDULER_TICK": "2", "FLEET_DRIFT_DEBOUNCE": "4"}
    s = read(["--drift-debounce", "6", "--http-listen", "127.0.0.1:1"], env)
    assert (s.scheduler_tick, s.drift_debounce) == (2.0, 6.0)  # variable over file; flag over variable
    assert (s.grpc_listen, s.http_listen) == ("0.0.0.0:9443", "127.0.0.1:1")  # file over default; flag over file
    assert s.scheduler is False and s.rollout_lease_ttl == 15.0  # from the file; the default
    # --config wins over $FLEET_CONFIG; an empty variable counts as unset and then the file decides
    (tmp_path / "other").mkdir()
    other = write(tmp_path / "other", "scheduler_tick = 7\n")
    assert read(["--config", str(other)], {"FLEET_CONFIG": str(path), "FLEET_SCHEDULER_TICK": ""}) \
        .scheduler_tick == 7.0


@pytest.mark.parametrize(("text", "names"), [
    ("schedular_tick = 1\n", ("config file FILE: unknown key 'schedular_tick'", "did you mean 'scheduler_tick'?",
                              "remove it")),
    ("colour = 'blue'\n", ("FILE: unknown key 'colour'", "config example")),
    ('scheduler_tick = "soon"\n', ("FILE: scheduler_tick = 'soon' is not a number", "write scheduler_tick = 5.0")),
    ("missed_heartbeats = true\n", ("FILE: missed_heartbeats = True is not a whole number",)),
    ("missed_heartbeats = 2.5\n", ("missed_heartbeats = 2.5 is not a whole number",)),
    ("scheduler = 'off'\n", ("FILE: scheduler = 'off' is not true or false", "write scheduler = true")),
    ("san = 'ctl.example'\n", ("is not a list of strings",)),
    ("db = 5\n", ("db = 5 is not a string",)),
    ("scheduler_tick = -1\n", ("scheduler_tick in FILE=", "'-1.0'", "positive",
                               "or scheduler_tick in the config file")),
    ("verify_regression_threshold = 15\n", ("verify_regression_threshold in FILE=", "between 0 and 1")),
    ("log_level = 'loud'\n", ("log_level in FILE=", "DEBUG, INFO")),
    ("grpc_listen = \n", ("config file FILE is not valid TOML",)),
    ("require_signed = true\n", ("--require-signed needs --trusted-keyring",)),
    ("upstream_index = 'ftp://x'\n", ("is not an http(s) or file URL",)),
])
def test_a_bad_file_names_the_key_the_file_and_what_to_do(tmp_path: Path, text: str,
                                                          names: tuple[str, ...]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as caught:
        read(["--config", str(path)])
    said = f"{caught.value.message} {caught.value.hint}"
    for name in names:
        assert name.replace("FILE", str(path)) in said


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        read([], {"FLEET_CONFIG": str(tmp_path / "nope.toml")})
    assert str(tmp_path / "nope.toml") in caught.value.message and "FLEET_CONFIG" in (caught.value.hint or "")


def test_config_example_command_prints_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == config_example()
