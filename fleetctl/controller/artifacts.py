"""Content-addressed artifact store: files under ``STATE/artifacts/sha256/<2 hex>/<sha256>``.

Metadata (filename, kind, size, created) lives in the ``artifacts`` table, and where each file came from
(its ``Provenance``: an operator, an upstream URL, a build job, a bundle) in ``artifact_provenance``. Files are
written to a temporary file in the same directory, hashed while streaming, checked against
the size limit and the expected digest, then renamed into place (atomic; a file that is
already there is kept: same content). Agents reach it through the ``FetchArtifact`` and
``UploadArtifact`` RPCs (mutual TLS, see controller/server.py); the controller's own code
calls ``ArtifactStore`` directly::

    arts = ArtifactStore(state_dir / "artifacts", store)
    info = arts.put_file(Path("flash_attn-...whl"), kind="wheel", provenance=Provenance.upstream(url))
    with arts.writer("x.whl", "wheel", provenance=Provenance.user("admin")) as w:   # streaming
        w.write(chunk); ...
    info = w.info                              # set when the block ends without error
    for chunk in arts.iter_chunks(info.sha256): ...

Several controllers on one PostgreSQL database (docs/ha.md, "What is shared"): the content of every artifact is
also a PostgreSQL large object (``LargeObjects``; its oid in ``artifact_content``), written in the transaction
that records the artifact's row, so no controller ever sees a row whose bytes it cannot get. A controller's
``STATE/artifacts`` is then its cache: ``path_for`` fetches an artifact it lacks from the database first (checked
against its sha256). Files stored before (a controller that ran on files) are copied into the database at start
(``publish_local``).

Provenance and trust (docs/security.md "Artifacts and provenance"). Every writer takes a ``Provenance``;
the same bytes stored again from another origin add a row (content-addressed: the file is the same). A file
is *vouched for* when an operator added it (``user``), the controller fetched it itself (``upstream``) or an
operator imported it from a bundle (``bundle``): anyone may be given it. A ``build`` output is trusted only
as the wheel of the build key it was built for, once that build succeeded (controller/local_wheels.py, the
rollout engine); ``legacy`` (stored before provenance existed) is trusted for nothing. Lookups that choose
a file by name (``find(..., sources=VOUCHED)``) see only what they may trust, so a node that uploads a file
named like an upstream one never has it chosen in its place.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Artifact, ArtifactContent, ArtifactProvenance
from fleetctl.fleet.errors import ConflictError, InputError, NotFoundError, StoreError

KINDS = ("wheel", "sdist", "apt-key", "agent", "other")  # agent: fleetctl and its dependencies, for nodes
DEFAULT_MAX_BYTES = 4 * 1024**3  # a flash-attn wheel is ~60-400 MB; 4 GiB bounds a bad upload
CHUNK_SIZE = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


class Source(enum.StrEnum):
    """Where a stored artifact came from."""

    USER = "user"  # added by an authenticated admin/operator through the HTTP API (ref: the actor)
    UPSTREAM = "upstream"  # fetched by the controller itself (ref: the URL)
    BUILD = "build"  # uploaded by the agent that ran a build-from-source job (ref: the job id)
    BUNDLE = "bundle"  # imported by an operator from a `fleetctl bundle` (ref: the sha256 of its lock.json)
    LEGACY = "legacy"  # stored before provenance was recorded: unknown


#: sources a file may be handed to any node from: an operator vouched for it or the controller fetched it
VOUCHED: frozenset[Source] = frozenset({Source.USER, Source.UPSTREAM, Source.BUNDLE})
#: most trusted first: the provenance ``ArtifactInfo.provenance`` shows when a file has several
_RANK = {Source.USER: 0, Source.BUNDLE: 1, Source.UPSTREAM: 2, Source.BUILD: 3, Source.LEGACY: 4}


@dataclass(frozen=True)
class Provenance:
    """One origin of an artifact: its ``source``, the reference that names it (``ref``) and details."""

    source: Source
    ref: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def user(actor: str, **detail: Any) -> Provenance:
        return Provenance(Source.USER, actor, detail)

    @staticmethod
    def upstream(url: str) -> Provenance:
        return Provenance(Source.UPSTREAM, url)

    @staticmethod
    def build(job_id: str, build_key: str, node: str) -> Provenance:
        return Provenance(Source.BUILD, job_id, {"build_key": build_key, "node": node})

    @staticmethod
    def bundle(lock_sha256: str, actor: str, bundle: str = "") -> Provenance:
        return Provenance(Source.BUNDLE, lock_sha256, {"actor": actor, **({"bundle": bundle} if bundle else {})})

    @property
    def vouched(self) -> bool:
        return self.source in VOUCHED

    @property
    def build_key(self) -> str | None:
        key = self.detail.get("build_key") if self.source == Source.BUILD else None
        return key if isinstance(key, str) else None

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "ref": self.ref, **dict(self.detail)}

    def describe(self) -> str:
        """One short phrase for a table column: ``user admin``, ``build job-… (node-1)``."""
        if self.source == Source.BUILD:
            return f"build {self.ref} ({self.detail.get('node', '?')})"
        return f"{self.source} {self.ref}".strip()


def trusted_for(provenance: Iterable[Provenance], build_key: str | None = None, *,
                legacy_build: bool = False) -> bool:
    """May this file be handed to a node? Vouched for: to anyone. A build output: only as the output of
    ``build_key`` (the caller has checked that build succeeded). ``legacy`` alone: never — except, with
    ``legacy_build``, as the recorded output of a build that succeeded before provenance was recorded (the
    build record is all there is; no new ``legacy`` row can appear since)."""
    return any(p.vouched or (build_key is not None and p.build_key == build_key)
               or (legacy_build and build_key is not None and p.source == Source.LEGACY) for p in provenance)


@dataclass(frozen=True)
class ArtifactInfo:
    sha256: str
    filename: str
    kind: str
    size: int
    created: dt.datetime
    sources: tuple[Provenance, ...] = ()  # most trusted first

    @property
    def provenance(self) -> Provenance:
        return self.sources[0] if self.sources else Provenance(Source.LEGACY)

    @property
    def vouched(self) -> bool:
        return any(p.vouched for p in self.sources)

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "filename": self.filename, "kind": self.kind, "size": self.size,
                "created": self.created.isoformat(), "source": str(self.provenance.source),
                "provenance": [p.to_json() for p in self.sources]}


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


def _provenance(row: ArtifactProvenance) -> Provenance:
    try:
        source = Source(row.source)
    except ValueError:  # written by a newer controller: trust nothing we do not know
        source = Source.LEGACY
    return Provenance(source, row.ref, dict(row.detail or {}))


def provenance_of(s: Session, shas: Collection[str] | None = None) -> dict[str, tuple[Provenance, ...]]:
    """Every recorded origin of these artifacts (all if ``shas`` is None), most trusted first."""
    q = select(ArtifactProvenance).order_by(ArtifactProvenance.id)
    if shas is not None:
        q = q.where(ArtifactProvenance.sha256.in_(list(shas)))
    out: dict[str, list[Provenance]] = {}
    for row in s.scalars(q):
        out.setdefault(row.sha256, []).append(_provenance(row))
    return {sha: tuple(sorted(ps, key=lambda p: _RANK[p.source])) for sha, ps in out.items()}


def _info(row: Artifact, sources: tuple[Provenance, ...] = ()) -> ArtifactInfo:
    return ArtifactInfo(sha256=row.sha256, filename=row.filename, kind=row.kind, size=row.size, created=row.created,
                        sources=sources)


def _infos(s: Session, rows: Iterable[Artifact]) -> list[ArtifactInfo]:
    rows = list(rows)
    prov = provenance_of(s, [r.sha256 for r in rows]) if rows else {}
    return [_info(r, prov.get(r.sha256, ())) for r in rows]


class ArtifactWriter:
    """Streams one upload into the store; use as a context manager (aborts on error)."""

    def __init__(self, owner: ArtifactStore, filename: str, kind: str, provenance: Provenance,
                 expected_sha256: str | None, expected_size: int | None) -> None:
        self._owner = owner
        self.provenance = provenance
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
        self._digest: str | None = None
        self.size = 0
        self.info: ArtifactInfo | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._owner.max_bytes:
            raise InputError(f"artifact exceeds the limit of {self._owner.max_bytes} bytes",
                             hint="raise the controller's artifact size limit or use a smaller file")
        self._hash.update(data)
        self._file.write(data)

    def seal(self) -> Path:
        """Close the upload and check the announced sha256 and size; returns the complete (not yet stored) file,
        e.g. to verify a detached signature over it before ``commit()``. Idempotent."""
        if self._digest is not None:
            return self._tmp
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
        self._digest = digest
        return self._tmp

    @property
    def sha256(self) -> str | None:
        """The file's sha256 once ``seal()``-ed."""
        return self._digest

    def commit(self) -> ArtifactInfo:
        self.seal()
        assert self._digest is not None
        self.info = self._owner._adopt(self._tmp, self._digest, self.filename, self.kind, self.size,
                                       self.provenance)
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


