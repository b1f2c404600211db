"""``fleetctl bundle export|import|show``: carry artifacts to an air-gapped controller (docs/rollout.md).

``export`` runs on a connected host and needs no controller for ``--facts``/``--plan``; ``--nodes`` asks a
controller for its dry run. ``import`` checks the whole bundle, then uploads into a controller's store
(HTTP API, admin token, like ``fleetctl artifact add``). ``show`` prints a bundle's lock for an audit of what
enters the site. The bundle format and the checks are in controller/bundle.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleetctl.controller.bundle import Lock, export_bundle, extract_verified, needing_artifacts, plan_facts, read_lock
from fleetctl.controller.catalog import default_catalog, load_catalog_file
from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.artifacts import upload
from fleetctl.controller.commands.plan import load_fleet, policy_from_args
from fleetctl.controller.commands.table import render
from fleetctl.controller.upstream import DEFAULT_INDEX_URL, UpstreamConfig
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import InputError, NotFoundError, UsageError


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("bundle", help="carry artifacts to an air-gapped controller (export, import, show)",
                                description="Air-gapped sites: export every artifact some nodes' rollouts need on a "
                                            "connected host, import it into an offline controller's store.")
    sub = top.add_subparsers(dest="bundle_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("export", help="fetch what the nodes need into a bundle (on a connected host)",
                       description="Plan the nodes with the controller's planner, fetch every artifact their rollout "
                                   "needs (release wheels or sdists, dependency closures for each node's Python and "
                                   "platform, pip, the agent's wheels) and write them with a lock file.")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the bundle to write (a tar)")
    src = p.add_argument_group("which nodes (one of)")
    src.add_argument("--facts", action="append", metavar="FILE", help='{"nodes": [...]} facts file (repeatable; '
                     "`fleet-agent facts --json` on each node)")
    src.add_argument("--plan", type=Path, metavar="FILE", help="a saved `fleetctl rollout flash-attn --dry-run --json`")
    src.add_argument("--nodes", metavar="SELECTOR", help="ask a controller for its dry run of these nodes")
    add_label_selector_arg(src)
    p.add_argument("--version", metavar="V", help="flash-attn release (default: the newest in the catalog)")
    p.add_argument("--fa4", action="store_true", help="flash-attn-4 where it runs (as `rollout flash-attn --fa4`)")
    p.add_argument("--fa3", action="store_true", help="FA3 source builds on Hopper nodes")
    p.add_argument("--policy", metavar="FILE", help='policy file {"version", "fa3", "fa4", "source_builds"}')
    p.add_argument("--catalog", type=Path, metavar="FILE", help="wheel catalog (default: the built-in one)")
    p.add_argument("--upstream-index", metavar="URL", default=DEFAULT_INDEX_URL,
                   help=f"PyPI-compatible index for sdists and dependencies (default {DEFAULT_INDEX_URL})")
    p.add_argument("--wheel-mirror", metavar="URL", help="fetch release wheels from URL/vX.Y.Z/FILE or URL/FILE "
                   "instead of GitHub")
    p.add_argument("--no-agent-wheels", dest="agent_wheels", action="store_false",
                   help="leave out fleet-agent's own wheels (fleetctl and its runtime dependencies)")
    p.add_argument("--json", action="store_true", help="print the lock as JSON")
    add_controller_args(p)
    p.set_defaults(handler=handle_export)

    p = sub.add_parser("import", help="check a bundle, then put its files in the controller's store")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true")
    add_controller_args(p)
    p.set_defaults(handler=handle_import)

    p = sub.add_parser("show", help="list a bundle's lock: files, digests, sources, nodes")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--verify", action="store_true", help="also check every file's size and sha256")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=handle_show)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- export ---------------------------------------------------------------------------------------------


def _plans(args: argparse.Namespace) -> list[Mapping[str, Any]]:
    sources = (("--facts", args.facts), ("--plan", args.plan), ("--nodes/-l", args.nodes or args.labels))
    given = [name for name, v in sources if v]
    if len(given) != 1:
        raise UsageError("give exactly one of --facts FILE, --plan FILE, --nodes SELECTOR"
                         + (f" (got {', '.join(given)})" if given else ""),
                         hint="--facts for facts files, --plan for a saved dry run, --nodes to ask a controller")
    if args.facts:
        return _plans_from_facts(args)
    if args.plan:
        if args.version or args.fa3 or args.fa4 or args.policy or args.catalog:
            raise UsageError("--version/--fa3/--fa4/--policy/--catalog do not apply to --plan (the plan is made)",
                             hint="plan again with those options, or drop them")
        return _plans_from_file(args.plan)
    return _plans_from_controller(args)


def _plans_from_facts(args: argparse.Namespace) -> list[Mapping[str, Any]]:
    policy = policy_from_args(args)
    catalog = load_catalog_file(args.catalog) if args.catalog else default_catalog(args.state_dir)
    version = policy.version or catalog.newest_release
    if version is None:
        raise NotFoundError("the wheel catalog lists no FlashAttention 2 release", hint="give --catalog FILE")
    if version not in catalog.releases:
        raise NotFoundError(f"flash-attn {version} is not in the catalog",
                            hint=f"known releases: {', '.join(list(catalog.releases)[-15:])} (pick one with --version)")
    policy = dataclasses.replace(policy, version=version)
    entries = [e for path in args.facts for e in load_fleet(path)]
    return list(plan_facts(entries, catalog, policy, version))


def _plans_from_file(path: Path) -> list[Mapping[str, Any]]:
    try:
        obj = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read the plan {path}: {exc.strerror or exc}", hint="check the path") from None
    except ValueError as exc:
        raise InputError(f"the plan {path} is not JSON: {exc}", hint="save `fleetctl rollout flash-attn --dry-run "
                                                                     "--json` output") from None
    nodes = obj.get("nodes") if isinstance(obj, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise InputError(f"the plan {path} has no nodes list", hint="save `fleetctl rollout flash-attn --dry-run "
                                                                    "--json` output")
    return nodes


def _plans_from_controller(args: argparse.Namespace) -> list[Mapping[str, Any]]:
    policy = policy_from_args(args)
    body = {"version": policy.version, "nodes": args.nodes, "labels": args.labels,
            "dry_run": True, "actor": "bundle-export",
            "fa3": policy.fa3, "fa4": policy.fa4, "source_builds": policy.source_builds}
    out = ControllerClient.from_args(args).post("/rollouts", body)
    nodes: list[Mapping[str, Any]] = out.get("nodes") or []
    return nodes


def handle_export(args: argparse.Namespace) -> int:
    plans = _plans(args)
    chosen, left = needing_artifacts(plans)
    for line in left:
        _progress(f"skipped {line}")
    config = UpstreamConfig(index_url=args.upstream_index, wheel_mirror=args.wheel_mirror)
    _progress(f"fetching for {len(chosen)} node(s) from {config.describe()}")
    lock = export_bundle(chosen, args.output, config, agent_wheels=args.agent_wheels, progress=_progress)
    if args.json:
        print_json(lock.to_json())
    else:
        kinds = len({(n.variant, n.version, tuple(sorted(n.target_env.items()))) for n in lock.nodes})
        print(f"wrote {args.output}: {len(lock.files)} file(s), {_mib(lock.total_bytes)} for {len(lock.nodes)} "
              f"node(s) of {kinds} kind(s)")
        print(f"next: carry it to the air-gapped site, `fleetctl bundle show {args.output.name}` to audit, "
              f"`fleetctl bundle import {args.output.name}` against its controller")
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---- import / show --------------------------------------------------------------------------------------


def handle_import(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fleet-bundle-import-") as tmp:
        lock, paths = extract_verified(args.file, Path(tmp))  # raises before anything is uploaded
        _progress(f"{args.file}: {len(lock.files)} file(s), {_mib(lock.total_bytes)}, every sha256 matches lock.json")
        client = ControllerClient.from_args(args)
        # a file already there but not vouched for (an agent's upload, or stored before provenance) is uploaded
        # again: the bundle's provenance is what makes it usable (controller/artifacts.py)
        present = {a["sha256"] for a in client.get("/artifacts")["artifacts"]
                   if a.get("source") in ("user", "upstream", "bundle")}
        lock_sha = lock.digest()
        uploaded, skipped = [], []
        for f in lock.files:
            if f.sha256 in present:
                skipped.append(f.filename)
                _progress(f"  {f.filename}: already in the store, skipped")
                continue
            upload(client, paths[f.filename], f.kind, f.filename, bundle=(lock_sha, args.file.name))
            uploaded.append(f.filename)
            _progress(f"  {f.filename}: uploaded ({f.kind}, {f.size} bytes)")
    if args.json:
        print_json({"file": str(args.file), "uploaded": uploaded, "already_present": skipped,
                    "nodes": [n.hostname for n in lock.nodes]})
        return 0
    print(f"imported {args.file}: {len(uploaded)} file(s) uploaded, {len(skipped)} already in the store, for "
          f"{len(lock.nodes)} node(s): {', '.join(n.hostname for n in lock.nodes)}")
    print("next: `fleetctl rollout flash-attn --dry-run` shows where each node's artifacts come from")
    return 0


def handle_show(args: argparse.Namespace) -> int:
    if args.verify:
        with tempfile.TemporaryDirectory(prefix="fleet-bundle-show-") as tmp:
            lock: Lock = extract_verified(args.file, Path(tmp))[0]
    else:
        lock = read_lock(args.file)
    if args.json:
        print_json(lock.to_json())
        return 0
    print(f"bundle {args.file} (created {lock.created}): {len(lock.files)} file(s), {_mib(lock.total_bytes)}"
          + (", every file checked against lock.json" if args.verify else ""))
    print(render([[f.kind, f.size, f.sha256[:16], f.filename, f.source] for f in lock.files],
                 ["kind", "bytes", "sha256", "file", "source"]))
    print()
    print(render([[n.hostname, n.variant, n.version or "-", " ".join(f"{k}={v}" for k, v in n.target_env.items()),
                   len(n.needs), len(n.agent)] for n in lock.nodes],
                 ["node", "variant", "version", "target env", "files", "agent files"]))
    return 0
