"""Real SSH hosts for `fleetctl agents install|upgrade|uninstall` tests: Debian's sshd, one per host.

Each host is a Debian node root (``debian.NodeRoot``: an overlay over the cached bookworm base, its own ``/proc``
and ``/dev``) and its own ``/usr/sbin/sshd -D`` on a free loopback port whose ``ChrootDirectory`` is that root: a
login lands in the node's filesystem (its Python, its /opt, /etc, /var), so three hosts are three separate
machines to Ansible while sharing this machine's network (their agents reach the controller on 127.0.0.1). Key
authentication only, a key made for the test. Nothing of SSH is mocked.

sshd wants every component of a chroot path owned by root and writable by nobody else, so the roots live under
``/run/fleetctl-ssh-hosts`` (0755), never under /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness.debian import NodeRoot, can_build_roots, debian_base, processes_in_root

SSHD = Path("/usr/sbin/sshd")
HOSTS_ROOT = Path("/run/fleetctl-ssh-hosts")


def skip_reason() -> str | None:
    """None when real SSH hosts can be made here, else why not (scripts/bootstrap installs what is missing)."""
    if (why := can_build_roots()) is not None:
        return why
    for tool in (SSHD, Path(shutil.which("ssh") or "/nonexistent"), Path(shutil.which("ssh-keygen") or "/none")):
        if not tool.exists():
            return f"{tool.name} is not installed (openssh-server / openssh-client)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SshHost:
    name: str
    port: int
    root: NodeRoot
    sshd: subprocess.Popen[bytes]
    log: Path

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """argv inside the host (as its root user would run it)."""
        return self.root.chroot(*argv, check=check)

    def file(self, path: str) -> Path:
        return self.root.file(path)


def _keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True, capture_output=True,
                   timeout=60)
    return path


def _start_sshd(name: str, root: NodeRoot, conf_dir: Path, client_pub: Path) -> tuple[subprocess.Popen[bytes], int,
                                                                                        Path]:
    port = _free_port()
    host_key = _keygen(conf_dir / "ssh_host_ed25519_key")
    authorized = conf_dir / "authorized_keys"
    shutil.copy(client_pub, authorized)
    authorized.chmod(0o600)
    config = conf_dir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {conf_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        f"ChrootDirectory {root.path}", "Subsystem sftp internal-sftp", "LogLevel VERBOSE", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = conf_dir / "sshd.log"
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd for {name} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port, log
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sshd for {name} did not listen on {port}: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def ssh_hosts(names: Sequence[str], *, lowers: Sequence[Path] = ()) -> Iterator[tuple[list[SshHost], Path]]:
    """``names`` as running SSH hosts, and the private key that logs in to all of them as root; torn down after."""
    HOSTS_ROOT.mkdir(mode=0o755, exist_ok=True)
    HOSTS_ROOT.chmod(0o755)
    keys = Path(tempfile.mkdtemp(prefix="fleetctl-ssh-keys-"))
    client_key = _keygen(keys / "id_ed25519")
    base = debian_base()
    hosts: list[SshHost] = []
    try:
        for name in names:
            work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=HOSTS_ROOT))
            work.chmod(0o755)
            root = NodeRoot([*lowers, base], work / "node", name=name)
            root.mount()
            # a real host has its ptys: ansible-runner (the agent's executor) runs ansible-playbook on one
            subprocess.run(["mount", "--bind", "/dev/pts", str(root.path / "dev" / "pts")], check=True, timeout=30)
            conf = work / "sshd"
            conf.mkdir(mode=0o700)
            try:
                proc, port, log = _start_sshd(name, root, conf, client_key.with_suffix(".pub"))
            except BaseException:
                root.unmount()
                raise
            hosts.append(SshHost(name, port, root, proc, log))
        yield hosts, client_key
    finally:
        for host in hosts:
            host.sshd.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.sshd.wait(timeout=10)
            if host.sshd.poll() is None:
                host.sshd.kill()
            for pid in processes_in_root(host.root.path):  # the agent first: it may hold a pty
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", str(host.root.path / "dev" / "pts")], capture_output=True, check=False,
                           timeout=30)
            host.root.unmount()  # and anything left inside
            shutil.rmtree(host.root.dir.parent, ignore_errors=True)
        shutil.rmtree(keys, ignore_errors=True)


def inventory(hosts: Sequence[SshHost], key: Path, path: Path, *, host_vars: str = "") -> Path:
    """An INI inventory as an operator would write it: each host's address, port, user and key."""
    lines = ["[gpu]"]
    lines += [f"{h.name} ansible_host=127.0.0.1 ansible_port={h.port} ansible_user=root "
              f"ansible_ssh_private_key_file={key} {host_vars}".rstrip() for h in hosts]
    lines += ["", "[gpu:vars]", "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
              ""]
    path.write_text("\n".join(lines))
    return path
