"""Content-addressed artifact store: files under ``STATE/artifacts/sha256/<2 hex>/<sha256>``.

Metadata (filename, kind, size, created) lives in the ``artifacts`` table. Files are
written to a temporary file in the same directory, hashed while streaming, checked against
the size limit and the expected digest, then renamed into place (atomic; a file that is
already there is kept: same content). Agents reach it through the ``FetchArtifact`` and
``UploadArtifact`` RPCs (mutual TLS, see controller/server.py); the controller's own code
calls ``ArtifactStore`` directly::

    arts = ArtifactStore(state_dir / "artifacts", store)
    info = arts.put_file(Path("flash_attn-...whl"), kind="wheel")
    with arts.writer("x.whl", "wheel") as w:   # streaming
        w.write(chunk); ...
    info = w.info                              # set when the block ends without error
    for chunk in arts.iter_chunks(info.sha256): ...
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import select

from controller.store import Store, utcnow
from controller.store.models import Artifact
from fleet.errors import ConflictError, InputError, NotFoundError

KINDS = ("wheel", "sdist", "apt-key", "other")
DEFAULT_MAX_BYTES = 4 * 1024**3  # a flash-attn wheel is ~60-400 MB; 4 GiB bounds a bad upload
CHUNK_SIZE = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


@dataclass(frozen=True)
class ArtifactInfo:
    sha256: str
    filename: str
    kind: str
    size: int
    created: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "filename": self.filename, "kind": self.kind, "size": self.size,
                "created": self.created.isoformat()}


def safe_filename(name: str) -> str:
    """The file name an artifact may carry: a plain base name, no path, no leading dot."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base != name or not _SAFE_NAME_RE.match(base) or base in (".", ".."):
        raise InputError(f"unsafe artifact file name {name!r}",
                         hint="use a plain file name of letters, digits and . _ + - (no directories)")
    return base


def check_sha256(value: str) -> str:
    if not SHA256_RE.match(value):
        raise InputError(f"{value!r} is not a sha256 digest", hint="give 64 lowercase hex digits")
    return value


def _info(row: Artifact) -> ArtifactInfo:
    return ArtifactInfo(sha256=row.sha256, filename=row.filename, kind=row.kind, size=row.size, created=row.created)


class ArtifactWriter:
    """Streams one upload into the store; use as a context manager (aborts on error)."""

    def __init__(self, owner: ArtifactStore, filename: str, kind: str, expected_sha256: str | None,
                 expected_size: int | None) -> None:
        self._owner = owner
        self.filename = safe_filename(filename)
        if kind not in KINDS:
            raise InputError(f"unknown artifact kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
        self.kind = kind
        self.expected_sha256 = check_sha256(expected_sha256) if expected_sha256 else None
        if expected_size is not None and expected_size > owner.max_bytes:
            raise InputError(f"artifact of {expected_size} bytes exceeds the limit of {owner.max_bytes}",
                             hint="raise the controller's artifact size limit or use a smaller file")
        self.expected_size = expected_size
        tmp_dir = owner.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.info: ArtifactInfo | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._owner.max_bytes:
            raise InputError(f"artifact exceeds the limit of {self._owner.max_bytes} bytes",
                             hint="raise the controller's artifact size limit or use a smaller file")
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> ArtifactInfo:
        self._file.close()
        digest = self._hash.hexdigest()
        if self.expected_sha256 and digest != self.expected_sha256:
            self.abort()
            raise InputError(f"artifact content has sha256 {digest}, not the announced {self.expected_sha256}",
                             hint="the upload was corrupted or the digest is wrong; upload again")
        if self.expected_size is not None and self.size != self.expected_size:
            self.abort()
            raise InputError(f"artifact has {self.size} bytes, not the announced {self.expected_size}",
                             hint="the upload was cut short; upload again")
        self.info = self._owner._adopt(self._tmp, digest, self.filename, self.kind, self.size)
        return self.info

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            if self.info is None:
                self.commit()
        else:
            self.abort()


class ArtifactStore:
    """Artifacts on disk plus their rows in the store."""

    def __init__(self, root: Path, store: Store, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def writer(self, filename: str, kind: str = "other", *, expected_sha256: str | None = None,
               expected_size: int | None = None) -> ArtifactWriter:
        """Start a streaming upload; ``commit()`` (or leaving the ``with`` block) stores it."""
        return ArtifactWriter(self, filename, kind, expected_sha256, expected_size)

    def put_bytes(self, data: bytes, filename: str, kind: str = "other") -> ArtifactInfo:
        with self.writer(filename, kind) as w:
            w.write(data)
        assert w.info is not None
        return w.info

    def put_file(self, src: Path, kind: str = "other", filename: str | None = None) -> ArtifactInfo:
        try:
            with self.writer(filename or src.name, kind) as w, src.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    w.write(chunk)
        except OSError as exc:
            raise InputError(f"cannot read {src}: {exc.strerror}", hint="check the path") from exc
        assert w.info is not None
        return w.info

    def _adopt(self, tmp: Path, digest: str, filename: str, kind: str, size: int) -> ArtifactInfo:
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
            os.chmod(final, 0o644)
        with self.store.session() as s:
            row = s.get(Artifact, digest)
            if row is None:
                row = Artifact(sha256=digest, filename=filename, kind=kind, size=size, created=utcnow())
                s.add(row)
            elif row.size != size:
                raise ConflictError(f"artifact {digest} already stored with a different size",
                                    hint="the artifact store is corrupt; remove the file and upload again")
            return _info(row)

    def get(self, sha256: str) -> ArtifactInfo:
        """Metadata of a stored artifact; ``NotFoundError`` if unknown or its file is missing."""
        check_sha256(sha256)
        with self.store.session() as s:
            row = s.get(Artifact, sha256)
            info = _info(row) if row is not None else None
        if info is None or not self.path_for(sha256).is_file():
            raise NotFoundError(f"no artifact with sha256 {sha256}",
                                hint="upload it first (UploadArtifact) or check the digest")
        return info

    def find(self, filename: str) -> list[ArtifactInfo]:
        with self.store.session() as s:
            return [_info(r) for r in s.scalars(select(Artifact).where(Artifact.filename == filename))]

    def list_all(self) -> list[ArtifactInfo]:
        with self.store.session() as s:
            return [_info(r) for r in s.scalars(select(Artifact).order_by(Artifact.created))]

    def iter_chunks(self, sha256: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The artifact's content in chunks (raises ``NotFoundError`` before the first one)."""
        path = self.path_for(sha256)
        self.get(sha256)
        with path.open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
