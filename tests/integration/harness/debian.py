"""Debian roots for simulated nodes.

``debian_base()`` builds a bookworm root once with debootstrap and caches it under
``~/.cache/fleetctl/debian-base/<key>/root`` (``COMPLETE`` marks a finished build; a file
lock serialises parallel test runs). ``NodeRoot`` mounts one overlay per simulated node
(lower layers read-only, a private upper dir), plus ``/proc`` and a bind of ``/dev``, and
takes it all down again, killing any process left running inside.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"
INCLUDE = ("python3", "python3-venv", "python3-pip", "python3-apt", "gnupg", "ca-certificates", "ninja-build")
CACHE = Path(os.environ.get("FLEETCTL_CACHE", Path.home() / ".cache" / "fleetctl")) / "debian-base"


class HarnessError(RuntimeError):
    pass


def mirror_url() -> str:
    """The Debian mirror this machine's apt uses (deb.debian.org when none is configured)."""
    if os.environ.get("FLEETCTL_DEBIAN_MIRROR"):
        return os.environ["FLEETCTL_DEBIAN_MIRROR"]
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or path.name.endswith(("disabled", "-by-farm")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                for uri in words[1:]:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri
            elif words[:1] == ["deb"]:
                for w in words[1:]:
                    if w.startswith("http") and w.rstrip("/").endswith("/debian"):
                        return w
    return "http://deb.debian.org/debian"


def can_build_roots() -> str | None:
    """None when this machine can build and mount node roots, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, overlay mounts)"
    for tool in ("debootstrap", "chroot", "mount", "umount", "gpg", "apt-ftparchive", "dpkg-deb"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed"
    return None


def base_key() -> str:
    return f"{SUITE}-" + hashlib.sha256(",".join(INCLUDE).encode()).hexdigest()[:10]


def debian_base(timeout_s: float = 900) -> Path:
    """The cached debootstrap root, built on first use."""
    d = CACHE / base_key()
    d.mkdir(parents=True, exist_ok=True)
    root, done = d / "root", d / "COMPLETE"
    if done.exists() and root.is_dir():
        return root
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and root.is_dir():
            return root
        tmp = d / "root.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        if root.exists():
            shutil.rmtree(root)
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(tmp), mirror_url()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise HarnessError(f"debootstrap failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=False, capture_output=True)
        tmp.rename(root)
        done.write_text(" ".join(cmd) + "\n")
    return root


def _run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc  # type: ignore[no-any-return]


def processes_in_root(root: Path) -> list[int]:
    real = os.path.realpath(root)
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/root") == real:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


class NodeRoot:
    """One simulated node's root: an overlay over ``lowers`` (first = top) with its own upper dir."""

    def __init__(self, lowers: Sequence[Path], workdir: Path | None = None, *, name: str = "node") -> None:
        self.lowers = [Path(p) for p in lowers]
        self._own_tmp = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"fleet-{name}-"))
        self.upper = self.dir / "upper"
        self.work = self.dir / "work"
        self.path = self.dir / "merged"
        self._mounts: list[Path] = []

    def __enter__(self) -> NodeRoot:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def mount(self) -> None:
        for p in (self.upper, self.work, self.path):
            p.mkdir(parents=True, exist_ok=True)
        lower = ":".join(str(p) for p in self.lowers)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={lower},upperdir={self.upper},workdir={self.work}", str(self.path)])
        self._mounts.append(self.path)
        _run(["mount", "-t", "proc", "proc", str(self.path / "proc")])
        self._mounts.append(self.path / "proc")
        _run(["mount", "--bind", "/dev", str(self.path / "dev")])
        self._mounts.append(self.path / "dev")

    def unmount(self) -> None:
        for _ in range(3):
            pids = processes_in_root(self.path)
            if not pids:
                break
            for pid in pids:  # only processes started inside this test root
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for m in reversed(self._mounts):
            if subprocess.run(["umount", str(m)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)
        self._mounts.clear()
        if self._own_tmp:
            shutil.rmtree(self.dir, ignore_errors=True)

    def chroot(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run argv inside this root (no shell)."""
        full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
                    "HOME": "/root", **(env or {})}
        proc = subprocess.run(["chroot", str(self.path), *argv], capture_output=True, text=True, env=full_env,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise HarnessError(f"chroot {' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        return proc

    def file(self, path: str) -> Path:
        """A path inside the root, seen from the host."""
        return self.path / path.lstrip("/")


@contextlib.contextmanager
def layer(lowers: Sequence[Path], dest: Path) -> Iterator[NodeRoot]:
    """Prepare a reusable layer: mount an overlay, let the caller change it, keep its upper dir at ``dest``."""
    work = Path(tempfile.mkdtemp(prefix="fleet-layer-"))
    node = NodeRoot(lowers, work, name="layer")
    node.mount()
    try:
        yield node
    finally:
        node.unmount()
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(node.upper), str(dest))
    shutil.rmtree(work, ignore_errors=True)
