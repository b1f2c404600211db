"""``fleetctl agents install|upgrade|uninstall --inventory FILE`` and ``fleetctl agents wheels add|list``: the agent
put on nodes over SSH, through ansible-runner and the operator's own Ansible inventory (docs/deploy.md, "Agents over
SSH").

The nodes need no index and no internet: the agent's wheels (fleetctl's own and its dependencies for the nodes'
Python, kind ``agent`` in the controller's artifact store: ``fleetctl agents wheels add``) are fetched from the
controller by this command and copied to each host by the playbook (``controller/playbooks/agent-install.yml``),
which installs them into the agent's own venv, writes the CA and an enrollment token (one per host, bound to its
name, created here only for hosts the controller does not know yet), and starts the service. Then this command waits
until every host reports online with the wanted agent version. ``upgrade`` does the same in batches, stopping when
more hosts failed than ``--max-failures`` allows. Per-host outcomes come from ansible-runner's playbook statistics
and the controller's view of the node, never from parsing Ansible's output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.controller.commands.artifacts import upload
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import ExecutionError, FleetError, InputError

PLAYBOOKS = resources.files("fleetctl.controller") / "playbooks"
AGENT_UNIT = resources.files("fleetctl") / "deploy" / "systemd" / "fleet-agent.service"
TOKEN_TTL_S = 3600


@dataclass
class HostOutcome:
    host: str
    step: str = "pending"       # installed | unchanged | failed | unreachable | online | offline | removed
    detail: str = ""
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "outcome": self.step, "detail": self.detail, "agent_version": self.version}


@dataclass
class Plan:
    """What one install/upgrade/uninstall run works on."""
    inventory: Path
    hosts: list[str]
    extravars: dict[str, Any] = field(default_factory=dict)


def register(sub: Any) -> None:
    """The subcommands under ``fleetctl agents`` (controller/commands/agents.py adds them)."""
    for name, what in (("install", "install the agent on the inventory's hosts over SSH and wait until they are "
                                   "online (idempotent)"),
                       ("upgrade", "move the inventory's agents to another version, in batches with a failure "
                                   "budget")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ". " + __doc__.split("\n\n")[1])
        _host_args(p)
        p.add_argument("--version", metavar="V", help="agent version (default: the newest fleetctl wheel of kind "
                                                      "agent in the controller's artifact store)")
        p.add_argument("--agent-address", metavar="HOST:PORT",
                       help="the controller's agent (gRPC) address as nodes reach it (default: its listen address, "
                            "with the host of --controller where it listens on every interface)")
        p.add_argument("--enroll-address", metavar="HOST:PORT", help="likewise for enrollment")
        p.add_argument("--agent-args", default="", metavar="ARGS",
                       help="more `fleet-agent run` flags for every host (a host var fleet_agent_args overrides), "
                            "e.g. '--python /opt/venvs/train/bin/python'")
        p.add_argument("--wait", type=float, default=300.0, metavar="S",
                       help="how long to wait for the hosts to come online (default 300)")
        if name == "upgrade":
            p.add_argument("--batch", default="25%", metavar="N|P%", help="hosts per batch (default 25%%)")
            p.add_argument("--max-failures", type=int, default=0, metavar="N",
                           help="failed hosts tolerated before the upgrade stops (default 0)")
        p.set_defaults(handler=handle_install if name == "install" else handle_upgrade)
    u = sub.add_parser("uninstall", help="stop the agent and remove it from the inventory's hosts",
                       description="Stop the agent and remove its venv, unit and configuration. --purge also removes "
                                   "its identity and job records; --revoke revokes its certificate on the controller.")
    _host_args(u)
    u.add_argument("--purge", action="store_true", help="also remove /var/lib/fleetctl/agent")
    u.add_argument("--revoke", action="store_true", help="also revoke each host's agent identity")
    u.set_defaults(handler=handle_uninstall)
    w = sub.add_parser("wheels", help="the agent's wheels in the controller's artifact store (what install copies)")
    wsub = w.add_subparsers(dest="wheels_command", metavar="ACTION")
    wsub.required = True
    a = wsub.add_parser("add", help="store fleetctl's wheel and its dependencies' wheels for the nodes' Python",
                        description="Store wheels as kind `agent`: fleetctl-*.whl and the wheels of "
                                    "requirements/agent.txt for the nodes' Python and platform, e.g. "
                                    "`pip download --require-hashes -r requirements/agent.txt -d wheels/`.")
    a.add_argument("files", nargs="+", type=Path, metavar="WHEEL")
    a.add_argument("--json", action="store_true")
    add_controller_args(a)
    a.set_defaults(handler=handle_wheels_add)
    ls = wsub.add_parser("list", help="the agent wheels the controller holds")
    ls.add_argument("--json", action="store_true")
    add_controller_args(ls)
    ls.set_defaults(handler=handle_wheels_list)


def _host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inventory", "-i", type=Path, required=True, metavar="FILE", help="your Ansible inventory")
    p.add_argument("--limit", metavar="PATTERN", help="Ansible host pattern within the inventory")
    p.add_argument("--json", action="store_true")
    add_controller_args(p)


# ---- wheels ---------------------------------------------------------------------------------------------------


def agent_wheels(client: ControllerClient) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = client.get("/artifacts", kind="agent")["artifacts"]
    return listing


def newest_version(wheels: list[dict[str, Any]]) -> str:
    versions: list[Version] = []
    for w in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(w["filename"])
        except (ValueError, InvalidVersion):
            continue
        if name == canonicalize_name("fleetctl"):
            versions.append(version)
    if not versions:
        raise InputError("the controller holds no fleetctl wheel of kind agent",
                         hint="build it (`pip wheel --no-deps .`) and store it with its dependencies: "
                              "`fleetctl agents wheels add fleetctl-*.whl wheels/*.whl`")
    return str(max(versions))


def fetch_wheels(client: ControllerClient, wheels: list[dict[str, Any]], version: str, dest: Path) -> Path:
    """The agent wheels for ``version`` (other fleetctl versions left out) downloaded and checked into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in wheels if not w["filename"].startswith("fleetctl-")
              or w["filename"].startswith(f"fleetctl-{version}-")]
    if not any(w["filename"].startswith(f"fleetctl-{version}-") for w in wanted):
        raise InputError(f"the controller holds no fleetctl {version} wheel of kind agent",
                         hint="`fleetctl agents wheels list` shows what it holds; add it with `fleetctl agents "
                              "wheels add`")
    for w in wanted:
        path = client.download(f"/artifacts/{w['sha256']}/content", dest / w["filename"])
        if hashlib.sha256(path.read_bytes()).hexdigest() != w["sha256"]:
            raise ExecutionError(f"{w['filename']} arrived corrupted (sha256 mismatch)", hint="run the command again")
    return dest