class LargeObjects:
    """Artifact content as PostgreSQL large objects, reachable by every controller of the database.

    Why the database and not a shared directory: PostgreSQL is already the one thing every controller reaches, its
    transactions make a row and its bytes appear together, and its backup holds both; a shared directory (NFS)
    would be a second system to run, mount, lock and back up in step with the database. The limits (docs/ha.md):
    the database grows by every stored file (``DEFAULT_MAX_BYTES`` each), a file crosses the database once per
    controller that serves it (then from the cache), and ``pg_dump`` includes large objects unless told not to."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def write(self, s: Session, sha256: str, path: Path) -> None:
        """Store ``path``'s bytes for ``sha256`` in this unit of work, unless the database has them already."""
        if s.get(ArtifactContent, sha256) is not None:
            return
        oid = s.scalar(text("SELECT lo_create(0)"))
        offset = 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                s.execute(text("SELECT lo_put(CAST(:oid AS oid), CAST(:offset AS bigint), :data)"),
                          {"oid": oid, "offset": offset, "data": chunk})
                offset += len(chunk)
        s.add(ArtifactContent(sha256=sha256, oid=oid, created=utcnow()))
        s.flush()

    def fetch(self, sha256: str, dest: Path, tmp_dir: Path) -> bool:
        """Copy the bytes of ``sha256`` to ``dest`` (through a temporary file, checked against the digest);
        False when the database has none."""
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with self.store.session() as s:
            oid = s.scalar(select(ArtifactContent.oid).where(ArtifactContent.sha256 == sha256))
            if oid is None:
                return False
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="fetch-")
            digest, offset = hashlib.sha256(), 0
            try:
                with os.fdopen(fd, "wb") as f:
                    while chunk := s.scalar(text("SELECT lo_get(CAST(:oid AS oid), CAST(:offset AS bigint), :n)"),
                                            {"oid": oid, "offset": offset, "n": CHUNK_SIZE}):
                        f.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                if digest.hexdigest() != sha256:
                    raise StoreError(f"the database's copy of artifact {sha256} has sha256 {digest.hexdigest()}",
                                     hint="the large object was altered; add the file again from its source")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(name, dest)
                os.chmod(dest, 0o644)
            finally:
                Path(name).unlink(missing_ok=True)
        return True


