"""The deployment files (deploy/): the systemd units pass `systemd-analyze verify` without a warning and carry
the restart, stop and hardening settings docs/deploy.md promises; the agent's env file defines what its unit
expands; the controller image's Dockerfile copies files that exist, starts a real console script with a config
file that reads, and exposes the settings' default ports. (No image is built here: no container daemon.)"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fleetctl.controller.settings import ControllerSettings, read_config

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
SYSTEMD = ROOT / "fleetctl" / "deploy" / "systemd"  # package data: `fleetctl agents install` installs the agent unit
UNITS = ("fleet-controller.service", "fleet-agent.service")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(SYSTEMD / name, encoding="utf-8")
    return parser


def console_scripts() -> dict[str, str]:
    scripts: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return scripts


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # the units start /opt/fleetctl/{controller,agent}/bin/...; verify checks that ExecStart is executable,
    # so point it at this venv's scripts of the same names
    bindir = Path(sys.executable).parent
    for name in UNITS:
        text = re.sub(r"/opt/fleetctl/(controller|agent)/bin/", f"{bindir}/", (SYSTEMD / name).read_text())
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=60, check=False)
    # unknown keys and unparsable values are only warnings (exit 0): none may appear
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


@pytest.mark.parametrize("name", UNITS)
def test_units_restart_stop_and_keep_state_in_var_lib(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "on-failure" and float(service["RestartSec"]) > 0
    assert service["StateDirectory"].startswith("fleetctl/") and "${STATE_DIRECTORY}" in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 10
    executable = Path(service["ExecStart"].split()[0])
    assert executable.name in console_scripts()
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules", "LockPersonality"):
        assert service[key] == "yes", key


def test_controller_unit_is_strict_and_unprivileged() -> None:
    service = unit("fleet-controller.service")["Service"]
    assert service["User"] == "fleetctl" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/fleetctl/controller"
    assert all(service[key] == "yes" for key in ("ProtectHome", "PrivateDevices", "RestrictSUIDSGID"))
    assert service["CapabilityBoundingSet"] == ""
    assert "serve --config /etc/fleetctl/controller.toml" in service["ExecStart"]
    sysusers = (SYSTEMD / "fleetctl.sysusers.conf").read_text()
    assert re.search(r"^u fleetctl ", sysusers, re.MULTILINE)


def test_agent_unit_leaves_devices_system_and_home_to_its_jobs() -> None:
    service = unit("fleet-agent.service")["Service"]
    # NVML needs /dev/nvidia*, apt writes /usr and /etc, target venvs may live under /home (docs/deploy.md)
    for key in ("PrivateDevices", "DevicePolicy", "ProtectSystem", "ProtectHome", "RestrictSUIDSGID"):
        assert key not in service, key
    env_file = Path(service["EnvironmentFile"])
    assert env_file == Path("/etc/fleetctl/agent.env")
    example = {line.split("=", 1)[0] for line in (SYSTEMD / "agent.env").read_text().splitlines()
               if line and not line.startswith("#")}
    used = set(re.findall(r"\$\{?(\w+)\}?", service["ExecStart"])) - {"STATE_DIRECTORY"}
    assert used <= example and "FLEET_AGENT_TOKEN" in example


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_copies_files_that_exist_and_ignores_none_of_them() -> None:
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    copies = [rest.split() for word, rest in dockerfile() if word == "COPY" and "--from" not in rest]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.split("/")[0] not in ignored, source


def test_the_wheel_stage_builds_from_exactly_what_it_copies(tmp_path: Path) -> None:
    """The image's first stage, without a container: the wheel builds from its COPY sources alone and holds
    what the controller loads at run time (migrations, dashboard templates and static files)."""
    stage = dockerfile()
    wheel_stage = stage[:[word for word, _ in stage].index("FROM", 1)]
    (tmp_path / "src").mkdir()  # WORKDIR /src: the COPY destinations are relative to it
    for word, rest in wheel_stage:
        if word == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                target = tmp_path / "src" / dest / (Path(source).name if dest.endswith("/") else "")
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path / "src")],
                   check=True, timeout=300, capture_output=True, env={"PIP_CONFIG_FILE": "/dev/null",
                                                                     "PATH": str(Path(sys.executable).parent)})
    (wheel,) = (tmp_path / "wheels").glob("fleetctl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "fleetctl/controller/store/migrations/env.py" in names
    assert "fleetctl/controller/web/templates/attention.html" in names
    assert any(name.startswith("fleetctl/controller/store/migrations/versions/") for name in names)
    assert any(name.startswith("fleetctl/controller/web/static/") for name in names)
    assert "fleetctl/playbooks/install-wheel.yml" in names  # the agent's playbooks are package data too


def test_dockerfile_runs_the_controller_as_a_user_with_its_config_and_ports() -> None:
    instructions = dict(dockerfile())  # the last of each kind
    assert instructions["FROM"] == "python:3.12-slim" and instructions["USER"] == "fleetctl"
    assert instructions["ENTRYPOINT"] == '["fleet-controller"]' and "fleet-controller" in console_scripts()
    assert instructions["CMD"] == '["serve", "--config", "/etc/fleetctl/controller.toml"]'
    assert "/var/lib/fleetctl" in instructions["VOLUME"] and "/api/v1/live" in instructions["HEALTHCHECK"]
    defaults = ControllerSettings()
    grpc_port = int(defaults.grpc_listen.rsplit(":", 1)[1])
    http_port = int(defaults.http_listen.rsplit(":", 1)[1])
    assert instructions["EXPOSE"].split() == [str(grpc_port), str(grpc_port + 1), str(http_port)]
    # the config the image starts with reads, and listens on those ports on every interface
    config = read_config(DEPLOY / "container" / "controller.toml").values
    assert config["state_dir"] == Path("/var/lib/fleetctl/controller")
    assert {config["grpc_listen"], config["enroll_listen"], config["http_listen"]} == {
        f"0.0.0.0:{grpc_port}", f"0.0.0.0:{grpc_port + 1}", f"0.0.0.0:{http_port}"}
