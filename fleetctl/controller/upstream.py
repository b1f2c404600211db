"""The controller's one seam to the outside world for artifacts: release wheels, sdists and dependency wheels.

Nodes download only from the controller (``FetchArtifact``); the controller gets what a plan needs from
*upstream* into its content-addressed artifact store (controller/artifacts.py) and hands nodes sha256
addresses. Three sources, all configurable (``fleet-controller serve --upstream-index URL --wheel-mirror URL
--offline``; docs/rollout.md "Artifacts and upstreams"):

* **release wheels** — the catalog's URL (GitHub releases of Dao-AILab/flash-attention). ``--wheel-mirror URL``
  replaces ``https://github.com/Dao-AILab/flash-attention/releases/download``: the mirror is asked for
  ``URL/v2.8.3/FILE`` first, then ``URL/FILE`` (a flat folder of wheels);
* **sdists** — from the index's project page (PEP 503 simple API), with the page's ``#sha256=`` checked;
* **dependency closures** — the wheels an install needs besides flash-attn, resolved by pip itself
  (``pip download --only-binary=:all:`` for the *node's* interpreter and platform, not the controller's).
  torch is never fetched: a stub ``torch`` wheel of the node's exact torch version, with no dependencies,
  stands in for the node's own torch, so the resolver accepts it and pulls none of torch's CUDA libraries.
  The store itself is tried first as the only source (``--no-index --find-links``): an air-gapped
  controller filled by ``fleetctl bundle import`` resolves closures without any network.

Integrity: a digest the catalog or the index gives is checked before a file enters the store; a file name
fetched again with other content is refused (upstream changed a released file); everything in the store is
addressed by sha256 from then on. Provenance: what the controller fetches is recorded as ``upstream`` with
its URL (``Provenance.upstream``), and only *vouched-for* files (``artifacts.VOUCHED``: fetched by the
controller, added by an operator or imported from a bundle) are ever taken from the store by name or offered
to pip — never a file an agent uploaded (docs/security.md "Artifacts and provenance").

``--offline`` (or no index) makes every missing file an error that names the command that fixes it, never a
silent network attempt.

Errors are ``UpstreamError``: what was asked, from where, what came back, and what to do.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html.parser
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetctl.controller.artifacts import VOUCHED, ArtifactInfo, ArtifactStore, Provenance
from fleetctl.controller.resolver import rules
from fleetctl.fleet.errors import FleetError, UpstreamError
from fleetctl.fleet.facts import NodeFacts

log = logging.getLogger(__name__)

DEFAULT_INDEX_URL = "https://pypi.org/simple"
GITHUB_RELEASES = "https://github.com/Dao-AILab/flash-attention/releases/download"
_CHUNK = 1 << 20
_NAME_NORMALIZE_RE = re.compile(r"[-_.]+")
#: the oldest manylinux glibc pip knows; tags from here up to the node's glibc are compatible with it
_MANYLINUX_FLOOR = 17


def normalize(name: str) -> str:
    """PEP 503 project name normalisation (``Flash_Attn`` → ``flash-attn``)."""
    return _NAME_NORMALIZE_RE.sub("-", name).lower()


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the controller may fetch from. ``index_url=None`` or ``offline``: the store is the only source."""

    index_url: str | None = DEFAULT_INDEX_URL
    wheel_mirror: str | None = None
    offline: bool = False
    timeout_s: float = 60.0

    @property
    def can_fetch(self) -> bool:
        return not self.offline

    def release_urls(self, url: str, filename: str) -> list[str]:
        """Where a catalog release wheel is fetched from, in order (the mirror replaces GitHub)."""
        if self.wheel_mirror and url.startswith(GITHUB_RELEASES + "/"):
            rest = url[len(GITHUB_RELEASES) + 1:]
            base = self.wheel_mirror.rstrip("/")
            return [f"{base}/{rest}", f"{base}/{filename}"]
        return [url]

    def describe(self) -> str:
        if self.offline:
            return "offline (artifact store only)"
        index = self.index_url or "no index"
        return f"index {index}" + (f", wheel mirror {self.wheel_mirror}" if self.wheel_mirror else "")


