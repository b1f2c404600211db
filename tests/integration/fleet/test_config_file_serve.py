"""`fleet-controller serve` as the systemd unit and the image start it: everything from a config file
($FLEET_CONFIG here, no flags), up on the file's ports, and a SIGTERM stops it cleanly well inside the units'
TimeoutStopSec; a bad file stops the start with exit status 2 and a message naming the key and the file."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.rollout.controller_proc import free_port

UNIT_STOP_SECONDS = 30  # TimeoutStopSec of fleetctl/deploy/systemd/fleet-controller.service


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleetctl.controller.main", "serve"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "FLEET_CONFIG": str(config)}, cwd=config.parent)


def test_serve_from_config_file_and_stop_on_sigterm(tmp_path: Path) -> None:
    grpc, http = free_port(), free_port()
    state = tmp_path / "state"
    config = tmp_path / "controller.toml"
    config.write_text(f'state_dir = "{state}"\ngrpc_listen = "127.0.0.1:{grpc}"\nenroll_listen = '
                      f'"127.0.0.1:{free_port()}"\nhttp_listen = "127.0.0.1:{http}"\nscheduler = false\n')
    proc = serve(config, tmp_path / "controller.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "controller.log").read_text()
            try:
                # HTTPS by default, with a certificate from the controller's own CA
                verify = ssl.create_default_context(cafile=state / "ca" / "ca.pem")
                if httpx.get(f"https://127.0.0.1:{http}/api/v1/live", timeout=2, verify=verify).status_code == 200:
                    break
            except (httpx.HTTPError, OSError):  # not listening yet, or its CA not written yet
                pass
            assert time.monotonic() < deadline, "controller did not come up"
            time.sleep(0.2)
        discovery = json.loads((state / "controller.json").read_text())
        assert discovery["http"] == f"https://127.0.0.1:{http}" and discovery["http_ca"] == "ca/ca.pem"
        assert str(grpc) in json.dumps(discovery) and str(http) in json.dumps(discovery)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=UNIT_STOP_SECONDS) == 0
        assert time.monotonic() - stopping < UNIT_STOP_SECONDS / 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_config_file_stops_the_start_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text("http_listen = 7480\n")
    proc = serve(config, tmp_path / "controller.log")
    assert proc.wait(timeout=60) == 2
    said = (tmp_path / "controller.log").read_text()
    assert f"config file {config}: http_listen = 7480 is not a string" in said
    assert 'write http_listen = "127.0.0.1:7480"' in said
