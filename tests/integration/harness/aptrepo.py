"""A signed apt repository built by the tests and served over HTTP on 127.0.0.1.

``GpgKey`` makes a throwaway signing key (batch, no passphrase, its own GNUPGHOME).
``build_cuda_toolkit_deb`` makes a stand-in ``cuda-toolkit-X-Y`` package whose
``/usr/local/cuda-X.Y/bin/nvcc`` prints the real ``nvcc -V`` format. ``FlatRepo`` writes a
flat repository (the layout NVIDIA's CUDA repository uses: ``deb URL /``) with
``apt-ftparchive`` and signs ``InRelease``/``Release.gpg``. ``HttpServer`` serves a
directory from a thread.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socketserver
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from tests.integration.harness.debian import HarnessError

NVCC_BUILDS = {"12.4": ("12.4.131", "34097967"), "12.6": ("12.6.85", "35059454"),
               "13.0": ("13.0.88", "36424714"), "12.1": ("12.1.105", "32767060")}


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class GpgKey:
    def __init__(self, workdir: Path, name: str = "Fleet Test Repo") -> None:
        self.home = Path(tempfile.mkdtemp(prefix="gnupg-", dir=workdir))
        self.home.chmod(0o700)
        self.env = {"GNUPGHOME": str(self.home), "PATH": "/usr/bin:/bin"}
        _run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <repo@fleet.test>",
              "ed25519", "sign", "never"], env=self.env)
        out = _run(["gpg", "--batch", "--with-colons", "--list-keys"], env=self.env).stdout
        self.fingerprint = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def export_armored(self, dest: Path) -> Path:
        _run(["gpg", "--batch", "--yes", "--armor", "--output", str(dest), "--export", self.fingerprint], env=self.env)
        return dest

    def export_binary(self, dest: Path) -> Path:
        _run(["gpg", "--batch", "--yes", "--output", str(dest), "--export", self.fingerprint], env=self.env)
        return dest

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def nvcc_script(version: str) -> str:
    full, build = NVCC_BUILDS.get(version, (f"{version}.0", "30000000"))
    return (
        "#!/bin/sh\n"
        "# stand-in for NVIDIA's nvcc (fleetctl tests): prints the real -V format\n"
        'case "$1" in\n'
        "  -V|--version)\n"
        "    echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        "    echo 'Copyright (c) 2005-2025 NVIDIA Corporation'\n"
        "    echo 'Built on Tue_Feb_27_16:19:38_PST_2024'\n"
        f"    echo 'Cuda compilation tools, release {version}, V{full}'\n"
        f"    echo 'Build cuda_{version}.r{version}/compiler.{build}_0'\n"
        "    exit 0 ;;\n"
        "esac\n"
        "echo 'nvcc stand-in: only -V is supported' >&2\n"
        "exit 1\n"
    )


def build_cuda_toolkit_deb(version: str, outdir: Path) -> Path:
    pkg = f"cuda-toolkit-{version.replace('.', '-')}"
    full = NVCC_BUILDS.get(version, (f"{version}.0", ""))[0]
    tree = Path(tempfile.mkdtemp(prefix=f"{pkg}-"))
    try:
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {pkg}\nVersion: {full}-1\nArchitecture: amd64\nMaintainer: fleetctl tests <t@fleet.test>\n"
            f"Section: devel\nPriority: optional\nDescription: CUDA Toolkit {version} (fleetctl test stand-in)\n"
            " Installs only an nvcc that prints the real nvcc -V format.\n")
        bindir = tree / "usr" / "local" / f"cuda-{version}" / "bin"
        bindir.mkdir(parents=True)
        (bindir / "nvcc").write_text(nvcc_script(version))
        (bindir / "nvcc").chmod(0o755)
        (tree / "usr" / "local" / f"cuda-{version}" / "version.json").write_text(
            f'{{"cuda": {{"name": "CUDA SDK", "version": "{full}"}}}}\n')
        outdir.mkdir(parents=True, exist_ok=True)
        out = outdir / f"{pkg}_{full}-1_amd64.deb"
        _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(out)])
        return out
    finally:
        shutil.rmtree(tree, ignore_errors=True)


class FlatRepo:
    """A flat apt repository in ``path`` signed by ``key``; source line: ``deb [signed-by=…] URL /``."""

    def __init__(self, path: Path, key: GpgKey) -> None:
        self.path = path
        self.key = key
        path.mkdir(parents=True, exist_ok=True)

    def add(self, deb: Path) -> None:
        shutil.copy2(deb, self.path / deb.name)

    def publish(self) -> None:
        packages = _run(["apt-ftparchive", "packages", "."], cwd=self.path).stdout
        (self.path / "Packages").write_text(packages)
        _run(["gzip", "-9kf", "Packages"], cwd=self.path)
        for f in ("Release", "InRelease", "Release.gpg"):
            (self.path / f).unlink(missing_ok=True)
        release = _run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=fleetctl-tests",
                        "-o", "APT::FTPArchive::Release::Label=fleetctl-tests", "release", "."],
                       cwd=self.path).stdout
        (self.path / "Release").write_text(release)
        _run(["gpg", "--batch", "--yes", "--local-user", self.key.fingerprint, "--clearsign",
              "--output", "InRelease", "Release"], cwd=self.path, env=self.key.env)
        _run(["gpg", "--batch", "--yes", "--local-user", self.key.fingerprint, "--armor", "--detach-sign",
              "--output", "Release.gpg", "Release"], cwd=self.path, env=self.key.env)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpServer:
    """Serves ``directory`` at http://127.0.0.1:PORT/ from a daemon thread (free port)."""

    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = _Server((host, 0), handler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="apt-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