@dataclass(frozen=True)
class TargetEnv:
    """The node's interpreter and platform as pip's resolver needs them (never the controller's own)."""

    python: str  # "3.12"
    arch: str  # "x86_64"
    glibc: str | None  # "2.35"; None: assume the manylinux floor
    torch: str | None  # "2.11.0+cu130": the stub pins exactly this

    @staticmethod
    def from_facts(facts: NodeFacts) -> TargetEnv:
        mm = rules.major_minor(facts.python.version)
        return TargetEnv(python=f"{mm[0]}.{mm[1]}", arch=facts.os.arch, glibc=facts.os.glibc,
                         torch=facts.torch.version if facts.torch else None)

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def platforms(self) -> list[str]:
        """manylinux_2_17 … manylinux_2_<glibc> plus the legacy aliases and plain linux, for this arch."""
        top = _MANYLINUX_FLOOR
        if self.glibc:
            with contextlib.suppress(ValueError):
                major, minor = (int(x) for x in self.glibc.split(".")[:2])
                top = minor if major == 2 else top
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(max(top, _MANYLINUX_FLOOR), _MANYLINUX_FLOOR - 1, -1)]
        tags += [f"manylinux2014_{self.arch}", f"linux_{self.arch}"]
        return tags

    def key(self) -> str:
        return f"{self.abi}-{self.arch}-glibc{self.glibc or '?'}-torch{self.torch or 'none'}"


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None


