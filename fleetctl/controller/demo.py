"""README's first command (`./scripts/demo`): a controller and a simulated fleet, and a rollout on it.

1. starts `fleet-controller serve` (SQLite in ``--state-dir``, default ``./state/demo``) and one
   `fleet-agent run --simulate PROFILE --executor simulated` process per node (controller/simfleet.py:
   own state dir and network address each), mixed GPUs: H100, A100, L40S ×2 (one build, one install),
   T4 (FA1 build), RTX 4090, GH200, a node with a broken apt key, a V100 (SDPA only), H200;
2. prints `fleetctl nodes`, the dry run, then runs `fleetctl rollout flash-attn` with live progress
   (canaries, batches, build once / install many, verification), and `fleetctl nodes` again;
3. one node on the **real executor** (controller/demo_realnode.py): a real `fleet-agent --executor ansible`
   with its own venv — the controller fetches the wheel's dependency closure from the package index, the
   agent pip-installs it for real, the real benchmark fails (no GPU here, and it says so), and the rollback
   removes it again (``--no-real-node`` leaves it out);
4. prints where the dashboard is (and a login), then stops everything — or leaves it up with
   ``--keep-running`` (stop later with `fleet-controller fleet down --state-dir DIR`).

Only the GPUs (and what the playbooks do on them) are simulated; the controller, agents, gRPC (mTLS),
database, resolver, engine and HTTP API are the real ones, and everything simulated says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.demo_realnode import HOSTNAME, RealNode
from fleetctl.controller.simfleet import SimFleet
from fleetctl.fleet.errors import FleetError

DEMO_PROFILES = ["h100", "a100", "l40s", "t4", "rtx4090", "gh200", "l40s", "apt-nopubkey", "v100", "h200"]
MARKER = ".fleetctl-demo"


def _title(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _fresh_state(state: Path) -> None:
    """Reuse ``state`` only if an earlier demo made it; stop a fleet left running there."""
    if (state / "fleet.json").exists():
        with contextlib.suppress(FleetError):
            SimFleet.load(state).down()
    if state.exists() and any(state.iterdir()):
        if not (state / MARKER).exists():
            raise FleetError(f"{state} exists and was not made by the demo", hint="pass another --state-dir")
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / MARKER).write_text("made by python -m fleetctl.controller.demo\n")


# Nodes the agent cannot provision yet (or not in this demo's rollout), whose plans the resolver still makes:
# an AMD MI300X (ROCm), a Windows workstation and a Jetson Orin (issue 19). Their facts are simulated profiles.
MIXED_PLATFORM_PROFILES = ("mi300x", "windows-rtx4090", "jetson-orin")


def _mixed_platform_plans(state: Path) -> None:
    profiles = Path(__file__).resolve().parent.parent / "agent" / "profiles"
    nodes = [json.loads((profiles / f"{name}.json").read_text(encoding="utf-8")) for name in MIXED_PLATFORM_PROFILES]
    facts = state / "mixed-platforms.json"
    facts.write_text(json.dumps({"nodes": nodes}), encoding="utf-8")
    _title("fleetctl plan --facts mixed-platforms.json   (simulated MI300X, Windows and Jetson nodes)")
    print("(simulated facts from agent/profiles; the Windows plan lists commands the agent does not run yet)")
    fleetctl(["plan", "--facts", str(facts)])


def _dashboard_user(state: Path) -> str | None:
    password = secrets.token_urlsafe(12)
    proc = subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "user", "--state-dir", str(state),
                           "add", "demo",
                           "--role", "operator", "--password-stdin", "--replace"],
                          input=password + "\n", capture_output=True, text=True, timeout=60, check=False)
    return password if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path("state/demo"), help="default ./state/demo (recreated)")
    p.add_argument("--nodes", type=int, default=len(DEMO_PROFILES), help="simulated nodes (default 10, ≥ 8)")
    p.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto")
    p.add_argument("--batch", default="2,50%", help="rollout batch sizes after the canaries")
    p.add_argument("--keep-running", action="store_true", help="leave the controller and the fleet up")
    p.add_argument("--no-real-node", dest="real_node", action="store_false",
                   help="leave out the node on the real executor (it needs the package index for einops)")
    args = p.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        _fresh_state(state)
    except FleetError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    fleet = SimFleet(state, nodes=args.nodes, profiles=DEMO_PROFILES, network=args.network,
                     heartbeat_interval=2.0, executor="simulated")
    code = 1
    real: RealNode | None = None
    try:
        _title(f"starting a controller and {args.nodes} simulated GPU nodes in {state}")
        st = fleet.up(timeout=180)
        print(f"controller: grpc {st.controller_address} (mTLS), http {st.http}; nodes on {st.mode} addresses")
        ctl = ["--state-dir", str(state)]
        _title("fleetctl nodes")
        fleetctl(["nodes", *ctl])
        sims = ["--nodes", "sim-*"]
        _mixed_platform_plans(state)
        _title("fleetctl rollout flash-attn --dry-run   (the plan, nothing changes)")
        fleetctl(["rollout", "flash-attn", "--dry-run", "--batch", args.batch, *sims, *ctl])
        _title(f"fleetctl rollout flash-attn --batch {args.batch}")
        code = fleetctl(["rollout", "flash-attn", "--batch", args.batch, "--actor", "demo", "--wait-timeout", "600",
                         *sims, *ctl])
        time.sleep(2.5)  # the agents' fresh facts (flash-attn installed) arrive within a heartbeat
        _title("fleetctl nodes   (flash-attn now installed and verified)")
        fleetctl(["nodes", *ctl])
        _title("fleetctl rollout status")
        fleetctl(["rollout", "status", *ctl])
        if args.real_node:
            real = RealNode(state, st.controller_address, st.enroll_address, fleetctl)
            code = _real_node(real, ctl) or code
        password = _dashboard_user(state)
        _title("dashboard")
        print(f"  {st.http}/   (simulated nodes are marked as such)")
        if password:
            print(f"  login: demo / {password}   (operator: can pause, resume, abort, roll back)")
        print(f"  API:   {st.http}/api/v1/rollouts  (bearer token in {state / 'admin.token'})")
        if args.keep_running:
            print(f"\nleft running. Try:\n  fleetctl rollout list --state-dir {state}\n"
                  f"  fleetctl rollout rollback $(fleetctl rollout list --state-dir {state} --json | "
                  f"python3 -c 'import json,sys; print(json.load(sys.stdin)[\"rollouts\"][0][\"id\"])') "
                  f"--state-dir {state}\nstop with: fleet-controller fleet down --state-dir {state}")
        return code
    except FleetError as exc:
        print(f"error[{exc.code}]: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if real is not None and not args.keep_running:
            real.stop()
        if not args.keep_running and fleet.state is not None:
            _title("stopping the controller and the simulated fleet")
            with contextlib.suppress(FleetError, OSError):
                fleet.down()
            print(json.dumps({"stopped": True, "state_dir": str(state)}))


def _real_node(real: RealNode, ctl: list[str]) -> int:
    """Section 3 of the module docstring. 0 when the real path did what it must: installed, then rolled back."""
    host = ["--nodes", HOSTNAME, "--canary", "0", "--batch", "1", "--max-failures", "1"]
    _title(f"one node on the real executor: {HOSTNAME} (GPU facts from profile a10, simulated; pip is real)")
    real.make_venv()
    real.start_agent()
    print(f"  its venv: {real.packages()}")
    wheel = real.put_standin_wheel()
    print(f"  {wheel}: a stand-in (no kernels) put in the artifact store, as an operator would a mirrored wheel")
    _title(f"fleetctl rollout flash-attn --dry-run --nodes {HOSTNAME}   (artifacts: store, index, or missing)")
    fleetctl(["rollout", "flash-attn", "--dry-run", *host, *ctl])
    _title(f"fleetctl rollout flash-attn --nodes {HOSTNAME}   (real pip; the benchmark needs a GPU and says so)")
    fleetctl(["rollout", "flash-attn", *host, "--verify-mode", "quick", "--actor", "demo", "--wait-timeout", "300",
              *ctl])
    installed = real.packages()
    print(f"  its venv now: {installed}")
    _title(f"fleetctl rollout rollback   ({HOSTNAME} had no flash-attn: the rollback removes it)")
    rid = real.cli_json("rollout", "list")["rollouts"][0]["id"]
    rolled = fleetctl(["rollout", "rollback", rid, "--wait-timeout", "120", *ctl])
    after = real.packages()
    print(f"  its venv now: {after}")
    ok = "flash-attn 2.8.3" in installed and "einops" in installed and "flash-attn absent" in after and rolled == 0
    if not ok:
        print(f"  the real-executor node did not install and roll back as expected: see {real.dir / 'agent.log'}",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
