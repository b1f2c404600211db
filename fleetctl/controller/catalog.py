"""The wheel catalog: which prebuilt FA2 wheels exist, where to get them, what they need.

Sources, merged in this order (earlier entries win a filename clash):
- wheels held in the controller's artifact store (``Catalog.with_local_wheels``), built by us;
- user additions (``fleetctl catalog add|import`` → ``<state-dir>/catalog.json``);
- the built-in list: every wheel upstream CI was configured to build (2.5.0 onward) in
  ``controller/data/flash_attn_wheel_matrix.json``, with its GitHub release URL and glibc floor.

A catalog file (``--catalog``) is either ``{"wheels": [{"filename", "url", "sha256",
"min_glibc"}]}`` or plain text with one wheel filename per line (DESIGN §3.2). Nothing
here touches the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fleetctl.controller.resolver import rules
from fleetctl.fleet.errors import CatalogError

CATALOG_FILE_NAME = "catalog.json"

# flash_attn-{ver}+cu{X}torch{A.B}cxx11abi{TRUE|FALSE}-cp{PY}-cp{PY}-{platform}.whl (facts §1.2); win_amd64 for
# community Windows wheels an operator adds (upstream publishes none; only Windows nodes are matched to them)
_WHEEL_RE = re.compile(
    r"^flash_attn-(?P<version>[0-9][0-9A-Za-z.]*)"
    r"\+(?P<cuda>cu\d{2,3})torch(?P<torch>\d+\.\d+)cxx11abi(?P<abi>TRUE|FALSE)"
    r"-(?P<py>cp\d{2,3})-(?P<abi_tag>cp\d{2,3}t?)-(?P<platform>linux_(?:x86_64|aarch64)|win_amd64)\.whl$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GLIBC_RE = re.compile(r"^\d+\.\d+$")
_HINT = ("wheel names look like flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp312-cp312-linux_x86_64.whl "
         "(the upstream naming rule)")


@dataclass(frozen=True)
class WheelName:
    """The parts of an FA2 wheel filename that decide where it installs."""

    filename: str
    version: str
    cuda_tag: str  # "cu12", "cu118"
    torch_mm: str  # "2.7"
    cxx11abi: bool
    python_tag: str  # "cp312"
    platform: str  # "linux_x86_64"

    @property
    def match_key(self) -> tuple[str, str, str, bool, str, str]:
        return (self.version, self.cuda_tag, self.torch_mm, self.cxx11abi, self.python_tag, self.platform)


def _wheel_name_problem(filename: str) -> str:
    """Says which part of a non-matching filename is wrong, for the error message."""
    if not filename.startswith("flash_attn-"):
        return "does not start with 'flash_attn-'"
    if not filename.endswith(".whl"):
        return "does not end with '.whl'"
    if "+" not in filename:
        return "has no local version part '+cu<X>torch<A.B>cxx11abi<TRUE|FALSE>'"
    local = filename.split("+", 1)[1]
    if not re.match(r"^cu\d{2,3}", local):
        return "local version does not start with a CUDA tag like 'cu12' or 'cu118'"
    if not re.match(r"^cu\d{2,3}torch\d+\.\d+", local):
        return "has no torch major.minor like 'torch2.7' after the CUDA tag"
    if not re.match(r"^cu\d{2,3}torch\d+\.\d+cxx11abi(TRUE|FALSE)-", local):
        return "has no 'cxx11abiTRUE' or 'cxx11abiFALSE' after the torch version"
    if not re.search(r"-cp\d{2,3}-cp\d{2,3}t?-", local):
        return "has no CPython tags like '-cp312-cp312-'"
    return "platform is not linux_x86_64, linux_aarch64 or win_amd64"


@lru_cache(maxsize=65536)
def parse_wheel_filename(filename: str) -> WheelName:
    """Parse an upstream-style FA2 wheel filename or raise ``CatalogError`` saying what is wrong."""
    name = filename.strip()
    match = _WHEEL_RE.match(name)
    if match is None:
        raise CatalogError(f"malformed wheel filename {name!r}: {_wheel_name_problem(name)}", hint=_HINT)
    if rules.parse_version(match["version"]) is None:
        raise CatalogError(f"malformed wheel filename {name!r}: {match['version']!r} is not a version",
                           hint=_HINT)
    return WheelName(filename=name, version=match["version"], cuda_tag=match["cuda"], torch_mm=match["torch"],
                     cxx11abi=match["abi"] == "TRUE", python_tag=match["py"], platform=match["platform"])


@dataclass(frozen=True)
class Wheel:
    """One catalog entry."""

    name: WheelName
    url: str | None
    sha256: str | None
    min_glibc: str | None  # None: unknown, assume compatible (DESIGN §3.2)
    cuda_archs: tuple[int, ...]  # SASS the wheel carries, as cc×10 numbers
    origin: str  # "artifact-store" | "user" | "catalog-file" | "upstream"
    os_family: str | None = None  # a source-built wheel: only nodes of the builder's OS family; None: any

    @property
    def filename(self) -> str:
        return self.name.filename

    def to_json(self) -> dict[str, Any]:
        return {"filename": self.filename, "url": self.url, "sha256": self.sha256, "min_glibc": self.min_glibc,
                "cuda_archs": [str(a) for a in self.cuda_archs], "origin": self.origin,
                **({"os_family": self.os_family} if self.os_family else {})}


def _parse_archs(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value.split(";") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(a, str | int) and str(a).isdigit() for a in items):
        raise CatalogError(f"{where}: cuda_archs must be a list like [\"80\", \"90\"] or a string \"80;90\"",
                           hint="list the SASS architectures the wheel was built for")
    return tuple(sorted({int(a) for a in items}))


def wheel_from_entry(entry: Any, origin: str, where: str) -> Wheel:
    """Build a ``Wheel`` from one JSON entry (``filename`` required; ``url``, ``sha256``, ``min_glibc``,
    ``cuda_archs`` optional), raising ``CatalogError`` that names ``where`` on any problem."""
    if not isinstance(entry, Mapping):
        raise CatalogError(f"{where}: expected an object with a \"filename\", got {type(entry).__name__}",
                           hint='entries look like {"filename": ..., "url": ..., "sha256": ..., "min_glibc": "2.35"}')
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise CatalogError(f"{where}: field filename is missing or not a string", hint=_HINT)
    try:
        name = parse_wheel_filename(filename)
    except CatalogError as exc:
        raise CatalogError(f"{where}: {exc.message}", hint=exc.hint) from None
    url, sha256, min_glibc = entry.get("url"), entry.get("sha256"), entry.get("min_glibc")
    if url is not None and not isinstance(url, str):
        raise CatalogError(f"{where}: field url must be a string", hint="give the wheel's download URL or omit it")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise CatalogError(f"{where}: field sha256 must be 64 lowercase hex digits, got {sha256!r}",
                           hint="run sha256sum on the wheel")
    if min_glibc is not None and (not isinstance(min_glibc, str) or not _GLIBC_RE.match(min_glibc)):
        raise CatalogError(f"{where}: field min_glibc must look like \"2.35\", got {min_glibc!r}",
                           hint="the glibc of the OS the wheel was built on (ldd --version)")
    os_family = entry.get("os_family")
    if os_family is not None and (not isinstance(os_family, str) or not re.fullmatch(r"[a-z0-9._-]{1,32}", os_family)):
        raise CatalogError(f"{where}: field os_family must look like \"debian\" or \"rhel\", got {os_family!r}",
                           hint="the OS family of the host the wheel was built on, or omit it (any)")
    archs = _parse_archs(entry.get("cuda_archs"), where)
    return Wheel(name=name, url=url, sha256=sha256, min_glibc=min_glibc,
                 cuda_archs=archs if archs is not None else rules.wheel_archs(name.version), origin=origin,
                 os_family=os_family)


class Catalog:
    """An immutable, indexed set of wheels. Lookups are dictionary hits."""

    def __init__(self, wheels: Iterable[Wheel]) -> None:
        seen: dict[str, Wheel] = {}
        for wheel in wheels:
            seen.setdefault(wheel.filename, wheel)  # first source wins a clash
        self.wheels: tuple[Wheel, ...] = tuple(seen.values())
        self._index: dict[tuple[str, str, str, bool, str, str], list[Wheel]] = {}
        for wheel in self.wheels:
            self._index.setdefault(wheel.name.match_key, []).append(wheel)

    def __len__(self) -> int:
        return len(self.wheels)

    @cached_property
    def releases(self) -> tuple[str, ...]:
        """FA2 versions that have at least one wheel, oldest first."""
        versions = {w.name.version for w in self.wheels}
        return tuple(sorted(versions, key=rules._v))

    @cached_property
    def newest_release(self) -> str | None:
        """The newest FA2 release (no pre-/dev releases): the default target (DESIGN §3.2 rule 1)."""
        final = [v for v in self.releases if not rules._v(v).is_prerelease and rules._v(v).major == 2]
        return final[-1] if final else None

    def lookup(self, version: str, cuda_tag: str, torch_mm: str, cxx11abi: bool, python_tag: str,
               platform: str) -> list[Wheel]:
        return self._index.get((version, cuda_tag, torch_mm, cxx11abi, python_tag, platform), [])

    def merged(self, *others: Catalog) -> Catalog:
        """A catalog with this one's wheels first, then the others' (earlier wins a filename clash)."""
        return Catalog([*self.wheels, *(w for other in others for w in other.wheels)])

    def with_local_wheels(self, entries: Iterable[Mapping[str, Any]]) -> Catalog:
        """Add wheels held in the controller's artifact store; they win over upstream copies.

        Each entry: ``{"filename", "sha256", "url"?, "min_glibc"?, "cuda_archs"?}`` — the url is
        where agents fetch it from the controller; cuda_archs is what the build was narrowed to.
        """
        local = [wheel_from_entry(e, "artifact-store", f"artifact store wheel #{i}") for i, e in enumerate(entries)]
        return Catalog(local).merged(self)

    def to_json(self) -> dict[str, Any]:
        return {"wheels": [w.to_json() for w in self.wheels]}


# --- loading -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def builtin_catalog() -> Catalog:
    """Upstream release wheels from the packaged wheel matrix (what CI was configured to build)."""
    data = resources.files("fleetctl.controller.data")
    matrix = json.loads(data.joinpath("flash_attn_wheel_matrix.json").read_text())
    wheels: list[Wheel] = []
    for release in matrix:
        tag = release.get("tag")
        if not tag:  # main@HEAD is unreleased: its filenames are templates
            continue
        glibc = max((rules.GLIBC_BY_RUNNER.get(os_name, "2.31") for os_name in release["os"]), key=rules._v)
        for filename in release.get("expected_wheel_filenames") or []:
            name = parse_wheel_filename(filename)
            wheels.append(Wheel(name=name, url=rules.RELEASE_URL.format(version=name.version, filename=filename),
                                sha256=None, min_glibc=glibc, cuda_archs=rules.wheel_archs(name.version),
                                origin="upstream"))
    return Catalog(wheels)


def parse_catalog_text(text: str, origin: str, source: str) -> Catalog:
    """Parse a catalog file's contents: JSON ``{"wheels": [...]}`` or one filename per line."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                               hint='a JSON catalog looks like {"wheels": [{"filename": ...}]}') from None
        return parse_catalog_json(obj, origin, source)
    wheels: list[Wheel] = []
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        try:  # glibc unknown for plain names: assume compatible (DESIGN §3.2)
            wheels.append(wheel_from_entry({"filename": entry}, origin, f"{source} line {lineno}"))
        except CatalogError as exc:
            problems.append(exc.message)
    _raise_problems(problems, source)
    return Catalog(wheels)