class _LinkParser(html.parser.HTMLParser):
    """The ``<a href>`` links of a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def write_wheel(dest: Path, name: str, version: str, *, files: Mapping[str, str] | None = None,
                requires: Sequence[str] = (), tag: str = "py3-none-any", file_version: str | None = None) -> Path:
    """A minimal PEP 427 wheel (METADATA with ``Requires-Dist``, WHEEL, RECORD, ``files``); ``file_version`` puts
    another version in the file name only, as flash-attn's release wheels do (``2.8.3+cu12torch…``)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                for r in requires)
    entries = {**(files or {}), f"{info}/METADATA": meta,
               f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: fleetctl\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    buf = io.BytesIO()
    record = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in entries.items():
            data = text.encode()
            zf.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        zf.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    out = dest / f"{dist}-{file_version or version}-{tag}.whl"
    out.write_bytes(buf.getvalue())
    return out


def stub_wheel(dest: Path, name: str, version: str) -> Path:
    """A dependency-free placeholder wheel: stands in for the node's own ``name`` (torch) during resolution."""
    return write_wheel(dest, name, version)


class Upstream:
    """Fetches into the artifact store; see the module docstring. Thread-safe: one fetch per file at a time."""

    def __init__(self, config: UpstreamConfig, artifacts: ArtifactStore, *,
                 pip: Sequence[str] = (sys.executable, "-m", "pip")) -> None:
        self.config = config
        self.artifacts = artifacts
        self.pip = tuple(pip)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ---- the store first ---------------------------------------------------------------------

    def stored(self, filename: str, sha256: str | None = None) -> ArtifactInfo | None:
        """The vouched-for stored artifact with this digest, else with this file name (newest first). A file
        an agent uploaded (or of unknown provenance) is never returned, whatever its name: fetching the
        same bytes from upstream adds the ``upstream`` provenance it lacks."""
        if sha256:
            try:
                found = self.artifacts.get(sha256)
                if found.vouched:
                    return found
            except FleetError:
                pass
        for info in sorted(self.artifacts.find(filename, sources=VOUCHED), key=lambda a: a.created, reverse=True):
            if self.artifacts.path_for(info.sha256).is_file():
                return info
        return None

    # ---- single files -----------------------------------------------------------------------

    def fetch_file(self, urls: Sequence[str], filename: str, kind: str, *,
                   expected_sha256: str | None = None) -> ArtifactInfo:
        """The file from the store, else downloaded from the first of ``urls`` that has it (digest checked)."""
        with self._lock(filename):
            found = self.stored(filename, expected_sha256)
            if found is not None and (expected_sha256 is None or found.sha256 == expected_sha256):
                return found
            if not self.config.can_fetch:
                raise UpstreamError(f"{filename} is not in the controller's artifact store and the controller is "
                                    f"offline", hint=self.offline_hint(filename))
            # a released file name never changes content: once fetched, later fetches must match (first seen wins)
            pinned = expected_sha256 or self._first_seen(filename, kind)
            errors: list[str] = []
            for url in urls:
                try:
                    return self._download(url, filename, kind, pinned)
                except _NotThere as exc:
                    errors.append(f"{url}: {exc}")
            raise UpstreamError(f"cannot fetch {filename}: {'; '.join(errors)}",
                                hint=f"check the upstream (or --wheel-mirror), or put the file in the store: "
                                     f"`fleetctl artifact add {filename}`")

    @staticmethod
    def offline_hint(filename: str) -> str:
        return (f"on a connected host: `fleetctl bundle export` and `fleetctl bundle import` here, or "
                f"`fleetctl artifact add {filename}`; or give the controller an index (--upstream-index)")

    def _download(self, url: str, filename: str, kind: str, expected_sha256: str | None) -> ArtifactInfo:
        log.info("fetching %s from %s", filename, url)
        try:
            resp = urllib.request.urlopen(url, timeout=self.config.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):
                raise _NotThere(f"HTTP {exc.code}") from None
            raise UpstreamError(f"cannot fetch {filename} from {url}: HTTP {exc.code} {exc.reason}",
                                hint="the upstream failed; try again later or use --wheel-mirror/--upstream-index"
                                ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UpstreamError(f"cannot fetch {filename} from {url}: {reason}",
                                hint="is the upstream reachable from the controller? (--upstream-index, "
                                     "--wheel-mirror, or --offline with `fleetctl bundle import`)") from None
        with resp:
            length = resp.headers.get("Content-Length")
            try:
                with self.artifacts.writer(filename, kind, provenance=Provenance.upstream(url),
                                           expected_sha256=expected_sha256,
                                           expected_size=int(length) if length and length.isdigit() else None) as w:
                    while chunk := resp.read(_CHUNK):
                        w.write(chunk)
                    info = w.commit()
            except FleetError as exc:
                raise UpstreamError(f"refused {filename} from {url}: {exc.message}",
                                    hint="the upstream sent other bytes than announced or than it sent before "
                                         "(corrupt, truncated, or a released file replaced upstream: find out why "
                                         "before trusting it); nothing was stored — fix the upstream, then retry"
                                    ) from None
            except (OSError, ValueError) as exc:  # http.client.IncompleteRead is a ValueError-free OSError subclass
                raise UpstreamError(f"download of {filename} from {url} broke off: {exc}",
                                    hint="nothing was stored; retry when the upstream is back") from None
        return info

    def _first_seen(self, filename: str, kind: str) -> str | None:
        """The digest this file name had when first stored (its file may have gone since): a re-fetch must bring
        the same bytes, else upstream was altered. Only vouched-for files count: a node's upload under that name
        must not pin (or block) the real file."""
        known = sorted((a for a in self.artifacts.find(filename, sources=VOUCHED) if a.kind == kind),
                       key=lambda a: a.created)
        return known[0].sha256 if known else None

    # ---- the index ----------------------------------------------------------------------------

    def index_files(self, project: str) -> list[IndexFile]:
        """The files a PEP 503 index lists for ``project`` (with their ``#sha256=`` when given)."""
        if not self.config.index_url or not self.config.can_fetch:
            raise UpstreamError(f"no package index to look {project} up in (controller {self.config.describe()})",
                                hint=self.offline_hint(project))
        page = f"{self.config.index_url.rstrip('/')}/{normalize(project)}/"
        try:
            req = urllib.request.Request(page, headers={"Accept": "text/html"})
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                text = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise UpstreamError(f"the index has no project {project} ({page}: HTTP {exc.code})",
                                hint="check --upstream-index") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UpstreamError(f"cannot read the index page {page}: {getattr(exc, 'reason', exc)}",
                                hint="is the index reachable from the controller? (--upstream-index)") from None
        parser = _LinkParser()
        parser.feed(text)
        out = []
        for href, label in parser.links:
            url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
            name = label or urllib.parse.unquote(url.rsplit("/", 1)[-1])
            sha = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
            out.append(IndexFile(name, url, sha))
        return out

    def sdist(self, project: str, version: str) -> ArtifactInfo:
        """``project``'s sdist of ``version`` (``flash_attn-2.8.3.tar.gz``), from the store or the index."""
        names = [f"{n}-{version}.tar.gz" for n in dict.fromkeys((project.replace("-", "_"), normalize(project)))]
        for name in names:
            found = self.stored(name)
            if found is not None:
                return found
        if not self.config.can_fetch or not self.config.index_url:
            raise UpstreamError(f"the {project} {version} sdist ({names[0]}) is not in the controller's artifact "
                                f"store and the controller is {self.config.describe()}",
                                hint=self.offline_hint(names[0]))
        wanted = {n.lower() for n in names}
        for f in self.index_files(project):
            if f.filename.lower() in wanted:
                return self.fetch_file([f.url], f.filename, "sdist", expected_sha256=f.sha256)
        raise UpstreamError(f"the index {self.config.index_url} lists no sdist {names[0]}",
                            hint=f"check the version, or put the file in the store: `fleetctl artifact add "
                                 f"{names[0]}`")

    # ---- dependency closures -------------------------------------------------------------------

    def closure(self, requirements: Sequence[str], env: TargetEnv, *, local: Sequence[ArtifactInfo] = ()) \
            -> list[ArtifactInfo]:
        """Every wheel ``requirements`` need on a node of ``env`` (themselves included), stored, torch excluded.

        ``local``: stored wheels to offer pip by path (e.g. the flash-attn wheel being installed). The store
        alone is tried first; then, when allowed, the index too."""
        key = f"closure:{env.key()}:{'|'.join(requirements)}"
        with self._lock(key), tempfile.TemporaryDirectory(prefix="fleet-closure-") as tmp:
            work = Path(tmp)
            links = work / "links"
            links.mkdir()
            if env.torch:
                stub_wheel(links, "torch", env.torch)
            self._link_store_wheels(links, local)
            attempts: list[tuple[str, list[str]]] = [("the artifact store", ["--no-index"])]
            if self.config.can_fetch and self.config.index_url:
                attempts.append((f"the index {self.config.index_url}", ["--index-url", self.config.index_url]))
            failures: list[str] = []
            for where, source in attempts:
                dest = work / f"dl-{len(failures)}"
                proc = self._pip_download(requirements, env, links, dest, source)
                if proc.returncode == 0:
                    return self._store_downloads(dest, where, links)
                failures.append(f"from {where}: {_pip_error(proc.stdout + proc.stderr)}")
            hint = ("check the requirement and the index" if len(attempts) > 1 else
                    "the controller is offline: on a connected host `fleetctl bundle export`, then `fleetctl bundle "
                    "import` here (or give the controller --upstream-index)")
            raise UpstreamError(f"cannot resolve {' '.join(requirements)} for {env.key()}: {'; '.join(failures)}",
                                hint=hint)

    def _link_store_wheels(self, links: Path, local: Sequence[ArtifactInfo]) -> None:
        """Offer pip every vouched-for stored wheel (and ``local``) under its own file name, without copying.
        Build outputs and files of unknown provenance are left out: pip would take one for any requirement
        its name matches, on any node."""
        seen = {p.name for p in links.iterdir()}
        infos = [*local, *(a for a in self.artifacts.list_all(sources=VOUCHED) if a.kind == "wheel")]
        for info in infos:
            if info.filename in seen or not info.filename.endswith(".whl"):
                continue
            src = self.artifacts.path_for(info.sha256)
            if src.is_file():
                os.symlink(src, links / info.filename)
                seen.add(info.filename)

    def _pip_download(self, requirements: Sequence[str], env: TargetEnv, links: Path, dest: Path,
                      source: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = [*self.pip, "download", "--disable-pip-version-check", "--no-cache-dir", "--quiet",
                "--only-binary=:all:", "--python-version", env.python, "--implementation", "cp",
                "--abi", env.abi, "--abi", "abi3", "--abi", "none",
                *(x for p in env.platforms() for x in ("--platform", p)),
                "--find-links", str(links), *source, "-d", str(dest), *requirements]
        if env.torch:
            argv.append(f"torch=={env.torch}")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # no site pip.conf surprises
        environ["PIP_CONFIG_FILE"] = os.devnull
        log.info("resolving %s for %s (%s)", " ".join(requirements), env.key(), " ".join(source))
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=environ,
                                  timeout=max(600.0, self.config.timeout_s * 10))
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 1, "", "pip download timed out")

    def _store_downloads(self, dest: Path, where: str, links: Path) -> list[ArtifactInfo]:
        """Store what pip downloaded. A file pip took from ``links`` is already in the store with its own
        provenance (never relabelled); one it got from the index is recorded as fetched from the index."""
        out = []
        for path in sorted(dest.iterdir()) if dest.is_dir() else []:
            if normalize(path.name.split("-", 1)[0]) == "torch":
                continue  # the stub: the node keeps its own torch
            linked = links / path.name
            if linked.is_symlink() and linked.resolve().name == _file_sha256(path):  # store paths end in the sha
                out.append(self.artifacts.get(linked.resolve().name))
                continue
            out.append(self.artifacts.put_file(path, kind="wheel",
                                               provenance=Provenance.upstream(self.config.index_url or where)))
        log.info("resolved %d wheel(s) from %s", len(out), where)
        return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


class _NotThere(Exception):
    """This URL does not have the file (404/403/410): try the next one."""


def _pip_error(output: str) -> str:
    """The line of pip's output that says what went wrong."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and "WARNING" not in ln]
    if any("DO NOT MATCH THE HASHES" in ln for ln in lines):
        # pip's headline names no file: the lines after it do ("NAME from URL:", "Expected sha256 X", "Got Y")
        files = [urllib.parse.unquote(ln.rstrip(":").rsplit("/", 1)[-1].partition("#")[0]) for ln in lines
                 if " from " in ln and ln.endswith(":")]
        want = [ln.split()[-1] for ln in lines if ln.startswith("Expected sha256")]
        got = [ln.split()[-1] for ln in lines if ln.startswith("Got")]
        if files and want and got:
            return (f"sha256 mismatch for {files[0]}: the index advertises {want[0]}, the file has {got[0]}; "
                    f"refused, nothing stored")[:500]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    text = (errors or lines or ["pip download failed"])[-1]
    return text[:500]


def wheel_requires(path: Path) -> list[str]:
    """A wheel's ``Requires-Dist`` lines (markers kept) from its METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if meta is None:
            return []
        text = zf.read(meta).decode("utf-8", "replace")
    return [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
