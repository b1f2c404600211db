"""State dir hygiene (issue 13): private modes, loose ones tightened at start, and clear errors — never an
"internal bug" traceback — for a read-only or full state dir (controller and agent).

The read-only and full cases use a real tmpfs (remounted read-only, or filled up); they are skipped where
this process may not mount (not root, or no CAP_SYS_ADMIN in the container)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.agent.client import Credentials
from fleetctl.controller.app import start_controller
from fleetctl.controller.context import ControllerContext
from fleetctl.fleet.errors import StateDirError
from fleetctl.fleet.statedir import state_dir_error
from tests.integration.fleet_support import controller_settings

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[3]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str = "8m") -> Iterator[Path]:
    where = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(where)], check=True, capture_output=True)


def serve(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(state),
                           "--grpc-listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0",
                           "--http-listen", "127.0.0.1:0", "--upstream-index", "none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


async def test_new_state_dir_is_private(tmp_path: Path) -> None:
    state = tmp_path / "controller"
    rc = await start_controller(controller_settings(state))
    try:
        assert mode(state) == 0o700
        for name in ("controller.db", "admin.token", "ca/ca.key", "ca/server.key"):
            assert mode(state / name) == 0o600, name
        assert not (state / "dashboard.key").exists()  # dashboard sessions are rows of the database
    finally:
        await rc.stop(grace=0.1)


def test_loose_modes_left_by_an_older_version_are_tightened_at_start(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "controller"
    ControllerContext(controller_settings(state)).close()
    (state / "logs").mkdir()
    (state / "logs" / "controller.log").write_text("old log\n")
    for path, loose in ((state, 0o755), (state / "controller.db", 0o644), (state / "admin.token", 0o644),
                        (state / "ca" / "ca.key", 0o640), (state / "logs", 0o755),
                        (state / "logs" / "controller.log", 0o644)):
        os.chmod(path, loose)
    with caplog.at_level(logging.WARNING, logger="fleetctl.fleet.statedir"):
        ControllerContext(controller_settings(state)).close()
    assert mode(state) == 0o700 and mode(state / "logs") == 0o700
    for name in ("controller.db", "admin.token", "ca/ca.key", "logs/controller.log"):
        assert mode(state / name) == 0o600, name
    lines = [r.getMessage() for r in caplog.records if r.name == "fleetctl.fleet.statedir"]  # others are captured too
    assert any(f"tightened {state / 'controller.db'} from 0644 to 0600" in m for m in lines), lines
    assert len(lines) == 6  # one line per loosened path, nothing for the ones already private


def test_agent_state_dir_and_key_private(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    creds = Credentials("id", "node-1", b"KEY", b"CERT", b"CA")
    creds.save(state)
    assert mode(state) == 0o700 and mode(state / "agent.key") == 0o600
    os.chmod(state, 0o755)
    os.chmod(state / "agent.key", 0o644)
    Credentials.secure(state)
    assert mode(state) == 0o700 and mode(state / "agent.key") == 0o600
    assert Credentials.load(state) == creds


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"), (errno.ENOSPC, "free space"),
                                             (errno.EACCES, "chown")])
def test_os_errors_become_state_dir_errors_with_a_hint(code: int, words: str) -> None:
    err = state_dir_error(OSError(code, os.strerror(code)), "/srv/fleet", "write")
    assert isinstance(err, StateDirError) and err.exit_code == 15
    assert err.message == f"cannot write /srv/fleet: {os.strerror(code)}"
    assert err.hint is not None and words in err.hint


def test_read_only_state_dir_at_start_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path) as mnt:
        ControllerContext(controller_settings(mnt / "controller")).close()  # an existing state dir …
        remount(mnt, "ro")  # … on a disk that turned read-only
        with pytest.raises(StateDirError) as err:
            ControllerContext(controller_settings(mnt / "controller"))
        assert "Read-only file system" in err.value.message and "read-only" in (err.value.hint or "")
        proc = serve(mnt / "fresh")  # a new state dir there, through the real command line
        assert proc.returncode == 15, proc.stderr
        assert "error[state-dir]: cannot write" in proc.stderr and "Read-only file system" in proc.stderr
        assert "Traceback" not in proc.stderr and "internal" not in proc.stderr
        assert "hint: the file system holding" in proc.stderr


def test_full_state_dir_at_start_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path, size="1m") as mnt:
        with contextlib.suppress(OSError), (mnt / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
        proc = serve(mnt / "controller")
        assert proc.returncode == 15, proc.stderr
        assert "error[state-dir]" in proc.stderr and "No space left on device" in proc.stderr
        assert "hint: free space on the disk holding" in proc.stderr and "Traceback" not in proc.stderr


def test_agent_cannot_save_credentials_on_a_read_only_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path) as mnt:
        remount(mnt, "ro")
        with pytest.raises(StateDirError) as err:
            Credentials("id", "node-1", b"KEY", b"CERT", b"CA").save(mnt / "agent")
        assert "save the agent's credentials in" in err.value.message