def parse_catalog_json(obj: Any, origin: str, source: str) -> Catalog:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("wheels"), list):
        raise CatalogError(f'{source}: expected an object with a "wheels" list',
                           hint='a JSON catalog looks like {"wheels": [{"filename": ...}]}')
    wheels: list[Wheel] = []
    problems: list[str] = []
    for i, entry in enumerate(obj["wheels"]):
        try:
            wheels.append(wheel_from_entry(entry, origin, f"{source} wheels[{i}]"))
        except CatalogError as exc:
            problems.append(exc.message)
    _raise_problems(problems, source)
    return Catalog(wheels)


def _raise_problems(problems: list[str], source: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CatalogError(f"{source}: {len(problems)} invalid wheel entr{'y' if len(problems) == 1 else 'ies'}:"
                           f"\n  {shown}{more}", hint=_HINT)


def load_catalog_file(path: Path) -> Catalog:
    """Read a ``--catalog`` file (JSON or plain text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror or exc}",
                           hint="check the path given to --catalog") from None
    except UnicodeDecodeError:
        raise CatalogError(f"catalog {path} is not UTF-8 text", hint="give a JSON or plain-text catalog") from None
    return parse_catalog_text(text, "catalog-file", str(path))


# --- user additions in the controller state dir ------------------------------------------------

def user_catalog_path(state_dir: Path) -> Path:
    return state_dir / CATALOG_FILE_NAME


def _user_catalog_text(path: Path) -> str | None:
    """The user catalog file's text; None when none was made."""
    if not path.exists():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc.strerror or exc}", hint="check the state dir's permissions") \
            from None


