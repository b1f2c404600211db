"""``fleetctl rollout …``: roll flash-attn out over the fleet, and watch / steer rollouts (docs/rollout.md).

Exit codes of ``rollout flash-attn`` (and ``status --watch``): 0 succeeded (or ``--dry-run`` /
``--detach``), 10 paused (needs an operator: canary failed, failure budget exceeded, or awaiting approval after
the canary batch: ``rollout approve``), 11 finished
with failed nodes within the budget, 12 aborted, 13 rollback-failed (``rollback`` and ``status`` too: a node's
rollback failed, its error is shown), plus the usual error codes (docs/cli.md).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.table import render
from fleetctl.controller.resolver import Policy
from fleetctl.controller.resolver.model import WORKLOADS
from fleetctl.controller.rollout.core import RolloutStatus
from fleetctl.controller.rollout.progress import ProgressView, footer_lines
from fleetctl.fleet.cli import add_output_args, print_json, print_structured
from fleetctl.fleet.errors import StaleFactsError, UsageError

EXIT_PAUSED = 10
EXIT_PARTIAL = 11
EXIT_ABORTED = 12
EXIT_ROLLBACK_FAILED = 13  # a node's rollback failed: the rollout is rollback-failed, never rolled-back
FINAL_EXIT = {RolloutStatus.SUCCEEDED: 0, RolloutStatus.ROLLED_BACK: 0, RolloutStatus.PARTIAL: EXIT_PARTIAL,
              RolloutStatus.ABORTED: EXIT_ABORTED, RolloutStatus.PAUSED: EXIT_PAUSED,
              RolloutStatus.AWAITING_APPROVAL: EXIT_PAUSED,
              RolloutStatus.ROLLBACK_FAILED: EXIT_ROLLBACK_FAILED}


def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return str(args.actor)
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--actor", metavar="NAME", help="who is acting, for the audit log (default: $USER)")
    add_controller_args(p)


def _steps_arg(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        kind, _, secs = item.partition("=")
        if not kind or not secs.isdigit() or int(secs) < 1:
            raise argparse.ArgumentTypeError(f"bad step timeout {item!r}: use KIND=SECONDS[,KIND=SECONDS]")
        out[kind.strip()] = int(secs)
    return out


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("rollout", help="roll flash-attn out over the fleet; watch and steer rollouts",
                                description="Roll FlashAttention out over the fleet: canaries first, then batches, "
                                            "under a failure budget; build once per build key, install everywhere "
                                            "else; verify every node. See docs/rollout.md.")
    sub = top.add_subparsers(dest="rollout_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("flash-attn", help="start a rollout (live progress; --detach to return at once)")
    p.add_argument("--version", metavar="V", help="flash-attn release (default: the newest in the catalog)")
    p.add_argument("--nodes", metavar="SELECTOR", help="hostname globs, gpu=NAME, profile=NAME, status=S; "
                   "comma list: same key OR, different keys AND (default: all)")
    add_label_selector_arg(p)
    p.add_argument("--canary", type=int, metavar="N", help="canary count (default: one per GPU model and variant; "
                   "0: no canary batch)")
    p.add_argument("--batch", metavar="SIZES", help="batch sizes after the canaries, e.g. 1,5,25%% (the last "
                   "repeats; default 1,5,25%%)")
    p.add_argument("--max-parallel", type=int, metavar="N", help="nodes in a step at once (default 50)")
    p.add_argument("--max-failures", metavar="N|P%", help="failure budget over the whole rollout (default 10%%); "
                   "one more failure pauses it")
    p.add_argument("--step-timeout", type=_steps_arg, metavar="KIND=S,…",
                   help="per-step timeouts in seconds, e.g. install-wheel=600,verify=300")
    p.add_argument("--verify-mode", choices=("quick", "full"),
                   help="the verify step's benchmark: quick (default) or full (every shape, SDPA backends, e2e)")
    p.add_argument("--when-busy", choices=("wait", "skip", "fail"),
                   help="when users' jobs hold a node's GPUs before an install, build, rollback or verify step: wait "
                   "for them (default), skip the node (state skipped-busy, not a failure) or fail it (docs/rollout.md)")
    p.add_argument("--busy-timeout", type=float, metavar="S",
                   help="with --when-busy wait: how long a step waits for idle GPUs, then fails naming them "
                   "(default 1800)")
    p.add_argument("--verify-gpus", metavar="any|all|idle|0,1",
                   help="the GPUs the verify step measures: one idle GPU (any, default), all, the idle ones, or these")
    p.add_argument("--fa4", action="store_true", help="flash-attn-4 (CuTe DSL, wheels only) where it runs "
                   "(cc 9.x-12.x, Python >= 3.10, CUDA 12/13 torch); FA2 elsewhere")
    p.add_argument("--fa3", action="store_true", help="FA3 (hopper/, source build) on Hopper nodes; FA2 elsewhere")
    p.add_argument("--no-source-builds", dest="source_builds", action="store_false", default=None,
                   help="never compile on a node: nodes without a matching wheel are blocked")
    p.add_argument("--prefer", choices=("compatible", "fastest"),
                   help="fastest: per node, the implementation measured fastest for --workload among those it "
                   "may install (FA4 wheels, FA2, or nothing when SDPA wins); default compatible (FA2)")
    p.add_argument("--workload", choices=WORKLOADS,
                   help="the measurements --prefer fastest reads (default training)")
    p.add_argument("--policy", type=Path, metavar="FILE", help='policy file {"version", "fa3", "fa4", '
                   '"source_builds", "prefer", "workload"} (flags given on the command line win)')
    p.add_argument("--builder", metavar="HOST[,HOST…]", help="dedicated builders: each builds the wheel of its own "
                   "build key for the other nodes of that key (default: the earliest scheduled node of each key)")
    p.add_argument("--max-unavailable", metavar="N|P%", help="at most N (or P%% of the rollout's) nodes out of "
                   "service at once: offline, degraded or in a step; new nodes wait (default: no limit)")
    p.add_argument("--window", action="append", metavar="'DAYS HH:MM-HH:MM [ZONE]'",
                   help="maintenance window, e.g. 'Sat 02:00-06:00' or 'Mon-Fri 22:00-04:00 Europe/Berlin' "
                        "(repeatable): outside every window no new node starts; running steps finish")
    p.add_argument("--window-tz", metavar="ZONE", default="UTC", help="time zone of windows that name none "
                   "(IANA name; default UTC)")
    p.add_argument("--pause-after-canary", action="store_true",
                   help="after the canary batch wait (awaiting-approval) for `fleetctl rollout approve ID`")
    p.add_argument("--bake-time", metavar="DURATION", help="hold the next batch this long after a batch finishes "
                   "(30m, 1h, 90s)")
    p.add_argument("--notify-webhook", action="append", metavar="URL",
                   help="POST a JSON notification to URL on pause, awaiting approval, failure, completion and "
                        "abort (repeatable; docs/rollout.md, Notifications)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the batch schedule; change nothing")
    p.add_argument("--detach", action="store_true", help="start it and return; follow with `rollout status -w`")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="S",
                   help="stop following after S seconds (the rollout goes on); 0: until it ends")
    _common(p)
    p.set_defaults(handler=handle_start)

    p = sub.add_parser("status", help="show a rollout (default: the newest)")
    p.add_argument("id", nargs="?", metavar="ID")
    p.add_argument("-w", "--watch", action="store_true", help="follow it live until it ends or pauses")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="S", help="with --watch: stop after S seconds")
    add_output_args(p, what="the rollout")
    _common(p, json_flag=False)
    p.set_defaults(handler=handle_status)

    p = sub.add_parser("list", help="list rollouts, newest first")
    p.add_argument("--limit", type=int, default=50)
    add_output_args(p, what="the rollouts")
    _common(p, json_flag=False)
    p.set_defaults(handler=handle_list)

    for name, helptext in (("pause", "pause: running steps finish, nothing new starts"),
                           ("resume", "resume a paused rollout"),
                           ("approve", "let a rollout awaiting approval after its canary batch go on (audited)"),
                           ("abort", "abort: running steps finish, the rest is skipped"),
                           ("rollback", "restore every touched node's previous flash-attn (rollback playbook)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id", metavar="ID")
        if name == "resume":
            p.add_argument("--retry-failed", action="store_true",
                           help="put failed nodes back to planned (also resumes a finished partial rollout: "
                                "its failed nodes, e.g. ones back online after it ended, run again)")
            p.add_argument("--max-failures", metavar="N|P%", help="a new failure budget")
        if name == "rollback":
            p.add_argument("--detach", action="store_true", help="return at once")
            p.add_argument("--wait-timeout", type=float, default=0, metavar="S")
        _common(p)
        p.set_defaults(handler=handle_action, action=name)

    p = sub.add_parser("audit", help="who started, paused, resumed, aborted or rolled back a rollout")
    p.add_argument("id", metavar="ID")
    _common(p)
    p.set_defaults(handler=handle_audit)


def follow(client: ControllerClient, rid: str, *, wait_timeout: float = 0, stream: Any = None,
           tty: bool | None = None, poll: float = 0.5) -> int:
    """Print live progress until the rollout ends or pauses; returns the exit code for its outcome."""
    stream = stream or sys.stdout
    view = ProgressView(stream, stream.isatty() if tty is None else tty)
    since = 0
    started = time.monotonic()
    try:
        while True:
            st = client.get(f"/rollouts/{rid}", since=since)
            view.update(st)
            if st["transitions"]:
                since = st["transitions"][-1]["id"]
            if not st["active"] or st["status"] in (RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL):
                view.summary(st)
                code = FINAL_EXIT.get(st["status"], 0)
                if st["status"] == RolloutStatus.AWAITING_APPROVAL:
                    stream.write(f"awaiting approval: {st['reason']}\nnext: `fleetctl rollout approve {rid}` starts "
                                 f"the next batches, or `fleetctl rollout abort {rid}`\n")
                elif st["status"] == RolloutStatus.PAUSED:
                    stream.write(f"paused: {st['reason']}\nnext: fix the cause, then `fleetctl rollout resume {rid}` "
                                 f"(--retry-failed, --max-failures N), or `fleetctl rollout abort {rid}`\n")
                elif st["status"] == RolloutStatus.ROLLBACK_FAILED:
                    stream.write(f"{st['reason']}\n")
                return code
            if wait_timeout and time.monotonic() - started > wait_timeout:
                stream.write(f"still {st['status']}; follow with `fleetctl rollout status {rid} --watch`\n")
                return 0
            time.sleep(poll)
    except KeyboardInterrupt:
        stream.write(f"\nstopped following; the rollout goes on: `fleetctl rollout status {rid} --watch`\n")
        return 130


def _print_plan(out: dict[str, Any]) -> None:
    rows = [[n["hostname"], n["gpu"], n["variant"], n["version"], ",".join(n["steps"]) or "-",
             "canary" if n["canary"] else (n["batch"] if n["batch"] >= 0 else "-"),
             n["skip"] or (f"shared env: {n['shared_env']['installer']} installs it" if n.get("shared_env") else
                           "build" if any(b["builder"] == n["hostname"] for b in out["builds"]) else
                           ("reuse wheel" if n["build_key"] in out["reused_builds"] else ""))]
            for n in out["nodes"]]
    print(render(rows, ["host", "gpu", "variant", "version", "steps", "batch", "note"]))
    print(f"\n{out.get('target') or 'flash-attn ' + out['version']} on {len(out['nodes'])} node(s), "
          f"selector {out['selector']!r}")
    for i, b in enumerate(out["batches"]):
        label = "canary" if i == 0 and out["canaries"] else f"batch {i}"
        print(f"  {label:<8} {len(b):>4} node(s): {', '.join(b[:8])}{' …' if len(b) > 8 else ''}")
    for b in out["builds"]:
        waiting = len(b["waiting"])
        who = f"then {waiting} more node(s) install its wheel" if waiting else "no other node waits for it"
        print(f"  build once: {b['builder']} builds (~{b['estimated_minutes']} min), {who} — key {b['build_key']}")
    bm = out["build_minutes"]
    if bm["on_every_node"] and bm["on_every_node"] != bm["once_per_key"]:
        print(f"  build time: {bm['once_per_key']} min once per key vs {bm['on_every_node']} min building on "
              f"every node")
    o = out["options"]
    print(f"  failure budget --max-failures {o['max_failures']}, --max-parallel {o['max_parallel']}")
    policy = [f"--max-unavailable {o['max_unavailable']}" if o.get("max_unavailable") else "",
              f"windows {'; '.join(o['windows'])} ({o['window_zone']})" if o.get("windows") else "",
              "approval after the canary batch" if o.get("pause_after_canary") else "",
              f"bake {o['bake_seconds']:g}s after each batch" if o.get("bake_seconds") else ""]
    if any(policy):
        print(f"  maintenance: {', '.join(p for p in policy if p)}")
    busy = o.get("busy_policy") or {}
    if busy:
        print(f"  busy GPUs: --when-busy {busy['when_busy']}, --busy-timeout {busy['timeout_s']:g}, "
              f"--verify-gpus {busy['gpus']}")


def _policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    """version/fa3/fa4/source_builds from --policy FILE, then the flags (which win)."""
    policy = Policy.load(args.policy) if args.policy else Policy()
    return {"version": args.version or policy.version, "fa3": args.fa3 or policy.fa3, "fa4": args.fa4 or policy.fa4,
            "source_builds": policy.source_builds if args.source_builds is None else args.source_builds,
            "prefer": getattr(args, "prefer", None) or policy.prefer,
            "workload": getattr(args, "workload", None) or policy.workload}


def _print_preflight(out: dict[str, Any]) -> None:
    """Where each real node's artifacts come from: the store, upstream, or nowhere (with the fix)."""
    lines = []
    for n in out["nodes"]:
        for item in n.get("preflight") or []:
            where = {"in-store": "in the store", "fetch": f"fetched from {item['source']}",
                     "resolve": f"resolved from {item['source']}", "missing": "CANNOT BE HAD"}[item["availability"]]
            fix = f" — fix: {item['fix']}" if item["availability"] == "missing" and item.get("fix") else ""
            lines.append(f"  {n['hostname']}: {item['what']} {item['name']}: {where}{fix}")
    if lines:
        print("\nartifacts (nodes download only from the controller):")
        print("\n".join(lines))


