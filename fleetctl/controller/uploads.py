"""Resumable artifact uploads from agents: what a cut-off upload sent is kept and continued, not resent.

A built flash-attn wheel is 60-530 MB and took up to half an hour of a GPU node to make; an upload cut
off by a controller restart, a dropped connection, a database error at commit or a full disk must not
cost the build. The protocol (proto/fleet/v1/fleet.proto, ``QueryUpload`` + ``UploadArtifact``)::

    agent                                          controller
    QueryUpload(sha256, size, filename, kind) ──►  offset = bytes held in the partial file (0: none),
                                              ◄──  stored = already in the store (nothing to send)
    UploadArtifact(chunks from offset,        ──►  each chunk: offset (must be where the partial ends) and
                   each with offset + crc32)       the running CRC-32 of bytes 0..end-of-chunk (checked)
                                              ◄──  sha256 of the whole file (checked against the announced)

The partial file is ``STATE/artifacts/tmp/partial-<agent id>-<sha256>-<size>``: keyed by the uploading
agent as well as the content, so one agent can never extend (or poison) another's partial upload; the
final sha256 check protects the store either way. It survives a cut-off stream and a controller kill
(bytes written before a ``kill -9`` are in the page cache; after a power loss a damaged prefix fails the
first chunk's CRC check, and the partial is discarded and sent again from 0). It is removed when the
upload is committed, when its content proves corrupt (CRC or sha256 mismatch), when the disk fills up
(to give the space back at once), and when it is older than ``stale_after_s`` at controller start
(``clean_stale``: an agent gives up retrying long before; default 24 hours).

Errors and what the agent does with them (agent/client.py ``upload_artifact`` retries for a bounded time):

- ``StoreFull`` (gRPC UNAVAILABLE): the controller's disk has no room — the partial is removed, the agent
  keeps its wheel and retries later (an operator frees space meanwhile);
- ``UploadRestart`` (gRPC ABORTED): the held prefix or a chunk is corrupt, or a newer stream of the same
  upload took over — the agent asks ``QueryUpload`` again and continues from what is held;
- ``StoreError`` at commit (gRPC UNAVAILABLE): the file is kept whole in its partial, so the retry sends
  no data, only the commit;
- ``InputError`` (INVALID_ARGUMENT): the file is refused (size limit, bad name, digest mismatch over the
  whole file) — not retried.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path

from fleetctl.controller.artifacts import KINDS, ArtifactInfo, ArtifactStore, Provenance, check_sha256, safe_filename
from fleetctl.fleet.errors import FleetError, InputError, NotFoundError, StoreError

log = logging.getLogger(__name__)

PARTIAL_PREFIX = "partial-"
TEMP_PREFIXES = (PARTIAL_PREFIX, "upload-")  # ArtifactWriter's one-shot temp files are "upload-*"
DEFAULT_STALE_SECONDS = 24 * 3600
# room left on the disk beyond the upload itself: the database and the logs live on the same disk
FREE_SPACE_MARGIN = 64 * 1024**2
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_READ = 4 * 1024**2


class StoreFull(StoreError):
    """The artifact store's disk has no room for an upload (retried later: the agent keeps its file)."""

    code = "store-full"


class UploadRestart(FleetError):
    """Continue the upload from what ``QueryUpload`` says is held now (the held part changed or is gone)."""

    code = "upload-restart"


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def store_full(where: Path, needed: int, exc: OSError | None = None) -> StoreFull:
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    cause = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return StoreFull(f"the controller's artifact store at {where} is full{cause}: {max(free, 0)} bytes free, "
                     f"the upload needs {needed} more (plus a {FREE_SPACE_MARGIN // 1024**2} MiB margin)",
                     hint="free space on the controller's disk (e.g. `fleetctl artifacts` to find large unused "
                          "files); agents keep their built wheels and retry the upload by themselves")


