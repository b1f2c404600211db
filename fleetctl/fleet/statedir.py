"""The state directory's hygiene: private modes, and clear errors when it cannot be written.

Everything under a controller's ``--state-dir`` is the controller's own and some of it is secret (the CA
key, ``admin.token``, the database with token and session hashes and the audit log, logs
that name nodes and users). So the directory is 0700 and those files are 0600: created that way, and any
looser ones left by an older version are tightened at start with one log line each (docs/security.md,
"State and identity hygiene"). The agent uses ``private_dir``/``tighten`` for its own state dir too.

A read-only, full or foreign-owned state dir is an operator's problem with an operator's fix, not a bug:
``state_dir_error`` turns the ``OSError`` into a ``StateDirError`` that says which path, what happened and
what to do, at the places that write the state dir (controller/context.py at start, agent/client.py's credentials).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from fleetctl.fleet.errors import StateDirError

log = logging.getLogger(__name__)

# a controller's state dir when neither --state-dir nor $FLEETCTL_STATE_DIR names one: `fleet-controller serve`
# creates it, and fleetctl and the admin commands on the same host read it (the CLI's default, relative to the
# working directory)
DEFAULT_STATE_DIR = Path("state/controller")
DIR_MODE = 0o700
FILE_MODE = 0o600
# secret or private files a controller state dir holds (globs relative to it); SQLite's -wal/-shm/-journal
# files take the database file's mode, but ones left by an older version are tightened too
PRIVATE_GLOBS = ("controller.db", "controller.db-*", "admin.token", "ca/*.key", "*.log", "logs/*.log", "logs")
_WRITE_PROBE = ".write-probe"


def state_dir_error(exc: OSError, path: Path | str, doing: str) -> StateDirError:
    """``exc`` (raised while ``doing`` something to ``path``) as a ``StateDirError`` with what to do next."""
    where = str(path)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        hint = (f"the file system holding {where} is mounted read-only: remount it read-write, or start with "
                "--state-dir on a writable disk")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (f"free space on the disk holding {where} (`df -h {where}`; on a controller the large files are "
                "usually artifacts: `fleetctl artifacts`), then try again")
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = (f"this user (uid {os.getuid()}) may not write {where}: run as the state dir's owner, or fix its "
                "ownership with chown")
    else:
        hint = f"check {where} and the disk holding it"
    return StateDirError(f"cannot {doing} {where}: {reason}", hint=hint)


def tighten(path: Path, mode: int) -> bool:
    """Take group and other permissions off ``path`` (to ``mode``); True, with a log line, when it was looser."""
    try:
        current = stat.S_IMODE(path.lstat().st_mode)
    except FileNotFoundError:
        return False
    if path.is_symlink() or not current & 0o077:
        return False
    os.chmod(path, mode)
    log.warning("tightened %s from %04o to %04o (it held state others must not read)", path, current, mode)
    return True


def private_dir(path: Path) -> None:
    """``path`` exists as a directory only its owner can enter (created 0700, tightened if looser)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tighten(path, DIR_MODE)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (so whatever fills it later, e.g. SQLite,
    never leaves it readable by others), else tighten it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        tighten(path, FILE_MODE)


def prepare_state_dir(state: Path, sqlite_path: Path | None = None) -> None:
    """Make ``state`` private, tighten what it already holds, create the SQLite file 0600 and prove the dir
    takes a write now: a read-only or full state dir fails here, with a clear ``StateDirError``, instead of
    half-way through start-up or at the first upload."""
    target = state
    try:
        private_dir(state)
        for pattern in PRIVATE_GLOBS:
            for path in sorted(state.glob(pattern)):
                tighten(path, DIR_MODE if path.is_dir() else FILE_MODE)
        if sqlite_path is not None:
            target = sqlite_path
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            private_file(sqlite_path)
        target = state / _WRITE_PROBE
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, b"x" * 4096)  # a full disk refuses data blocks, not always an empty file
            os.fsync(fd)
        finally:
            os.close(fd)
            target.unlink(missing_ok=True)
    except OSError as exc:
        raise state_dir_error(exc, target if exc.filename is None else exc.filename, "write") from exc