def handle_wheels_add(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    for path in args.files:
        if path.suffix != ".whl":
            raise InputError(f"{path} is not a wheel", hint="agent wheels are *.whl files")
    stored = [upload(client, path, "agent") for path in args.files]
    if args.json:
        print_json({"stored": stored})
    else:
        for info in stored:
            print(f"stored {info['filename']} (agent, {info['size']} bytes)")
    return 0


def handle_wheels_list(args: argparse.Namespace) -> int:
    wheels = agent_wheels(ControllerClient.from_args(args))
    if args.json:
        print_json({"wheels": wheels})
    else:
        print(render([[w["filename"], w["size"], w["sha256"][:12]] for w in wheels], ["wheel", "bytes", "sha256"]))
    return 0


# ---- inventory and playbook -----------------------------------------------------------------------------------


def inventory_hosts(inventory: Path, limit: str | None) -> list[str]:
    """The inventory's hosts (within ``limit``), as ``ansible-inventory`` reads it: every format Ansible takes."""
    if not inventory.exists():
        raise InputError(f"inventory {inventory} does not exist", hint="pass your Ansible inventory file")
    tool = Path(sys.executable).with_name("ansible-inventory")
    argv = [str(tool if tool.exists() else "ansible-inventory"), "-i", str(inventory), "--list",
            *(["--limit", limit] if limit else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise InputError(f"ansible-inventory could not read {inventory}: {proc.stderr.strip()[-500:]}",
                         hint="check the inventory with `ansible-inventory -i FILE --list`")
    data = json.loads(proc.stdout)
    hosts = sorted(data.get("_meta", {}).get("hostvars", {}).keys()
                   | {h for group in data.values() if isinstance(group, dict) for h in group.get("hosts", [])})
    if not hosts:
        raise InputError(f"no host in {inventory}" + (f" matches --limit {limit}" if limit else ""),
                         hint="check the inventory and the pattern")
    return hosts


def run_playbook(name: str, plan: Plan, hosts: list[str]) -> dict[str, HostOutcome]:
    """``name`` against ``hosts`` through ansible-runner; each host's outcome from the playbook's statistics."""
    import ansible_runner  # only these commands need it: keep fleetctl's start light

    outcomes = {h: HostOutcome(h) for h in hosts}
    with tempfile.TemporaryDirectory(prefix="fleetctl-agents-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / f"{name}.yml").write_text((PLAYBOOKS / f"{name}.yml").read_text(encoding="utf-8"))
        failures: dict[str, str] = {}

        def on_event(event: dict[str, Any]) -> bool:
            data = event.get("event_data") or {}
            if event.get("event") in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
                res = data.get("res") or {}
                msg = str(res.get("msg") or res.get("stderr") or "")[-400:]
                failures[str(data.get("host"))] = f"{data.get('task')}: {msg}"
            return True

        # ansible-playbook from the venv fleetctl runs in (ansible-core is one of its dependencies)
        bindir = str(Path(sys.executable).parent)
        runner = ansible_runner.run(private_data_dir=tmp, playbook=f"{name}.yml",
                                    inventory=str(plan.inventory.resolve()), limit=",".join(hosts),
                                    extravars=plan.extravars, event_handler=on_event, quiet=True,
                                    envvars={"ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_RETRY_FILES_ENABLED":
                                             "False", "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
                                             "PATH": f"{bindir}:{os.environ.get('PATH', '')}"})
        stats = runner.stats or {}
        # the run's own last words, for a run that never reached the hosts (a bad playbook or inventory, no
        # ansible-playbook): shown to the operator as they are, never interpreted
        tail = " / ".join(line.strip() for line in runner.stdout.read().splitlines()[-4:] if line.strip()) \
            if not stats else ""
        for host, out in outcomes.items():
            if host in (stats.get("dark") or {}):
                out.step, out.detail = "unreachable", failures.get(host, "unreachable over SSH")
            elif host in (stats.get("failures") or {}):
                out.step, out.detail = "failed", failures.get(host, "a task failed")
            elif host in (stats.get("changed") or {}):
                out.step = "installed" if name == "agent-install" else "removed"
            elif host in (stats.get("ok") or {}):
                out.step = "unchanged" if name == "agent-install" else "removed"
            else:
                out.step, out.detail = "failed", (f"ansible-runner ended {runner.status} before reaching this host"
                                                  + (f": {tail[-600:]}" if tail else ""))
    return outcomes


# ---- install / upgrade ----------------------------------------------------------------------------------------


def _address(client: ControllerClient, given: str | None, listen: str) -> str:
    if given:
        return given
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = urlsplit(client.base_url).hostname or "localhost"
    return f"{host}:{port}"


def prepare(args: argparse.Namespace, client: ControllerClient, hosts: list[str], version: str,
            wheels_dir: Path) -> Plan:
    health = client.get("/health")
    agent_address = _address(client, args.agent_address, health["grpc"])
    enroll_address = _address(client, args.enroll_address, health["enroll"])
    listing = client.get("/nodes")
    supported = listing.get("supported_agent_versions")
    if supported and Version(version) not in SpecifierSet(supported, prereleases=True):
        raise InputError(f"agent {version} is outside what this controller supports ({supported})",
                         hint="upgrade the controller first, then its agents (docs/deploy.md, \"Version skew\"), "
                              "or pick a --version within that range")
    known = {n["hostname"] for n in listing["nodes"]}
    tokens = {h: client.post("/tokens", {"ttl_seconds": TOKEN_TTL_S, "hostname": h})["token"]
              for h in hosts if h not in known}
    return Plan(args.inventory, hosts, {
        "fleet_wheels_dir": str(wheels_dir), "fleet_version": version, "fleet_controller": agent_address,
        "fleet_ca_pem": client.get("/ca")["pem"], "fleet_tokens": tokens,
        "fleet_agent_args_common": f"--enroll-address {enroll_address} {args.agent_args}".strip(),
        "fleet_unit": AGENT_UNIT.read_text(encoding="utf-8")})


def wait_online(client: ControllerClient, outcomes: dict[str, HostOutcome], version: str, wait_s: float) -> None:
    """Hosts the playbook handled, until the controller sees each online with ``version`` (or ``wait_s``)."""
    waiting = {h for h, o in outcomes.items() if o.step in ("installed", "unchanged")}
    deadline = time.monotonic() + wait_s
    while waiting:
        for host in sorted(waiting):
            try:
                node = client.get(f"/nodes/{host}")
            except FleetError:
                continue  # not enrolled yet
            outcomes[host].version = node.get("agent_version")
            # online or degraded: connected either way (degraded is a verification verdict, not liveness)
            if node.get("status") in ("online", "degraded") and node.get("agent_version") == version:
                outcomes[host].step = "online"
                if node.get("status") == "degraded":
                    outcomes[host].detail = "connected; the node is degraded (see `fleetctl node HOST`)"
                waiting.discard(host)
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for host in waiting:
        o = outcomes[host]
        o.step, o.detail = "offline", (f"not online with agent {version} after {wait_s:.0f} s (seen: "
                                       f"{o.version or 'never'}); on the host: /var/log/fleet-agent.log or "
                                       f"`journalctl -u fleet-agent`")


def _report(args: argparse.Namespace, outcomes: dict[str, HostOutcome], extra: dict[str, Any]) -> int:
    rows = [outcomes[h] for h in sorted(outcomes)]
    bad = [o for o in rows if o.step not in ("online", "removed")]
    if args.json:
        print_json({**extra, "hosts": [o.to_json() for o in rows], "failed": len(bad)})
    else:
        print(render([[o.host, o.step, o.version or "-", o.detail] for o in rows],
                     ["host", "outcome", "agent", "detail"]))
        if bad:
            print(f"\n{len(bad)} host(s) not done: fix the cause shown, then run the same command again "
                  "(it is idempotent)", file=sys.stderr)
    return 1 if bad else 0


def _setup(args: argparse.Namespace) -> tuple[ControllerClient, list[str], str, Path]:
    client = ControllerClient.from_args(args)
    hosts = inventory_hosts(args.inventory, args.limit)
    wheels = agent_wheels(client)
    version = args.version or newest_version(wheels)
    tmp = Path(tempfile.mkdtemp(prefix="fleetctl-agent-wheels-"))
    return client, hosts, version, fetch_wheels(client, wheels, version, tmp)


def handle_install(args: argparse.Namespace) -> int:
    client, hosts, version, wheels_dir = _setup(args)
    try:
        outcomes = run_playbook("agent-install", prepare(args, client, hosts, version, wheels_dir), hosts)
        wait_online(client, outcomes, version, args.wait)
    finally:
        shutil.rmtree(wheels_dir, ignore_errors=True)
    return _report(args, outcomes, {"version": version})


def batch_size(spec: str, total: int) -> int:
    """``N`` hosts or ``P%`` of ``total`` per batch (at least one)."""
    try:
        n = math.ceil(total * float(spec[:-1]) / 100) if spec.endswith("%") else int(spec)
    except ValueError:
        raise InputError(f"--batch {spec!r} is not a count or a percentage", hint="e.g. --batch 5 or --batch 20%")\
            from None
    if n < 1 or (spec.endswith("%") and not 0 < float(spec[:-1]) <= 100):
        raise InputError(f"--batch {spec!r} is out of range", hint="at least one host; a percentage in (0, 100]")
    return max(1, n)


def handle_upgrade(args: argparse.Namespace) -> int:
    client, hosts, version, wheels_dir = _setup(args)
    size = batch_size(args.batch, len(hosts))
    outcomes: dict[str, HostOutcome] = {}
    stopped = ""
    try:
        plan = prepare(args, client, hosts, version, wheels_dir)
        for start in range(0, len(hosts), size):
            batch = hosts[start:start + size]
            done = run_playbook("agent-install", plan, batch)
            wait_online(client, done, version, args.wait)
            outcomes.update(done)
            failed = [o for o in outcomes.values() if o.step != "online"]
            if not args.json:
                print(f"batch {start // size + 1}: {', '.join(batch)} — "
                      f"{sum(o.step == 'online' for o in done.values())}/{len(batch)} on {version}", flush=True)
            if len(failed) > args.max_failures:
                stopped = (f"stopped after {len(failed)} failed host(s) (--max-failures {args.max_failures}); "
                           f"{len(hosts) - len(outcomes)} host(s) not touched")
                for host in hosts[start + size:]:
                    outcomes[host] = HostOutcome(host, "skipped", "the upgrade stopped before this batch")
                break
    finally:
        shutil.rmtree(wheels_dir, ignore_errors=True)
    if stopped and not args.json:
        print(stopped, file=sys.stderr)
    return _report(args, outcomes, {"version": version, "batch": size, "stopped": stopped or None})


def handle_uninstall(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    hosts = inventory_hosts(args.inventory, args.limit)
    outcomes = run_playbook("agent-uninstall", Plan(args.inventory, hosts, {"fleet_purge": args.purge}), hosts)
    if args.revoke:
        for host, o in outcomes.items():
            if o.step == "removed":
                try:
                    client.post(f"/nodes/{host}/revoke")
                except FleetError as exc:
                    o.detail = f"removed; revoke failed: {exc.message}"
    return _report(args, outcomes, {"purged": args.purge, "revoked": args.revoke})