class PartialWriter:
    """One stream of a resumable upload, appending to the partial file from ``offset``.

    ``close()`` keeps the partial (a cut-off stream is continued later); ``discard()`` removes it.
    Build with ``Uploads.open`` (it reads the held prefix back to continue the sha256 and the CRC: run it
    in a thread for big files).
    """

    def __init__(self, uploads: Uploads, path: Path, filename: str, kind: str, sha256: str, size: int,
                 offset: int, generation: int, provenance: Provenance) -> None:
        self._uploads = uploads
        self.provenance = provenance
        self.path = path
        self.filename, self.kind, self.sha256, self.size = filename, kind, sha256, size
        self.generation = generation
        self.started_at = offset
        held = path.stat().st_size if path.exists() else 0
        if held and path.stat().st_nlink > 1 and offset < held:
            # a link to the stored file (``Uploads.query``): never truncate or write through it
            path.unlink()
            held = 0
        if offset > held:
            raise UploadRestart(f"the controller holds {held} bytes of {filename}, not the {offset} the upload "
                                f"continues from (the partial file was cleaned up or cut short)",
                                hint="ask QueryUpload again and continue from its offset")
        self._hash = hashlib.sha256()
        self.crc = 0
        try:
            self._file = path.open("r+b" if path.exists() else "w+b")
            if offset < held:
                self._file.truncate(offset)
            remaining = offset
            while remaining:
                block = self._file.read(min(_READ, remaining))
                if not block:
                    break
                self._hash.update(block)
                self.crc = zlib.crc32(block, self.crc)
                remaining -= len(block)
            self._file.seek(offset)
        except OSError as exc:
            self.discard()
            if is_disk_full(exc):
                raise store_full(path.parent, size - offset, exc) from exc
            raise StoreError(f"cannot open the partial upload {path.name}: {exc.strerror}",
                             hint="check the controller's state dir (permissions, disk)") from exc
        self.pos = offset

    def _current(self) -> bool:
        return self._uploads._active.get(self.path) == self.generation

    def write(self, data: bytes, offset: int, crc32: int | None) -> None:
        if not self._current():
            raise UploadRestart(f"a newer upload of {self.filename} took over from this one",
                                hint="ask QueryUpload again and continue from its offset")
        if offset != self.pos:
            raise UploadRestart(f"chunk of {self.filename} starts at byte {offset}, the upload is at {self.pos}",
                                hint="ask QueryUpload again and continue from its offset")
        if self.pos + len(data) > self.size:
            self.discard()
            raise InputError(f"{self.filename}: more than the announced {self.size} bytes arrived",
                             hint="announce the file's real size; the upload starts again from 0")
        crc = zlib.crc32(data, self.crc)
        if crc32 is not None and crc != crc32:
            # either this chunk or the held prefix (read back from disk) is damaged: start over
            self.discard()
            raise UploadRestart(f"{self.filename}: running CRC-32 mismatch at byte {self.pos + len(data)} "
                                f"(held part or chunk corrupt); the partial upload was discarded",
                                hint="upload again from offset 0")
        try:
            self._file.write(data)
        except OSError as exc:
            self.discard()  # give the space back now; the agent keeps its file and retries later
            if is_disk_full(exc):
                raise store_full(self.path.parent, self.size - self.pos, exc) from exc
            raise StoreError(f"cannot write the partial upload {self.path.name}: {exc.strerror}",
                             hint="check the controller's state dir (permissions, disk)") from exc
        self._hash.update(data)
        self.crc = crc
        self.pos += len(data)

    def commit(self) -> ArtifactInfo:
        """Check the whole file and move it into the store; the partial stays whole on a database error."""
        if not self._current():
            raise UploadRestart(f"a newer upload of {self.filename} took over from this one",
                                hint="ask QueryUpload again and continue from its offset")
        if self.pos != self.size:
            self.close()
            raise UploadRestart(f"{self.filename}: the upload ended at byte {self.pos} of {self.size}",
                                hint="continue from the offset QueryUpload returns")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())  # the store's copy must survive a power loss once acknowledged
            self._file.close()
        except OSError as exc:
            self.discard()
            if is_disk_full(exc):
                raise store_full(self.path.parent, self.size, exc) from exc
            raise StoreError(f"cannot write the partial upload {self.path.name}: {exc.strerror}",
                             hint="check the controller's state dir (permissions, disk)") from exc
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            self.discard()
            raise InputError(f"{self.filename} arrived with sha256 {digest}, not the announced {self.sha256}",
                             hint="the file changed on the agent during the upload, or the digest is wrong; "
                                  "upload again")
        store = self._uploads.artifacts
        final = store.path_for(digest)
        existed = final.exists()
        try:
            info = store._adopt(self.path, digest, self.filename, self.kind, self.size, self.provenance)
        except StoreError:
            # keep the verified file where a retry finds it whole: it then sends no data, only the commit
            if not existed and final.exists() and not self.path.exists():
                os.replace(final, self.path)
            raise
        self._uploads._release(self)
        return info

    def close(self) -> None:
        """End this stream, keeping what arrived for a later one to continue."""
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                log.warning("could not close partial upload %s", self.path.name)
        self._uploads._release(self)

    def discard(self) -> None:
        if hasattr(self, "_file") and not self._file.closed:
            with contextlib.suppress(OSError):  # the file is removed next anyway
                self._file.close()
        self.path.unlink(missing_ok=True)
        self._uploads._release(self)


