"""fleetctl contexts (controller/contexts.py, `fleetctl config …`, `--context`) against a real HTTPS controller:
a context names the server, the token file (0600 or refused) and the CA; flags win over environment variables,
which win over the context."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from fleetctl.controller import contexts
from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.ca import CertAuthority
from fleetctl.controller.cli import main as fleetctl_main
from fleetctl.fleet.errors import UsageError
from tests.integration.fleet_support import controller_settings

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture
async def https_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningController]:
    for var in ("FLEETCTL_CONTROLLER", "FLEETCTL_STATE_DIR", "FLEETCTL_TOKEN", "FLEETCTL_TOKEN_FILE", "FLEETCTL_CA",
                "FLEETCTL_CONTEXT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLEETCTL_CONFIG", str(tmp_path / "home" / "fleetctl" / "config.toml"))
    monkeypatch.chdir(tmp_path)  # no ./state/controller here: only the context can find the controller
    rc = await start_controller(controller_settings(tmp_path / "controller", http_insecure=False))
    try:
        yield rc
    finally:
        await rc.stop(grace=0.2)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(fleetctl_main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def credentials(rc: RunningController, where: Path) -> tuple[Path, Path]:
    """(token file 0600, CA copy) as an operator would carry them off the controller host."""
    where.mkdir(parents=True, exist_ok=True)
    token = where / "prod.token"
    token.write_text((rc.ctx.settings.state_dir / "admin.token").read_text())
    token.chmod(0o600)
    ca = where / "prod-ca.pem"
    shutil.copy(rc.ctx.settings.state_dir / "ca" / "ca.pem", ca)
    return token, ca


async def test_contexts_name_server_token_and_ca(https_controller: RunningController, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rc = https_controller
    url = rc.ctx.http_url
    assert url and url.startswith("https://")
    token, ca = credentials(rc, tmp_path / "creds")
    code, _, err = await run(capsys, "nodes")
    assert code != 0  # nothing configured yet: no controller found

    code, out, err = await run(capsys, "config", "set-context", "prod", "--server", url, "--token-file", str(token),
                               "--ca", str(ca))
    assert code == 0, err
    config = Path(os.environ["FLEETCTL_CONFIG"])
    assert (config.stat().st_mode & 0o777) == 0o600 and "(current)" in out
    code, out, err = await run(capsys, "nodes", "-o", "json")  # the current context: server, token, CA
    assert code == 0, err
    assert json.loads(out)["nodes"] == []

    wrong_ca = CertAuthority(tmp_path / "other-ca").ca_path
    code, out, err = await run(capsys, "config", "set-context", "bad", "--server", "https://127.0.0.1:9",
                               "--token-file", str(token), "--ca", str(wrong_ca))
    assert code == 0, err
    code, out, err = await run(capsys, "config", "get-contexts", "--json")
    listed = json.loads(out)
    assert listed["current"] == "prod" and [c["name"] for c in listed["contexts"]] == ["prod", "bad"]
    code, out, err = await run(capsys, "config", "get-contexts")
    assert out.splitlines()[1].startswith("*") and "prod" in out.splitlines()[1]

    # --context picks another one for one command; an unknown name says which exist
    code, _, err = await run(capsys, "--context", "bad", "nodes")
    assert code == 7, err
    code, _, err = await run(capsys, "nodes", "--context", "nosuch")
    assert code == 4 and "no context 'nosuch'" in err and "known contexts: bad, prod" in err

    # precedence: a flag beats its variable, which beats the context
    monkeypatch.setenv("FLEETCTL_CONTROLLER", "https://127.0.0.1:9")
    code, _, err = await run(capsys, "nodes")
    assert code == 7, err  # the variable won over the context's server
    code, _, err = await run(capsys, "nodes", "--controller", url)
    assert code == 0, err  # the flag won over the variable; token and CA still the context's
    monkeypatch.delenv("FLEETCTL_CONTROLLER")
    monkeypatch.setenv("FLEETCTL_CA", str(wrong_ca))
    code, _, err = await run(capsys, "nodes")
    assert code == 6 and "error[tls-verify]" in err  # the variable's CA won over the context's
    code, _, err = await run(capsys, "nodes", "--ca", str(ca))
    assert code == 0, err
    monkeypatch.delenv("FLEETCTL_CA")

    # use-context switches; an unknown name changes nothing
    code, out, err = await run(capsys, "config", "use-context", "bad")
    assert code == 0 and contexts.load(config).current == "bad"
    code, _, err = await run(capsys, "config", "use-context", "nosuch")
    assert code == 4 and contexts.load(config).current == "bad"
    code, out, _ = await run(capsys, "config", "current-context")
    assert out.strip() == "bad"


async def test_token_files_readable_by_others_are_refused(https_controller: RunningController, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = https_controller
    token, ca = credentials(rc, tmp_path / "creds")
    assert rc.ctx.http_url
    assert (await run(capsys, "config", "set-context", "prod", "--server", rc.ctx.http_url, "--token-file",
                      str(token), "--ca", str(ca)))[0] == 0
    token.chmod(0o644)
    code, _, err = await run(capsys, "nodes")
    assert code == 6 and "readable by other users (mode 0644)" in err and f"chmod 600 {token}" in err
    code, _, err = await run(capsys, "config", "set-context", "again", "--token-file", str(token))
    assert code == 6 and "chmod 600" in err
    assert "again" not in contexts.load(Path(os.environ["FLEETCTL_CONFIG"])).contexts


@pytest.mark.parametrize(("text", "says"), [
    ("current-context = [", "not valid TOML"),
    ('[contexts.a]\nserver = "ftp://x"\n', "must be an http(s) URL"),
    ('[contexts.a]\nserverr = "https://x"\n', "unknown key 'serverr'"),
    ("current-context = 3\n", "must be a string"),
    ('contexts = "x"\n', "must be a table"),
])
def test_a_bad_config_file_is_refused_naming_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(says)) as err:
        contexts.load(path)
    assert err.value.hint


def test_relative_paths_are_relative_to_the_file_and_save_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "config.toml"
    path.parent.mkdir()
    path.write_text('current-context = "a b"\n[contexts."a b"]\nserver = "https://h:1"\ntoken-file = "t"\n')
    loaded = contexts.load(path)
    ctx = loaded.context(None)
    assert ctx is not None and ctx.token_file == path.parent / "t" and ctx.ca is None
    contexts.save(loaded)
    assert contexts.load(path) == loaded
    assert contexts.load(tmp_path / "absent.toml").contexts == {}
