"""Resumable uploads (controller/uploads.py): what a cut-off stream sent is kept and continued; corrupt,
full-disk and stale partials are removed; a database error at commit keeps the file whole for a commit-only
retry; a file already stored is offered whole without being writable through its link."""

from __future__ import annotations

import errno
import hashlib
import os
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.artifacts import ArtifactStore, Provenance
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.uploads import PartialWriter, StoreFull, UploadRestart, Uploads
from fleetctl.fleet.errors import InputError, StoreError

OWNER = "agent-1"
NAME = "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
PROV = Provenance.user("tester")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'c.db'}")


@pytest.fixture
def uploads(tmp_path: Path, store: Store) -> Uploads:
    return Uploads(ArtifactStore(tmp_path / "artifacts", store))


def blob(n: int = 3 * 1024 * 1024 + 17) -> tuple[bytes, str]:
    data = os.urandom(n)
    return data, hashlib.sha256(data).hexdigest()


def send(w: PartialWriter, data: bytes, start: int, end: int, step: int = 256 * 1024) -> None:
    crc = zlib.crc32(data[:start])
    for pos in range(start, end, step):
        piece = data[pos:min(end, pos + step)]
        crc = zlib.crc32(piece, crc)
        w.write(piece, pos, crc)


def test_cut_off_stream_is_continued_not_resent(uploads: Uploads) -> None:
    data, sha = blob()
    assert uploads.query(OWNER, sha, len(data), NAME, "wheel") == (0, False)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, 1_000_000)
    w.close()  # the stream was cut: what arrived stays
    offset, stored = uploads.query(OWNER, sha, len(data), NAME, "wheel")
    assert (offset, stored) == (1_000_000, False)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", offset, provenance=PROV)
    send(w, data, offset, len(data))
    info = w.commit()
    assert info.sha256 == sha and info.size == len(data)
    assert uploads.artifacts.path_for(sha).read_bytes() == data
    assert list(uploads.dir.iterdir()) == []  # no partial left behind


def test_another_agent_never_sees_or_extends_the_partial(uploads: Uploads) -> None:
    data, sha = blob(500_000)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, 200_000)
    w.close()
    assert uploads.query("agent-2", sha, len(data), NAME, "wheel") == (0, False)


def test_corrupt_held_prefix_is_caught_by_the_running_crc_and_discarded(uploads: Uploads) -> None:
    data, sha = blob(600_000)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, 300_000)
    w.close()
    path = uploads.partial_path(OWNER, sha, len(data))
    with path.open("r+b") as f:  # a power loss damaged the held part
        f.seek(1000)
        f.write(b"\0" * 64)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 300_000, provenance=PROV)
    with pytest.raises(UploadRestart, match="CRC-32 mismatch"):
        send(w, data, 300_000, len(data))
    assert not path.exists()
    assert uploads.query(OWNER, sha, len(data), NAME, "wheel") == (0, False)


def test_newer_stream_takes_over_from_a_stale_one(uploads: Uploads) -> None:
    data, sha = blob(400_000)
    old = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(old, data, 0, 100_000)
    new = uploads.open(OWNER, sha, len(data), NAME, "wheel", 100_000, provenance=PROV)
    with pytest.raises(UploadRestart, match="took over"):
        old.write(data[100_000:110_000], 100_000, zlib.crc32(data[:110_000]))
    old.close()  # the stale stream ending must not end the new one's claim
    send(new, data, 100_000, len(data))
    assert new.commit().sha256 == sha


def test_resume_beyond_what_is_held_is_refused(uploads: Uploads) -> None:
    data, sha = blob(100_000)
    with pytest.raises(UploadRestart, match="holds 0 bytes"):
        uploads.open(OWNER, sha, len(data), NAME, "wheel", 50_000, provenance=PROV)