def _post_when_facts_fresh(client: ControllerClient, body: dict[str, Any], patience_s: float = 60.0) -> Any:
    """Start (or dry-run) the rollout; while a node's facts predate its last install or rollback, wait for its
    next report and try again (the controller refuses to plan from stale facts)."""
    deadline = time.monotonic() + patience_s
    said = False
    while True:
        try:
            return client.post("/rollouts", body)
        except StaleFactsError as exc:
            if time.monotonic() > deadline:
                raise
            if not said:
                print(f"waiting for fresh facts: {exc.message}", file=sys.stderr, flush=True)
                said = True
            time.sleep(2)


def handle_start(args: argparse.Namespace) -> int:
    if args.canary is not None and args.canary < 0:
        raise UsageError("--canary must be 0 or more", hint="--canary 0 skips the canary batch")
    client = ControllerClient.from_args(args)
    body = {"version": args.version, "nodes": args.nodes, "labels": args.labels,
            "canary": args.canary, "batch": args.batch,
            "max_parallel": args.max_parallel, "max_failures": args.max_failures, "dry_run": args.dry_run,
            "actor": _actor(args), "step_timeouts": args.step_timeout or {},
            "builders": [h.strip() for h in (args.builder or "").split(",") if h.strip()], **_policy_fields(args)}
    if args.verify_mode:
        body["verify_mode"] = args.verify_mode
    body.update(when_busy=args.when_busy, busy_timeout=args.busy_timeout, gpus=args.verify_gpus)
    body.update(max_unavailable=args.max_unavailable, windows=args.window or [], window_zone=args.window_tz,
                pause_after_canary=args.pause_after_canary, bake_time=args.bake_time,
                notify_webhooks=args.notify_webhook or [])
    out = _post_when_facts_fresh(client, body)
    if args.json and (args.dry_run or args.detach):
        print_json(out)
        return 0
    if args.dry_run:
        _print_plan(out)
        _print_preflight(out)
        print("\ndry run: nothing changed")
        return 0
    print(f"rollout {out['id']} started by {body['actor']}: {out.get('target') or 'flash-attn ' + out['version']} on "
          f"{len(out['nodes'])} node(s) in {len(out['batches'])} batch(es)", flush=True)
    if args.detach:
        print(f"follow it: fleetctl rollout status {out['id']} --watch")
        return 0
    code = follow(client, out["id"], wait_timeout=args.wait_timeout)
    if args.json:
        print_json(client.get(f"/rollouts/{out['id']}"))
    return code


