"""A local HTTP server that plays fleetctl's upstreams, and the stand-in package universes it serves.

``FakeUpstream`` is a real ``ThreadingHTTPServer`` on 127.0.0.1 (random port) serving a directory
it owns, laid out as the two upstreams the controller fetches from:

- a PyPI-compatible simple index (PEP 503 HTML, and PEP 691 JSON when the client asks for it in
  ``Accept``, as pip does): ``/simple/`` lists the projects, ``/simple/<normalized-name>/`` links
  ``../../files/<file>#sha256=<hex>`` with ``data-requires-python``; a non-normalized project name
  is redirected (301) to the normalized one, as PyPI does;
- GitHub release assets: ``/releases/download/v<version>/<filename>`` (Dao-AILab/flash-attention's
  layout, ``releases_url`` stands for ``https://github.com/Dao-AILab/flash-attention/releases/download``).

Every response carries ``Cache-Control: no-store`` so pip's HTTP cache never hides a fault switched
on later in a test. Faults are switched per file name (the last path segment, so a project page can
fail too: ``fail("einops", "500")``) at run time, for all requests or the next ``times`` ones:
``404``, ``500``, ``truncate`` (headers announce the full Content-Length, half the body is sent, the
connection is closed; a resumed download, ``Range: bytes=N-`` as pip sends, is answered 206 and is cut too
while the fault lasts), ``corrupt`` (the announced length, other bytes), ``hang`` (no answer until
``hang_s`` passes, ``down()`` or ``close()``: never blocks the server's shutdown). ``down()`` really
closes the listening socket (clients get ECONNREFUSED), ``up()`` listens again on the same port.
``requests`` is the (method, path) log of every request received, faulted ones included.

The universes (``fa2_universe``, ``fa1_universe``, ``fa4_universe``) are stand-ins: small pure-Python
wheels written with wheels.py's ``wheel_bytes`` (real PEP 427 zips with METADATA Requires-Dist, so
real pip resolves and installs them) and wheels.py's stand-in sdists (an in-tree backend that "builds"
in well under a second). What is faithful to upstream: file names (release wheels carry the local
version ``+cu12torch2.11cxx11abiTRUE`` in the file name only, the METADATA says ``2.8.3``, exactly as
upstream renames its wheels after building), wheel tags, the Requires-Dist of flash-attn 2 and of
flash-attn-4 (extras included), and flash-attn-4's layout (``flash_attn/cute/`` only, no
``flash_attn/__init__.py``: ``flash_attn`` is a namespace package). What is not: the code (no CUDA,
no kernels; each distribution has its own small module, see ``MODULES``), the dependencies' own
Requires-Dist (trimmed to this closure), the versions of the dependencies, and the sdists' built
wheels (wheels.py's backend: Requires-Dist torch only, tagged cp311-cp311-linux_x86_64). ``fa4_universe``
publishes ``nvidia-cutlass-dsl-libs-*`` as platform wheels (x86_64 and aarch64, per Python tag) and a
decoy ``apache-tvm-ffi 0.2.0`` outside flash-attn-4's ``<0.2`` bound; ``fa4_closure()`` names the files a
correct resolution for a given Python/platform fetches. Python tags default to cp312, cp311 and
``local_python_tag()`` (the tests' interpreter), so one wheel of each kind installs on this machine.

The stand-in torch (``torch_wheel``) is never in the index: fleetctl never fetches torch, the node
has it; tests pre-install it into the target venv or pass its directory as ``--find-links``.

``pip_env()`` is the environment to run pip with in tests: this machine's pip configuration
(find-links, extra index URLs, constraints in /etc and PIP_* variables) is switched off, so only
the fake upstream is seen; ``run_pip(..., python=VENV_PY)`` runs this venv's pip with it, acting on
another interpreter's environment (``pip --python``). ``make_venv()`` makes a venv ``--without-pip``
(0.1 s, against seconds with pip). ``pip_wheel()`` is the pip wheel bundled with ensurepip: running
``<python> <pip.whl>/pip install …`` installs into ``<python>``'s environment without installing pip,
the way into a venv made ``--without-pip``.
"""

