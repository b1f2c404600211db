"""The fake upstream itself, with real HTTP and real pip: index pages, release assets, every fault kind
as a client sees it, the FA4 closure resolved and installed, and installing into a venv without pip."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness.upstream import (
    FAULT_KINDS,
    MODULES,
    PEP691_JSON,
    TORCH_STANDIN_VERSION,
    TVM_FFI_DECOY_VERSION,
    FakeUpstream,
    Universe,
    fa1_universe,
    fa2_universe,
    fa4_closure,
    fa4_universe,
    local_python_tag,
    make_venv,
    pip_env,
    pip_wheel,
    run_pip,
    torch_wheel,
)
from tests.integration.harness.wheels import sha256_file

pytestmark = pytest.mark.timeout(120)

FA4 = "4.0.0b36"
EINOPS = "einops-0.8.1-py3-none-any.whl"


@dataclass(frozen=True)
class Worlds:
    fa1: Universe
    fa2: Universe
    fa4: Universe
    torch_dir: Path        # --find-links holding only the stand-in torch
    torch: Path


@pytest.fixture(scope="session")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Worlds:
    d = tmp_path_factory.mktemp("universes")
    torch = torch_wheel(d / "torch")
    return Worlds(fa1_universe(d / "fa1"), fa2_universe(d / "fa2"), fa4_universe(d / "fa4"), torch.parent, torch)


@pytest.fixture
def upstream(worlds: Worlds) -> Iterator[FakeUpstream]:
    with FakeUpstream(hang_s=20) as up:
        up.publish(worlds.fa2)
        up.publish(worlds.fa4)
        yield up


@pytest.fixture
def store(worlds: Worlds, tmp_path: Path) -> Path:
    """A --find-links directory holding the FA4 universe's index files and the stand-in torch."""
    d = tmp_path / "store"
    d.mkdir()
    for p in [*worlds.fa4.index_files, worlds.torch]:
        shutil.copy2(p, d / p.name)
    return d


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def get(url: str, *, timeout: float = 10, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        data: bytes = r.read()
        return data


def installed(python: Path, dist: str) -> str | None:
    code = ("import sys\nfrom importlib import metadata as m\n"
            "try: print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError: print('')")
    out = subprocess.run([str(python), "-c", code, dist], capture_output=True, text=True, check=True).stdout
    return out.strip() or None


# --- index and release assets ------------------------------------------------------------------


def test_index_pages_html_and_pep691_json(upstream: FakeUpstream, worlds: Worlds) -> None:
    root = get(f"{upstream.index_url}/").decode()
    assert '<a href="flash-attn-4/">flash-attn-4</a>' in root and '<a href="flash-attn/">' in root
    page = get(f"{upstream.index_url}/apache-tvm-ffi/").decode()
    for v in ("0.1.11", TVM_FFI_DECOY_VERSION):
        name = f"apache_tvm_ffi-{v}-py3-none-any.whl"
        sha = sha256_file(worlds.fa4.path(name))
        assert f'href="../../files/{name}#sha256={sha}" data-requires-python="&gt;=3.9"' in page
    # non-normalized names redirect to the normalized page (urllib follows the 301)
    assert get(f"{upstream.index_url}/Flash_Attn/") == get(f"{upstream.index_url}/flash-attn/")
    doc = json.loads(get(f"{upstream.index_url}/flash-attn/", headers={"Accept": PEP691_JSON}))
    assert doc["meta"]["api-version"] == "1.0" and doc["name"] == "flash-attn"
    files = {f["filename"]: f for f in doc["files"]}
    assert set(files) == {"flash_attn-2.8.3.tar.gz"}   # release wheels are release assets, not in the index
    sdist = files["flash_attn-2.8.3.tar.gz"]
    assert sdist["hashes"]["sha256"] == sha256_file(worlds.fa2.path("flash_attn-2.8.3.tar.gz"))
    assert sdist["requires-python"] == ">=3.9"
    with pytest.raises(urllib.error.HTTPError) as e:
        get(f"{upstream.index_url}/no-such-project/")
    assert e.value.code == 404
    assert ("GET", "/simple/apache-tvm-ffi/") in upstream.requests


def test_advertised_sha256_can_lie(upstream: FakeUpstream, worlds: Worlds) -> None:
    upstream.add_to_index(worlds.fa4.path(EINOPS), advertised_sha256="0" * 64)
    assert f"{EINOPS}#sha256={'0' * 64}" in get(f"{upstream.index_url}/einops/").decode()
    assert hashlib.sha256(get(upstream.file_url(EINOPS))).hexdigest() == sha256_file(worlds.fa4.path(EINOPS))


def test_release_asset_downloads_and_matches(upstream: FakeUpstream, worlds: Worlds, tmp_path: Path) -> None:
    version, asset = worlds.fa2.release_assets[0]
    url = upstream.asset_url(version, asset.name)
    assert url == f"{upstream.releases_url}/v2.8.3/{asset.name.replace('+', '%2B')}"
    assert asset.name.startswith("flash_attn-2.8.3+cu12torch2.11cxx11abiTRUE-cp")
    dest, _ = urllib.request.urlretrieve(url, tmp_path / asset.name)
    assert sha256_file(Path(dest)) == sha256_file(asset)
    # the unquoted '+' works too, as GitHub accepts it
    raw = f"{upstream.releases_url}/v{version}/{asset.name}"
    assert hashlib.sha256(get(raw)).hexdigest() == sha256_file(asset)
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
        assert int(r.headers["Content-Length"]) == asset.stat().st_size and r.read() == b""
    assert upstream.fetched(asset.name) == 2
    assert ("HEAD", f"/releases/download/v2.8.3/{asset.name.replace('+', '%2B')}") in upstream.requests


# --- faults, as urllib sees them ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [*FAULT_KINDS, "down"])
def test_fault_as_a_client_sees_it(upstream: FakeUpstream, worlds: Worlds, tmp_path: Path, kind: str) -> None:
    url = upstream.file_url(EINOPS)
    good = sha256_file(worlds.fa4.path(EINOPS))
    if kind == "down":
        upstream.down()
        assert not upstream.is_up
        with pytest.raises(urllib.error.URLError) as refused:
            get(url)
        assert isinstance(refused.value.reason, ConnectionRefusedError)
        upstream.up()    # same port, same content
        assert hashlib.sha256(get(url)).hexdigest() == good
        return
    upstream.fail(EINOPS, kind)  # type: ignore[arg-type]
    if kind in ("404", "500"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url)
        assert e.value.code == int(kind)
    elif kind == "truncate":
        with pytest.raises(http.client.IncompleteRead):
            get(url)
        with pytest.raises(urllib.error.ContentTooShortError):
            urllib.request.urlretrieve(url, tmp_path / EINOPS)
    elif kind == "corrupt":
        data = get(url)
        assert len(data) == worlds.fa4.path(EINOPS).stat().st_size
        assert hashlib.sha256(data).hexdigest() != good
    else:  # hang: the client times out; closing the server does not wait for the held request
        t0 = time.monotonic()
        with pytest.raises((TimeoutError, urllib.error.URLError)) as hung:
            get(url, timeout=0.5)
        if isinstance(hung.value, urllib.error.URLError):
            assert isinstance(hung.value.reason, TimeoutError)
        assert time.monotonic() - t0 < 5
        t1 = time.monotonic()
        upstream.down()
        assert time.monotonic() - t1 < 2
        upstream.up()
    assert ("GET", f"/files/{EINOPS}") in upstream.requests
    upstream.clear_faults()
    assert hashlib.sha256(get(url)).hexdigest() == good


def test_fault_for_a_number_of_requests_and_on_index_pages(upstream: FakeUpstream) -> None:
    upstream.fail(EINOPS, "500", times=2)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError):
            get(upstream.file_url(EINOPS))
    assert get(upstream.file_url(EINOPS))
    upstream.fail("einops", "404")          # the project page's last segment
    with pytest.raises(urllib.error.HTTPError):
        get(f"{upstream.index_url}/einops/")
    with pytest.raises(ValueError, match="unknown fault kind"):
        upstream.fail(EINOPS, "slow")  # type: ignore[arg-type]