def test_disk_full_mid_write_removes_the_partial_and_says_so(uploads: Uploads, monkeypatch: pytest.MonkeyPatch) -> None:
    data, sha = blob(800_000)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, 262_144)
    real = w._file

    class Full:
        closed = False

        def write(self, _: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            real.close()
            self.closed = True

    monkeypatch.setattr(w, "_file", Full())
    with pytest.raises(StoreFull, match=r"is full .*No space left on device.*bytes free") as exc:
        send(w, data, 262_144, len(data))
    assert "agents keep their built wheels and retry" in (exc.value.hint or "")
    assert list(uploads.dir.iterdir()) == []  # the space is given back at once


def test_query_refuses_early_when_the_disk_cannot_hold_the_rest(uploads: Uploads,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data, sha = blob(100_000)

    class Usage:
        free = 10_000

    monkeypatch.setattr("fleetctl.controller.uploads.shutil.disk_usage", lambda _: Usage())
    with pytest.raises(StoreFull, match="10000 bytes free, the upload needs 100000 more"):
        uploads.query(OWNER, sha, len(data), NAME, "wheel")


def test_database_error_at_commit_keeps_the_file_whole_for_a_commit_only_retry(
        uploads: Uploads, monkeypatch: pytest.MonkeyPatch) -> None:
    data, sha = blob(700_000)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, len(data))
    real = uploads.artifacts.store.session
    calls = {"n": 0}

    def broken(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        raise StoreError("database error: OperationalError: database is locked", hint="check the database")

    monkeypatch.setattr(uploads.artifacts.store, "session", broken)
    with pytest.raises(StoreError, match="database is locked"):
        w.commit()
    assert calls["n"] == 1
    assert not uploads.artifacts.path_for(sha).exists()
    monkeypatch.setattr(uploads.artifacts.store, "session", real)
    assert uploads.query(OWNER, sha, len(data), NAME, "wheel") == (len(data), False)  # nothing to resend
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", len(data), provenance=PROV)
    w.write(b"", len(data), zlib.crc32(data))
    assert w.commit().sha256 == sha
    assert uploads.artifacts.get(sha).size == len(data)


def test_a_stored_file_is_offered_whole_and_cannot_be_damaged_through_its_link(uploads: Uploads) -> None:
    data, sha = blob(300_000)
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, len(data))
    w.commit()
    # the answer was lost: the agent asks again and only commits
    assert uploads.query(OWNER, sha, len(data), NAME, "wheel") == (len(data), False)
    # a confused agent starting over from 0 must not truncate the stored file through the link
    w = uploads.open(OWNER, sha, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, 1000)
    w.discard()
    assert uploads.artifacts.path_for(sha).read_bytes() == data


def test_digest_mismatch_over_the_whole_file_is_refused_and_discarded(uploads: Uploads) -> None:
    data, _ = blob(50_000)
    wrong = "0" * 64
    w = uploads.open(OWNER, wrong, len(data), NAME, "wheel", 0, provenance=PROV)
    send(w, data, 0, len(data))
    with pytest.raises(InputError, match="not the announced"):
        w.commit()
    assert list(uploads.dir.iterdir()) == []


def test_stale_temp_files_are_removed_at_start_fresh_ones_kept(tmp_path: Path, store: Store) -> None:
    arts = ArtifactStore(tmp_path / "artifacts", store)
    tmp = arts.root / "tmp"
    tmp.mkdir(parents=True)
    old = tmp / f"partial-{OWNER}-{'a' * 64}-529000000"
    old_oneshot = tmp / "upload-abc123"
    fresh = tmp / f"partial-{OWNER}-{'b' * 64}-10"
    other = tmp / "README"
    for p in (old, old_oneshot, fresh, other):
        p.write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    for p in (old, old_oneshot, other):
        os.utime(p, (day_ago, day_ago))
    removed = Uploads(arts, stale_after_s=24 * 3600).clean_stale()
    assert sorted(removed) == sorted([old, old_oneshot])
    assert fresh.exists() and other.exists()