from __future__ import annotations

import contextlib
import ensurepip
import html
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast, get_args

from tests.integration.harness.wheels import build_sdist, sha256_file, wheel_bytes

FaultKind = Literal["404", "500", "truncate", "corrupt", "hang"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
PEP691_JSON = "application/vnd.pypi.simple.v1+json"
WHEEL_PLATFORM = "linux_x86_64"
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")

#: Distribution → the module its stand-in installs (import it to check an install).
MODULES: dict[str, str] = {
    "flash-attn": "flash_attn",
    "flash-attn-4": "flash_attn.cute",
    "einops": "einops",
    "typing-extensions": "typing_extensions",
    "nvidia-cutlass-dsl": "cutlass",
    "nvidia-cutlass-dsl-libs-base": "nvidia_cutlass_dsl_libs_base",
    "nvidia-cutlass-dsl-libs-cu13": "nvidia_cutlass_dsl_libs_cu13",
    "apache-tvm-ffi": "tvm_ffi",
    "torch-c-dlpack-ext": "torch_c_dlpack_ext",
    "quack-kernels": "quack",
    "torch": "torch",
}

EINOPS_VERSION = "0.8.1"
CUTLASS_DSL_VERSION = "4.6.2"
TVM_FFI_VERSION = "0.1.11"
TVM_FFI_DECOY_VERSION = "0.2.0"   # published too; excluded by flash-attn-4's apache-tvm-ffi<0.2
TORCH_STANDIN_VERSION = "2.11.0+cu130"

#: flash-attn-4's Requires-Dist, exactly as upstream declares it.
FA4_REQUIRES: tuple[str, ...] = (
    "nvidia-cutlass-dsl>=4.6.2",
    "torch",
    "einops",
    "typing_extensions",
    "apache-tvm-ffi<0.2,>=0.1.11",
    "torch-c-dlpack-ext",
    "quack-kernels>=0.5.3",
    'nvidia-cutlass-dsl[cu13]>=4.6.2; extra == "cu13"',
)


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_of(filename: str) -> str:
    """The normalized project name of a wheel or sdist file name."""
    if filename.endswith(".whl"):
        return normalize(filename.split("-")[0])
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            return normalize(filename[: -len(ext)].rsplit("-", 1)[0])
    raise ValueError(f"not a wheel or sdist: {filename}")


def local_python_tag() -> str:
    """The CPython tag of the interpreter running the tests (their target venvs are made from it)."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def pip_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without PIP_* variables and with every pip config file ignored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra or {})
    return env


def pip_wheel() -> Path:
    """The pip wheel bundled with this Python's ensurepip (``python <it>/pip install …`` runs pip from it)."""
    dirs = [Path(ensurepip.__file__).parent / "_bundled"]
    pkg_dir = getattr(ensurepip, "_WHEEL_PKG_DIR", None)  # Debian's python3: /usr/share/python-wheels
    if pkg_dir:
        dirs.append(Path(pkg_dir))
    for d in dirs:
        found = sorted(d.glob("pip-*.whl"))
        if found:
            return found[-1]
    raise FileNotFoundError(f"no pip wheel in {', '.join(map(str, dirs))}")


def run_pip(*args: str | Path, python: str | Path | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """This venv's pip (``--python <python>``: acting on that interpreter's environment) with ``pip_env()``."""
    argv = [sys.executable, "-m", "pip", *(["--python", str(python)] if python else []), *map(str, args)]
    return subprocess.run(argv, env=pip_env(), capture_output=True, text=True, timeout=timeout, check=False)


def make_venv(path: Path, *, python: str = sys.executable) -> Path:
    """A venv made ``--without-pip`` (fast; install with ``pip --python`` or ``pip_wheel()``); its python."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    return path / "bin" / "python"


# ----------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class IndexEntry:
    project: str               # normalized
    filename: str
    sha256: str                # of the bytes served
    advertised_sha256: str     # in the index (differs when a test advertises a wrong digest)
    requires_python: str | None


@dataclass
class _Fault:
    kind: FaultKind
    remaining: int | None      # None: every request


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False     # server_close never joins handler threads (a hanging one included)
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: FakeUpstream) -> None:
        self.upstream = upstream
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "fleetctl-fake-upstream/1"
    protocol_version = "HTTP/1.0"   # one request per connection: down() leaves no kept-alive socket

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        up = cast(_Server, self.server).upstream
        path = urllib.parse.urlsplit(self.path).path
        up._log(self.command, self.path)
        segment = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])
        fault = up._take_fault(segment)
        if fault == "hang":
            up._release_event().wait(up.hang_s)
            self.close_connection = True
            return
        if fault in ("404", "500"):
            self._send(int(fault), b"fault injected\n", "text/plain", body=body)
            return
        found = up._resolve(path, self.headers.get("Accept", ""))
        if found is None:
            self._send(404, b"not found\n", "text/plain", body=body)
            return
        status, data, ctype, location = found
        headers = {"Location": location} if location else {}
        if fault == "corrupt":
            data = bytes(b ^ 0x5A for b in data) if data else b"x"
        wanted = _RANGE_RE.fullmatch(self.headers.get("Range", "").strip())
        if status == 200 and ctype == "application/octet-stream" and wanted:   # resuming a download (pip does)
            total = len(data)
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)), total - 1) if wanted.group(2) else total - 1
            if start >= total or end < start:
                self._send(416, b"", "text/plain", body=body, headers={"Content-Range": f"bytes */{total}"})
                return
            status, data = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if fault == "truncate":
            self._send(status, data, ctype, body=body, headers=headers, send=len(data) // 2)
            self.close_connection = True
            return
        self._send(status, data, ctype, body=body, headers=headers)

    def _send(self, status: int, data: bytes, ctype: str, *, body: bool, headers: Mapping[str, str] | None = None,
              send: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))   # announced in full even when ``send`` cuts the body
        self.send_header("Cache-Control", "no-store")
        if ctype == "application/octet-stream":
            self.send_header("Accept-Ranges", "bytes")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data if send is None else data[:send])
            self.wfile.flush()


class FakeUpstream:
    """PyPI-style index + GitHub release assets over real HTTP on 127.0.0.1 (see the module docstring).

    ``root`` is the directory served (a temporary one, removed on close, when not given).
    ``pep691``: answer ``Accept: application/vnd.pypi.simple.v1+json`` with PEP 691 JSON (pip asks
    for it first); with False only HTML is served. ``hang_s``: how long a ``hang`` fault holds a request.
    """

    def __init__(self, root: Path | None = None, *, pep691: bool = True, hang_s: float = 30.0) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="fake-upstream-")) if root is None else root
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "releases" / "download").mkdir(parents=True, exist_ok=True)
        self.pep691 = pep691
        self.hang_s = hang_s
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self._faults: dict[str, _Fault] = {}
        self._index: dict[str, dict[str, IndexEntry]] = {}
        self._release = threading.Event()
        self._server: _Server | None = _Server(("127.0.0.1", 0), self)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.index_url = f"{self.url}/simple"
        self.releases_url = f"{self.url}/releases/download"
        self._thread: threading.Thread | None = None
        self._start()

    # lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        assert self._server is not None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        server, self._server = self._server, None
        self._release.set()            # hanging requests return now
        if server is not None:
            server.shutdown()
            server.server_close()      # the listening socket is closed: connection refused from now on
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def close(self) -> None:
        self._stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def down(self) -> None:
        """Stop listening (clients get connection refused); requests on hold (``hang``) end too."""
        self._stop()

    def up(self) -> None:
        """Listen again, on the same port."""
        if self._server is not None:
            return
        self._release = threading.Event()
        self._server = _Server(("127.0.0.1", self.port), self)
        self._start()

    # content -----------------------------------------------------------------------------------

    def add_to_index(self, path: Path, *, advertised_sha256: str | None = None,
                     requires_python: str | None = None) -> str:
        """Publish a wheel or sdist in the index (a copy); returns its file URL."""
        dest = self.root / "files" / path.name
        if path.resolve() != dest.resolve():
            shutil.copyfile(path, dest)
        sha = sha256_file(dest)
        entry = IndexEntry(project_of(path.name), path.name, sha, advertised_sha256 or sha, requires_python)
        with self._lock:
            self._index.setdefault(entry.project, {})[entry.filename] = entry
        return self.file_url(path.name)

    def add_release_asset(self, version: str, path: Path) -> str:
        """Publish ``path`` as a release asset of tag ``v<version>``; returns its URL."""
        tag = version if version.startswith("v") else f"v{version}"
        dest_dir = self.root / "releases" / "download" / tag
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest_dir / path.name)
        return self.asset_url(version, path.name)

    def publish(self, universe: Universe) -> None:
        """Everything of a universe: its index files and its release assets."""
        for path in universe.index_files:
            self.add_to_index(path, requires_python=universe.requires_python.get(path.name))
        for version, path in universe.release_assets:
            self.add_release_asset(version, path)

    def file_url(self, filename: str) -> str:
        return f"{self.url}/files/{urllib.parse.quote(filename)}"

    def asset_url(self, version: str, filename: str) -> str:
        tag = version if version.startswith("v") else f"v{version}"
        return f"{self.releases_url}/{tag}/{urllib.parse.quote(filename)}"

    def index_entries(self, project: str | None = None) -> list[IndexEntry]:
        with self._lock:
            projects = [normalize(project)] if project else sorted(self._index)
            return [e for p in projects for _, e in sorted(self._index.get(p, {}).items())]

    # faults ------------------------------------------------------------------------------------

    def fail(self, filename: str, kind: FaultKind, *, times: int | None = None) -> None:
        """Fault every request whose last path segment is ``filename`` (the next ``times`` only, if given)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        with self._lock:
            self._faults[filename] = _Fault(kind, times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # request log -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received so far, in order (a snapshot)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def fetched(self, filename: str) -> int:
        """How many GET requests asked for ``filename`` (index file or release asset)."""
        quoted = urllib.parse.quote(filename)
        return sum(1 for m, p in self.requests if m == "GET" and p.rsplit("/", 1)[-1] in (filename, quoted))

    # used by the handler -----------------------------------------------------------------------

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _release_event(self) -> threading.Event:
        return self._release

    def _take_fault(self, segment: str) -> FaultKind | None:
        with self._lock:
            fault = self._faults.get(segment)
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[segment]
            return fault.kind

    def _resolve(self, path: str, accept: str) -> tuple[int, bytes, str, str | None] | None:
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        want_json = self.pep691 and PEP691_JSON in accept
        if parts == ["simple"]:
            return (200, *self._root_page(want_json), None)
        if len(parts) == 2 and parts[0] == "simple":
            name = parts[1]
            if normalize(name) != name or not path.endswith("/"):
                return 301, b"", "text/plain", f"/simple/{normalize(name)}/"
            with self._lock:
                entries = sorted(self._index.get(name, {}).values(), key=lambda e: e.filename)
            if not entries:
                return None
            return (200, *self._project_page(name, entries, want_json), None)
        if len(parts) == 2 and parts[0] == "files":
            return self._file(self.root / "files" / parts[1])
        if len(parts) == 4 and parts[:2] == ["releases", "download"]:
            return self._file(self.root / "releases" / "download" / parts[2] / parts[3])
        return None

    @staticmethod
    def _file(p: Path) -> tuple[int, bytes, str, str | None] | None:
        if ".." in p.parts or not p.is_file():
            return None
        return 200, p.read_bytes(), "application/octet-stream", None

    def _root_page(self, want_json: bool) -> tuple[bytes, str]:
        with self._lock:
            names = sorted(self._index)
        if want_json:
            doc = {"meta": {"api-version": "1.0"}, "projects": [{"name": n} for n in names]}
            return json.dumps(doc).encode(), PEP691_JSON
        links = "".join(f'    <a href="{n}/">{n}</a>\n' for n in names)
        return _html("Simple index", links), "text/html; charset=utf-8"

    @staticmethod
    def _project_page(name: str, entries: Sequence[IndexEntry], want_json: bool) -> tuple[bytes, str]:
        if want_json:
            files = [{"filename": e.filename, "url": f"../../files/{urllib.parse.quote(e.filename)}",
                      "hashes": {"sha256": e.advertised_sha256},
                      **({"requires-python": e.requires_python} if e.requires_python else {})} for e in entries]
            doc = {"meta": {"api-version": "1.0"}, "name": name, "files": files}
            return json.dumps(doc).encode(), PEP691_JSON
        links = ""
        for e in entries:
            rp = f' data-requires-python="{html.escape(e.requires_python)}"' if e.requires_python else ""
            href = f"../../files/{urllib.parse.quote(e.filename)}#sha256={e.advertised_sha256}"
            links += f'    <a href="{html.escape(href)}"{rp}>{html.escape(e.filename)}</a>\n'
        return _html(f"Links for {name}", links), "text/html; charset=utf-8"


def _html(title: str, body: str) -> bytes:
    return (f'<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" content="1.0">\n'
            f"    <title>{title}</title>\n  </head>\n  <body>\n    <h1>{title}</h1>\n{body}  </body>\n</html>\n"
            ).encode()


@contextlib.contextmanager
def fake_upstream(*universes: Universe, pep691: bool = True) -> Iterator[FakeUpstream]:
    """A started ``FakeUpstream`` with ``universes`` published."""
    with FakeUpstream(pep691=pep691) as up:
        for u in universes:
            up.publish(u)
        yield up


# ----------------------------------------------------------------------------------------------
# Stand-in package universes


@dataclass
class Universe:
    """Files a test publishes with ``FakeUpstream.publish``: index files, release assets (tag version, path)."""

    root: Path
    index_files: list[Path] = field(default_factory=list)
    release_assets: list[tuple[str, Path]] = field(default_factory=list)
    requires_python: dict[str, str] = field(default_factory=dict)   # file name → Requires-Python

    def path(self, filename: str) -> Path:
        for p in [*self.index_files, *(p for _, p in self.release_assets)]:
            if p.name == filename:
                return p
        raise KeyError(filename)

    def names(self) -> set[str]:
        return {p.name for p in self.index_files} | {p.name for _, p in self.release_assets}


def _write_wheel(outdir: Path, dist: str, version: str, files: Mapping[str, str], requires: Iterable[str] = (),
                 *, tag: str = "py3-none-any", file_version: str | None = None) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{dist.replace('-', '_')}-{file_version or version}-{tag}.whl"
    reqs = list(requires)
    extras = sorted(set(re.findall(r"""extra\s*==\s*["']([^"']+)["']""", "\n".join(reqs))))
    if extras:
        # wheel_bytes writes one "Requires-Dist: <entry>" line per entry: the Provides-Extra lines (without
        # which pip ignores the extra: "does not provide the extra") ride on the last one
        reqs[-1] += "".join(f"\nProvides-Extra: {e}" for e in extras)
    path.write_bytes(wheel_bytes(dist, version, dict(files), tuple(reqs), tag=tag))
    return path


def _module(dist: str, version: str, extra: str = "") -> str:
    return f'"""fleetctl test stand-in for {dist}."""\n__version__ = "{version}"\nSTAND_IN = True\n{extra}'


def _default_tags(python_tags: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(python_tags if python_tags is not None else ("cp312", "cp311", local_python_tag())))


def einops_wheel(outdir: Path, version: str = EINOPS_VERSION) -> Path:
    return _write_wheel(outdir, "einops", version, {"einops/__init__.py": _module("einops", version)})


def torch_wheel(outdir: Path, version: str = TORCH_STANDIN_VERSION, *, hip: str | None = None) -> Path:
    """Stand-in torch for target venvs (no deps; file name and METADATA both carry the local version).

    ``version.cuda`` comes from a ``+cuXYZ`` local version; a ROCm torch (``2.5.1+rocm6.2``, ``hip`` its
    ``torch.version.hip`` such as ``6.2.41133-dd7f95766``) has ``version.cuda`` None, as the real one.
    Never published in the index: fleetctl never fetches torch.
    """
    local = version.partition("+")[2]
    cuda = f"{local[2:-1]}.{local[-1]}" if local.startswith("cu") and len(local) >= 4 else None
    files = {
        "torch/__init__.py": _module("torch", version, "from torch import cuda, version\n"),
        "torch/version.py": (f'__version__ = "{version}"\ncuda = {cuda!r}\nhip = {hip!r}\n'
                             'git_version = "stand-in"\n'),
        "torch/cuda/__init__.py": "def is_available() -> bool:\n    return False\n",
    }
    return _write_wheel(outdir, "torch", version, files)


def fa2_universe(dir: Path, version: str = "2.8.3", torch: str = "2.11", cuda: str = "12",
                 python_tags: Sequence[str] | None = None, cxx11abi: bool = True) -> Universe:
    """flash-attn 2: upstream-named release wheels (one per python tag), the sdist, einops.

    ``python_tags`` defaults to cp312, cp311 and ``local_python_tag()`` (so one of them installs here).
    Release wheels: ``flash_attn-{version}+cu{cuda}torch{torch}cxx11abi{TRUE|FALSE}-{t}-{t}-linux_x86_64.whl``
    with METADATA ``Version: {version}`` (no local part, as upstream) and Requires-Dist torch, einops.
    The sdist (wheels.py ``build_sdist``) builds a wheel requiring only torch, tagged cp311-linux_x86_64.
    """
    u = Universe(dir)
    local = f"cu{cuda}torch{torch}cxx11abi{'TRUE' if cxx11abi else 'FALSE'}"
    interface = ("def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):\n"
                 "    return q  # stand-in: no kernel\n")
    for t in _default_tags(python_tags):
        files = {"flash_attn/__init__.py": _module("flash-attn", version, f'BUILD = "release:{local}:{t}"\n'
                                                   "from flash_attn.flash_attn_interface import flash_attn_func\n"),
                 "flash_attn/flash_attn_interface.py": interface}
        wheel = _write_wheel(dir / "release", "flash_attn", version, files, ("torch", "einops"),
                             tag=f"{t}-{t}-{WHEEL_PLATFORM}", file_version=f"{version}+{local}")
        u.release_assets.append((version, wheel))
    sdist = build_sdist(dir / "index", "flash_attn", version)
    u.index_files.append(sdist)
    u.requires_python[sdist.name] = ">=3.9"
    ein = einops_wheel(dir / "index")
    u.index_files.append(ein)
    u.requires_python[ein.name] = ">=3.8"
    return u


def fa1_universe(dir: Path, version: str = "1.0.9") -> Universe:
    """flash-attn 1: the sdist ``flash_attn-1.0.9.tar.gz`` (stand-in build) and einops."""
    u = Universe(dir)
    u.index_files.append(build_sdist(dir / "index", "flash_attn", version))
    u.index_files.append(einops_wheel(dir / "index"))
    return u


def fa4_universe(dir: Path, version: str = "4.0.0b36", python_tags: Sequence[str] | None = None) -> Universe:
    """flash-attn-4 (``flash_attn_4-<v>-py3-none-any.whl``, upstream Requires-Dist) and its whole closure.

    Pure py3-none-any stand-ins except ``nvidia-cutlass-dsl-libs-base`` / ``-libs-cu13``, which are
    platform wheels (``<t>-<t>-manylinux_2_28_{x86_64,aarch64}`` for each python tag, as upstream), so
    resolving for a node's Python and platform matters. ``apache-tvm-ffi 0.2.0`` is published as well:
    only the ``<0.2`` bound keeps it out.
    """
    d = dir / "index"
    u = Universe(dir)

    def add(path: Path, requires_python: str | None = ">=3.10") -> None:
        u.index_files.append(path)
        if requires_python:
            u.requires_python[path.name] = requires_python

    fa4_files = {
        "flash_attn/cute/__init__.py": _module("flash-attn-4", version, "from .interface import flash_attn_func\n"
                                               "__all__ = ['flash_attn_func']\n"),
        "flash_attn/cute/interface.py": ("def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):\n"
                                         "    return q  # stand-in: no kernel\n"),
    }
    add(_write_wheel(d, "flash-attn-4", version, fa4_files, FA4_REQUIRES))
    add(einops_wheel(d), ">=3.8")
    add(_write_wheel(d, "typing_extensions", "4.15.0",
                     {"typing_extensions.py": _module("typing-extensions", "4.15.0")}), ">=3.9")
    cv = CUTLASS_DSL_VERSION
    add(_write_wheel(d, "nvidia-cutlass-dsl", cv, {"cutlass/__init__.py": _module("nvidia-cutlass-dsl", cv)},
                     (f"nvidia-cutlass-dsl-libs-base=={cv}", "typing-extensions",
                      f'nvidia-cutlass-dsl-libs-cu13=={cv}; extra == "cu13"')))
    for t in _default_tags(python_tags):
        for arch in ("x86_64", "aarch64"):
            tag = f"{t}-{t}-manylinux_2_28_{arch}"
            for dist in ("nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13"):
                mod = MODULES[dist]
                add(_write_wheel(d, dist, cv, {f"{mod}/__init__.py": _module(dist, cv, f'TAG = "{tag}"\n')},
                                 tag=tag))
    for tv in (TVM_FFI_VERSION, TVM_FFI_DECOY_VERSION):
        add(_write_wheel(d, "apache-tvm-ffi", tv, {"tvm_ffi/__init__.py": _module("apache-tvm-ffi", tv)},
                         ("typing-extensions>=4.5",)), ">=3.9")
    add(_write_wheel(d, "torch-c-dlpack-ext", "0.1.5",
                     {"torch_c_dlpack_ext/__init__.py": _module("torch-c-dlpack-ext", "0.1.5")}, ("torch",)), ">=3.9")
    add(_write_wheel(d, "quack-kernels", "0.5.3", {"quack/__init__.py": _module("quack-kernels", "0.5.3")},
                     (f"nvidia-cutlass-dsl>={cv}", "torch", "apache-tvm-ffi<0.2,>=0.1.11", "torch-c-dlpack-ext")))
    return u


def fa4_closure(version: str = "4.0.0b36", *, python_tag: str | None = None, arch: str = "x86_64",
                cu13: bool = True) -> set[str]:
    """The file names pip should resolve for ``flash-attn-4[cu13]==<version>`` (torch excluded)."""
    t = python_tag or local_python_tag()
    cv = CUTLASS_DSL_VERSION
    names = {f"flash_attn_4-{version}-py3-none-any.whl", f"einops-{EINOPS_VERSION}-py3-none-any.whl",
             "typing_extensions-4.15.0-py3-none-any.whl", f"nvidia_cutlass_dsl-{cv}-py3-none-any.whl",
             f"nvidia_cutlass_dsl_libs_base-{cv}-{t}-{t}-manylinux_2_28_{arch}.whl",
             f"apache_tvm_ffi-{TVM_FFI_VERSION}-py3-none-any.whl", "torch_c_dlpack_ext-0.1.5-py3-none-any.whl",
             "quack_kernels-0.5.3-py3-none-any.whl"}
    if cu13:
        names.add(f"nvidia_cutlass_dsl_libs_cu13-{cv}-{t}-{t}-manylinux_2_28_{arch}.whl")
    return names