# --- real pip against the fake index -----------------------------------------------------------


@pytest.mark.parametrize("pep691", [True, False], ids=["json", "html"])
def test_pip_download_resolves_the_fa4_closure(worlds: Worlds, tmp_path: Path, pep691: bool) -> None:
    with FakeUpstream(pep691=pep691) as up:
        up.publish(worlds.fa4)
        out = ok(run_pip("download", "--no-cache-dir", "--index-url", up.index_url, "--only-binary=:all:",
                         "--find-links", worlds.torch_dir, "-d", tmp_path / "dl", f"flash-attn-4[cu13]=={FA4}"))
        assert "does not provide the extra" not in out
        got = {p.name for p in (tmp_path / "dl").iterdir()}
        assert got == fa4_closure(FA4) | {worlds.torch.name}
        assert ("GET", "/simple/torch/") in up.requests                  # pip asks the index for torch too (404)
        assert up.fetched(f"apache_tvm_ffi-{TVM_FFI_DECOY_VERSION}-py3-none-any.whl") == 0
        assert all(up.fetched(name) == 1 for name in fa4_closure(FA4))


def test_pip_download_for_another_python_and_platform(upstream: FakeUpstream, worlds: Worlds, tmp_path: Path) -> None:
    ok(run_pip("download", "--no-cache-dir", "--index-url", upstream.index_url, "--only-binary=:all:",
               "--python-version", "3.12", "--platform", "manylinux_2_28_aarch64", "--find-links", worlds.torch_dir,
               "-d", tmp_path / "dl", f"flash-attn-4[cu13]=={FA4}"))
    got = {p.name for p in (tmp_path / "dl").iterdir()}
    assert got == fa4_closure(FA4, python_tag="cp312", arch="aarch64") | {worlds.torch.name}
    # without the extra, libs-cu13 is not part of the closure
    ok(run_pip("download", "--no-cache-dir", "--index-url", upstream.index_url, "--only-binary=:all:",
               "--find-links", worlds.torch_dir, "-d", tmp_path / "plain", f"flash-attn-4=={FA4}"))
    assert {p.name for p in (tmp_path / "plain").iterdir()} == fa4_closure(FA4, cu13=False) | {worlds.torch.name}


