"""``fleet-controller fleet up|down|status``: a controller plus N simulated agents on this machine."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from fleetctl.controller.simfleet import DEFAULT_PROFILES, SimFleet
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("fleet", help="a simulated fleet for demos and tests",
                              description="Bring up a controller and N simulated agents (each a real agent "
                                          "process with its own state dir and network address). See docs/fleet.md.")
    sub = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    sub.required = True
    up = sub.add_parser("up", help="start a controller and N simulated agents")
    up.add_argument("--nodes", type=int, default=8, help="number of simulated nodes (default 8)")
    up.add_argument("--profiles", default=",".join(DEFAULT_PROFILES[:8]),
                    help="comma-separated simulation profiles, used round-robin")
    up.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                    help="controller state dir; agents live in DIR/sim/<host> (default ./state/controller)")
    up.add_argument("--db", metavar="URL", help="database URL (default SQLite in the state dir)")
    up.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto",
                    help="per-node addresses: network namespaces (root) or 127.0.x.y (default: auto)")
    up.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="S")
    up.add_argument("--missed-heartbeats", type=int, default=3, metavar="N")
    up.add_argument("--executor", choices=("none", "ansible", "simulated"), default="none",
                    help="agents' job executor (default none: simulated nodes have no root to run playbooks in)")
    up.add_argument("--foreground", action="store_true", help="stay up until Ctrl-C, then tear down")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all nodes to register")
    up.add_argument("--json", action="store_true")
    up.set_defaults(handler=handle_up)
    down = sub.add_parser("down", help="stop the simulated fleet in --state-dir")
    down.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR")
    down.set_defaults(handler=handle_down)
    st = sub.add_parser("status", help="show the simulated fleet in --state-dir")
    st.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=handle_status)


def handle_up(args: argparse.Namespace) -> int:
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    fleet = SimFleet(args.state_dir, nodes=args.nodes, profiles=profiles, db_url=args.db, network=args.network,
                     heartbeat_interval=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
                     executor=args.executor)
    if profiles:  # fail early on an unknown profile
        fleet.check_profiles()
    state = fleet.up(timeout=args.timeout)
    if args.json:
        print_json(fleet.status())
    else:
        print(f"controller: http {state.http}, agents dial {state.controller_address} (network: {state.mode})")
        for n in state.nodes:
            print(f"  {n.hostname:<32} {n.profile:<26} {n.address:<15} {n.netns or ''}")
        print(f"{len(state.nodes)} simulated nodes registered. Try: fleetctl nodes --state-dir {args.state_dir}")
        print(f"Stop with: fleet-controller fleet down --state-dir {args.state_dir}")
    if args.foreground:
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        try:
            while not stopping:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        fleet.down()
    return 0


def handle_down(args: argparse.Namespace) -> int:
    SimFleet.load(args.state_dir).down()
    print(f"simulated fleet in {args.state_dir} stopped")
    return 0


def handle_status(args: argparse.Namespace) -> int:
    st = SimFleet.load(args.state_dir).status()
    if args.json:
        print_json(st)
    else:
        for n in st["nodes"]:
            print(f"{n['hostname']:<32} pid {n['pid']} {'alive' if st['alive'][n['hostname']] else 'DEAD'} "
                  f"{n['address']} {n['netns'] or ''}")
    return 0