class Uploads:
    """The resumable uploads of one controller process: partial files plus which stream owns each."""

    def __init__(self, artifacts: ArtifactStore, *, stale_after_s: float = DEFAULT_STALE_SECONDS) -> None:
        self.artifacts = artifacts
        self.dir = artifacts.root / "tmp"
        self.stale_after_s = stale_after_s
        self._active: dict[Path, int] = {}  # partial file → generation of the stream allowed to write it
        self._generation = 0

    def _validate(self, owner: str, sha256: str, size: int, filename: str, kind: str) -> None:
        if not _OWNER_RE.match(owner):
            raise InputError(f"bad upload owner {owner!r}", hint="an agent id")
        check_sha256(sha256)
        safe_filename(filename)
        if kind not in KINDS:
            raise InputError(f"unknown artifact kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
        if size < 0:
            raise InputError(f"negative size {size}", hint="announce the file's size in bytes")
        if size > self.artifacts.max_bytes:
            raise InputError(f"artifact of {size} bytes exceeds the limit of {self.artifacts.max_bytes}",
                             hint="raise the controller's artifact size limit or use a smaller file")

    def partial_path(self, owner: str, sha256: str, size: int) -> Path:
        return self.dir / f"{PARTIAL_PREFIX}{owner}-{sha256}-{size}"

    def query(self, owner: str, sha256: str, size: int, filename: str, kind: str) -> tuple[int, bool]:
        """``(offset, stored)``: bytes held from an earlier stream (and whether nothing at all is needed).

        A file the store already has (the agent's earlier upload was committed but the answer was lost, or
        the same bytes came from elsewhere) is offered whole: its partial is a hard link to the stored file,
        so the agent sends only the final, empty chunk and the upload is still authorized and recorded with
        its provenance (controller/build_uploads.py). ``stored`` is therefore never True from this
        controller; agents honor it (nothing to send) for controllers that need no record.
        """
        self._validate(owner, sha256, size, filename, kind)
        path = self.partial_path(owner, sha256, size)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.artifacts.get(sha256).size == size and not path.exists():
                os.link(self.artifacts.path_for(sha256), path)
        except NotFoundError:
            pass
        except OSError as exc:  # no hard links here: the agent sends the file again
            log.info("cannot link stored %s for a commit-only upload: %s", sha256[:12], exc)
        try:
            held = path.stat().st_size
        except FileNotFoundError:
            held = 0
        if held > size:
            path.unlink(missing_ok=True)
            held = 0
        needed = size - held
        if needed and shutil.disk_usage(self.dir).free < needed + FREE_SPACE_MARGIN:
            raise store_full(self.dir, needed)
        return held, False

    def open(self, owner: str, sha256: str, size: int, filename: str, kind: str, offset: int, *,
             provenance: Provenance) -> PartialWriter:
        """Start a stream continuing from ``offset``; an older stream of the same upload stops at its next chunk.
        The caller has authorized the upload: ``provenance`` is recorded with the file when it is committed."""
        self._validate(owner, sha256, size, filename, kind)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_path(owner, sha256, size)
        self._generation += 1
        self._active[path] = self._generation
        return PartialWriter(self, path, safe_filename(filename), kind, sha256, size, offset, self._generation,
                             provenance)

    def _release(self, writer: PartialWriter) -> None:
        if self._active.get(writer.path) == writer.generation:
            del self._active[writer.path]

    def clean_stale(self, now: float | None = None) -> list[Path]:
        """Remove upload temp files older than ``stale_after_s`` (run at controller start)."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        try:
            entries = list(self.dir.iterdir())
        except FileNotFoundError:
            return removed
        for p in entries:
            if not p.name.startswith(TEMP_PREFIXES) or p in self._active:
                continue
            try:
                if now - p.stat().st_mtime > self.stale_after_s:
                    p.unlink()
                    removed.append(p)
            except OSError:
                continue  # gone meanwhile, or not ours to remove: leave it
        if removed:
            log.info("removed %d stale upload temp file(s) older than %.0f h from %s", len(removed),
                     self.stale_after_s / 3600, self.dir)
        return removed