def load_user_catalog(state_dir: Path) -> Catalog:
    """User additions stored by ``fleetctl catalog add|import``; empty when none were made."""
    path = user_catalog_path(state_dir)
    text = _user_catalog_text(path)
    return Catalog([]) if text is None else parse_catalog_text(text, "user", str(path))


def save_user_catalog(state_dir: Path, catalog: Catalog) -> Path:
    """Write user additions atomically (write a temp file, then rename)."""
    path = user_catalog_path(state_dir)
    entries = [{k: v for k, v in {"filename": w.filename, "url": w.url, "sha256": w.sha256,
                                  "min_glibc": w.min_glibc, "cuda_archs": [str(a) for a in w.cuda_archs],
                                  "os_family": w.os_family}.items()
                if v is not None} for w in catalog.wheels]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"wheels": entries}, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise CatalogError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="check --state-dir points at a writable directory") from None
    return path


def add_user_wheels(state_dir: Path, additions: Catalog) -> tuple[Path, int]:
    """Merge ``additions`` into the user catalog (an addition replaces an entry with the same filename).

    Returns the file written and how many entries were new.
    """
    current = load_user_catalog(state_dir)
    known = {w.filename for w in current.wheels}
    added = sum(1 for w in additions.wheels if w.filename not in known)
    relabelled = [replace(w, origin="user") for w in additions.wheels]
    return save_user_catalog(state_dir, Catalog(relabelled).merged(current)), added


def default_catalog(state_dir: Path | None) -> Catalog:
    """What ``fleetctl plan`` uses without ``--catalog``: user additions, then the built-in list.

    The file is read on every call (``fleetctl catalog add`` may change it from another process at any time), but
    the catalog is built once per text of it: a controller asks for it at every verify submission and re-plan,
    and merging the ~2,900 built-in wheels anew each time was a tenth of a verify job's CPU
    (benchmarks/ha_throughput.py). A ``Catalog`` is immutable, so every caller may share the one built."""
    if state_dir is None:
        return _user_and_builtin(None, "")
    path = user_catalog_path(state_dir)
    return _user_and_builtin(_user_catalog_text(path), str(path))


@lru_cache(maxsize=4)
def _user_and_builtin(user_text: str | None, source: str) -> Catalog:
    user = parse_catalog_text(user_text, "user", source) if user_text is not None else Catalog([])
    return user.merged(builtin_catalog())