def test_pip_sees_upstream_faults(upstream: FakeUpstream, worlds: Worlds, tmp_path: Path) -> None:
    def download(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_pip("download", "--no-cache-dir", "--index-url", upstream.index_url, "--only-binary=:all:",
                       "--retries", "0", "--timeout", "5", "-d", tmp_path / "dl", *extra, "einops")

    upstream.add_to_index(worlds.fa4.path(EINOPS), advertised_sha256="0" * 64)
    bad = download()
    assert bad.returncode == 1 and "THESE PACKAGES DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr
    upstream.add_to_index(worlds.fa4.path(EINOPS))
    upstream.fail(EINOPS, "corrupt")
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in download().stderr
    upstream.fail(EINOPS, "404")
    assert "404 Client Error" in download().stderr
    upstream.fail(EINOPS, "truncate", times=1)     # pip resumes with a Range request and succeeds
    ok(download())
    assert sha256_file(tmp_path / "dl" / EINOPS) == sha256_file(worlds.fa4.path(EINOPS))
    (tmp_path / "dl" / EINOPS).unlink()
    upstream.clear_faults()
    upstream.down()                                # an unreachable index reads as "no versions", rc 1
    down = download()
    assert down.returncode == 1 and "No matching distribution found for einops" in down.stderr, down.stderr
    upstream.up()


# --- installs into real venvs ------------------------------------------------------------------


def test_fa4_closure_installs_into_a_fresh_venv(store: Path, tmp_path: Path) -> None:
    py = make_venv(tmp_path / "venv")
    ok(run_pip("install", "--no-index", "--no-deps", store / f"torch-{TORCH_STANDIN_VERSION}-py3-none-any.whl",
               python=py))
    ok(run_pip("install", "--no-index", "--find-links", store, f"flash-attn-4[cu13]=={FA4}", python=py))
    assert "No broken requirements found" in ok(run_pip("check", python=py))
    assert installed(py, "flash-attn-4") == FA4
    assert installed(py, "torch") == TORCH_STANDIN_VERSION       # untouched
    assert installed(py, "apache-tvm-ffi") == "0.1.11"
    assert installed(py, "flash-attn") is None
    mods = [m for d, m in MODULES.items() if d != "flash-attn"]
    code = f"import {', '.join(mods)}; from flash_attn.cute import flash_attn_func; print(flash_attn_func(1, 2, 3))"
    assert subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "1"
    # FA4 ships no flash_attn/__init__.py: flash_attn is a namespace package
    assert not list((tmp_path / "venv" / "lib").glob("python*/site-packages/flash_attn/__init__.py"))
    assert list((tmp_path / "venv" / "lib").glob("python*/site-packages/flash_attn/cute/__init__.py"))


def test_fa2_release_wheel_installs_by_path_not_by_requirement(worlds: Worlds, store: Path, tmp_path: Path) -> None:
    tag = local_python_tag()
    for _, p in worlds.fa2.release_assets:
        shutil.copy2(p, store / p.name)
    py = make_venv(tmp_path / "venv")
    ok(run_pip("install", "--no-index", "--no-deps", worlds.torch, python=py))
    # the file name's local version (+cu12torch…) is not in METADATA: pip discards it as a candidate
    by_name = run_pip("install", "--no-index", "--find-links", store, "flash-attn==2.8.3", python=py)
    assert by_name.returncode == 1 and "inconsistent version" in by_name.stdout + by_name.stderr
    other = next(p for _, p in worlds.fa2.release_assets if f"-{tag}-" not in p.name)
    foreign = run_pip("install", "--no-index", "--find-links", store, store / other.name, python=py)
    assert foreign.returncode == 1 and "is not a supported wheel on this platform" in foreign.stderr
    mine = next(p for _, p in worlds.fa2.release_assets if f"-{tag}-{tag}-linux_x86_64" in p.name)
    ok(run_pip("install", "--no-index", "--find-links", store, store / mine.name, python=py))   # brings einops
    assert installed(py, "flash-attn") == "2.8.3" and installed(py, "einops") == "0.8.1"
    assert "No broken requirements found" in ok(run_pip("check", python=py))


@pytest.mark.parametrize("which", ["fa1", "fa2"])
def test_sdist_from_the_index_builds_and_installs(worlds: Worlds, tmp_path: Path, which: str) -> None:
    universe, version = (worlds.fa1, "1.0.9") if which == "fa1" else (worlds.fa2, "2.8.3")
    with FakeUpstream() as up:
        up.publish(universe)
        ok(run_pip("download", "--no-cache-dir", "--no-deps", "--no-binary=:all:", "--index-url", up.index_url,
                   "-d", tmp_path / "dl", f"flash-attn=={version}"))
        assert [p.name for p in (tmp_path / "dl").iterdir()] == [f"flash_attn-{version}.tar.gz"]
    py = make_venv(tmp_path / "venv")
    ok(run_pip("install", "--no-index", "--no-deps", worlds.torch, python=py))
    ok(run_pip("install", "--no-index", "--no-cache-dir", "--find-links", tmp_path / "dl", f"flash-attn=={version}",
               python=py))
    code = "import flash_attn; print(flash_attn.__version__, flash_attn.BUILT_FROM_SOURCE)"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [version, "True"]


def test_venv_without_pip_installs_with_the_ensurepip_wheel(store: Path, tmp_path: Path) -> None:
    wheel = pip_wheel()
    assert wheel.name.startswith("pip-") and wheel.suffix == ".whl"
    py = make_venv(tmp_path / "nopip")
    proc = subprocess.run([str(py), f"{wheel}/pip", "install", "--no-index", "--find-links", str(store), "einops"],
                          env=pip_env(), capture_output=True, text=True, timeout=60, check=False)
    ok(proc)
    code = ("import einops, sys, importlib.util\n"
            "print(einops.__file__.startswith(sys.prefix), importlib.util.find_spec('pip'))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "None"]     # installed into that venv; pip itself was not installed there
    assert list((tmp_path / "nopip" / "lib").glob("python*/site-packages/einops/__init__.py"))