def handle_status(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    path = f"/rollouts/{args.id}" if args.id else "/rollouts/latest"
    st = client.get(path)
    if args.watch:
        return follow(client, st["id"], wait_timeout=args.wait_timeout)
    if print_structured(args, st):
        return 0
    for line in footer_lines(st):
        print(line)
    rows = [[n["hostname"], "canary" if n["canary"] else (n["batch"] if n["batch"] >= 0 else "-"), n["variant"],
             n["state"],
             (n["step"] or "") + (" (running)" if n["in_step"] else ""), n["attempt"],
             n["cause"] if args.output == "wide" else n["cause"][:90]]
            for n in st["nodes"]]
    print(render(rows, ["host", "batch", "variant", "state", "step", "try", "cause"]))
    for n in st["nodes"]:
        if n.get("commands"):  # a plan the agent does not carry out (Windows): a person runs these
            print(f"{n['hostname']}: run by hand (not executed by the agent):")
            print("\n".join(f"  {c}" for c in n["commands"]))
    if st.get("opted_out"):
        print(f"opted out (label fleetctl.io/opt-out=true): {', '.join(st['opted_out'])}")
    for b in st["builds"]:
        print(f"build {b['status']:<9} on {b['builder']}: {b['artifact_filename'] or b['error'] or ''}"
              f"  [{b['build_key']}]")
    # the footer carries each failed node's error; a script sees it too
    if st["status"] == RolloutStatus.ROLLBACK_FAILED:
        return EXIT_ROLLBACK_FAILED
    return 0


def handle_list(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/rollouts", limit=args.limit)
    if print_structured(args, data):
        return 0
    rows = [[r["id"], r["status"], r["version"], r["selector"], r["created_by"], (r["created_at"] or "")[:19],
             ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items()))] for r in data["rollouts"]]
    print(render(rows, ["id", "status", "version", "nodes", "by", "created (UTC)", "states"]))
    return 0


def handle_action(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    body: dict[str, Any] = {"actor": _actor(args)}
    if args.action == "resume":
        body.update(retry_failed=args.retry_failed, max_failures=args.max_failures)
    st = client.post(f"/rollouts/{args.id}/{args.action}", body)
    if args.json:
        print_json(st)
        return 0
    print(f"rollout {st['id']}: {args.action} by {body['actor']} → {st['status']}")
    if args.action in ("resume", "approve", "rollback") and not getattr(args, "detach", False) and st["active"]:
        return follow(client, st["id"], wait_timeout=getattr(args, "wait_timeout", 0) or 0)
    return 0


def handle_audit(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get(f"/rollouts/{args.id}/audit")
    if args.json:
        print_json(data)
        return 0
    print(render([[a["at"][:19], a["actor"], a["action"], a["detail"]] for a in data["audit"]],
                 ["at (UTC)", "actor", "action", "detail"]))
    return 0