class ArtifactStore:
    """Artifacts on disk plus their rows in the store; with ``shared`` (PostgreSQL), the disk is this controller's
    cache of the database's large objects."""

    def __init__(self, root: Path, store: Store, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 shared: LargeObjects | None = None) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        self.shared = shared
        root.mkdir(parents=True, exist_ok=True)

    def _cache_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def path_for(self, sha256: str) -> Path:
        """The artifact's file on this controller; on a shared store, fetched from the database first when this
        controller lacks it. The path does not exist when no controller stored the artifact."""
        path = self._cache_path(sha256)
        if self.shared is not None and not path.is_file():
            try:
                self.shared.fetch(sha256, path, self.root / "tmp")
            except OSError as exc:
                raise StoreError(f"cannot copy artifact {sha256} from the database into {path}: {exc.strerror}",
                                 hint="check the controller's state dir (permissions, disk)") from exc
        return path

    def publish_local(self) -> int:
        """Copy into the database every artifact whose bytes only this controller has (stored before the store
        was shared); returns how many. Runs at start on PostgreSQL."""
        assert self.shared is not None
        with self.store.session() as s:
            missing = list(s.scalars(select(Artifact.sha256).where(
                Artifact.sha256.not_in(select(ArtifactContent.sha256)))))
        published = 0
        for sha in missing:
            path = self._cache_path(sha)
            if path.is_file():
                with self.store.session() as s:
                    self.shared.write(s, sha, path)
                published += 1
        return published

    def writer(self, filename: str, kind: str = "other", *, provenance: Provenance,
               expected_sha256: str | None = None, expected_size: int | None = None) -> ArtifactWriter:
        """Start a streaming upload; ``commit()`` (or leaving the ``with`` block) stores it with ``provenance``."""
        return ArtifactWriter(self, filename, kind, provenance, expected_sha256, expected_size)

    def put_bytes(self, data: bytes, filename: str, kind: str = "other", *, provenance: Provenance) -> ArtifactInfo:
        with self.writer(filename, kind, provenance=provenance) as w:
            w.write(data)
        assert w.info is not None
        return w.info

    def put_file(self, src: Path, kind: str = "other", filename: str | None = None, *,
                 provenance: Provenance) -> ArtifactInfo:
        try:
            with self.writer(filename or src.name, kind, provenance=provenance) as w, src.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    w.write(chunk)
        except OSError as exc:
            raise InputError(f"cannot read {src}: {exc.strerror}", hint="check the path") from exc
        assert w.info is not None
        return w.info

    def _adopt(self, tmp: Path, digest: str, filename: str, kind: str, size: int,
               provenance: Provenance) -> ArtifactInfo:
        final = self._cache_path(digest)
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
                s.flush()
            elif row.size != size:
                raise ConflictError(f"artifact {digest} already stored with a different size",
                                    hint="the artifact store is corrupt; remove the file and upload again")
            if self.shared is not None:  # the bytes with the row: every controller can serve it from now on
                self.shared.write(s, digest, final)
            known = [d or {} for d in s.scalars(select(ArtifactProvenance.detail).where(
                ArtifactProvenance.sha256 == digest, ArtifactProvenance.source == str(provenance.source),
                ArtifactProvenance.ref == provenance.ref[:2048]))]
            # same bytes from another origin (or the same one with other details, e.g. now signed): one more
            # row, the file stays
            if dict(provenance.detail) not in known:
                s.add(ArtifactProvenance(sha256=digest, source=str(provenance.source), ref=provenance.ref[:2048],
                                         detail=dict(provenance.detail), created=utcnow()))
                s.flush()
            return _infos(s, [row])[0]

    def get(self, sha256: str) -> ArtifactInfo:
        """Metadata of a stored artifact; ``NotFoundError`` if unknown or its file is missing."""
        check_sha256(sha256)
        with self.store.session() as s:
            row = s.get(Artifact, sha256)
            info = _infos(s, [row])[0] if row is not None else None
        if info is None or not self.path_for(sha256).is_file():
            raise NotFoundError(f"no artifact with sha256 {sha256}",
                                hint="upload it first (UploadArtifact) or check the digest")
        return info

    def find(self, filename: str, *, sources: Collection[Source] | None = None) -> list[ArtifactInfo]:
        """Artifacts stored under ``filename``; with ``sources``, only those with an origin among them
        (``VOUCHED``: what may be chosen by name for any node)."""
        with self.store.session() as s:
            found = _infos(s, s.scalars(select(Artifact).where(Artifact.filename == filename)))
        return found if sources is None else [a for a in found if any(p.source in sources for p in a.sources)]

    def list_all(self, *, sources: Collection[Source] | None = None) -> list[ArtifactInfo]:
        with self.store.session() as s:
            found = _infos(s, s.scalars(select(Artifact).order_by(Artifact.created)))
        return found if sources is None else [a for a in found if any(p.source in sources for p in a.sources)]

    def uploaded_by_job(self, job_id: str) -> ArtifactInfo | None:
        """The artifact a build job's agent uploaded, if any (at most one per job: controller/build_uploads.py)."""
        with self.store.session() as s:
            sha = s.scalar(select(ArtifactProvenance.sha256).where(
                ArtifactProvenance.source == str(Source.BUILD), ArtifactProvenance.ref == job_id).limit(1))
            row = s.get(Artifact, sha) if sha else None
            return _infos(s, [row])[0] if row is not None else None

    def iter_chunks(self, sha256: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The artifact's content in chunks (raises ``NotFoundError`` before the first one)."""
        path = self.path_for(sha256)
        self.get(sha256)
        with path.open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
