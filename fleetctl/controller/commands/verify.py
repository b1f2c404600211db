"""``fleetctl verify [HOST…] [--quick] [--json]``: verify FlashAttention on nodes and print the results.

Submits one ``verify`` job per node (agent/verify: import check, correctness, speed against SDPA,
end to end), waits for them, and prints each node's stored result — judged against its GPU model's
fleet baseline (``regression`` when too slow). Exit 0 when every node passed, 9 otherwise.
See docs/verification.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import add_output_args, print_json, print_structured
from fleetctl.fleet.errors import ControllerUnavailable, NotFoundError
from fleetctl.fleet.jobs import JobStatus
from fleetctl.fleet.workload import busy_refusal

EXIT_FAILED = 9
POLL_SECONDS = 1.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify", help="verify FlashAttention on nodes (benchmark on their GPUs) and show the results",
        description="Run the verification benchmark on the given nodes (default: every node not offline), "
                    "wait, and print pass/fail/regression with TFLOP/s against SDPA. Results are stored "
                    "with the facts they ran on. Exit 0 when all passed, 9 otherwise.")
    p.add_argument("hosts", nargs="*", metavar="HOST", help="nodes to verify (default: all, or --nodes)")
    p.add_argument("--nodes", metavar="SELECTOR", help="node selector as in rollouts (gpu=H100,node-*,…)")
    add_label_selector_arg(p)
    p.add_argument("--quick", action="store_true", help="quick mode (seconds; what schedules use)")
    p.add_argument("--model", metavar="PATH", help="local causal LM on the nodes for the end-to-end check")
    p.add_argument("--gpus", metavar="any|all|idle|0,1",
                   help="which GPUs to measure: one idle GPU (any, default), all (each idle), the idle ones, or these "
                        "indices; never one a user's job holds (docs/verification.md)")
    p.add_argument("--when-busy", choices=("wait", "skip", "fail"),
                   help="when the GPUs to measure are busy: wait for them (default), skip, or fail at once")
    p.add_argument("--busy-timeout", type=float, metavar="S", help="with --when-busy wait: how long (default 1800)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="how long to wait for the results (default 360 quick / 960 full)")
    p.add_argument("--no-wait", action="store_true", help="submit and print the job ids only")
    p.add_argument("--json", action="store_true", help="print {\"verifications\": [...]} as JSON")
    add_controller_args(p)
    p.set_defaults(handler=handle)

    r = subparsers.add_parser("verifications", help="list stored verification results",
                              description="Stored verification results, newest first.")
    r.add_argument("--node", metavar="HOST", help="only this node")
    r.add_argument("--latest", action="store_true", help="only each node's latest result")
    r.add_argument("--limit", type=int, default=50)
    add_output_args(r, what="{\"verifications\": [...]}")
    add_controller_args(r)
    r.set_defaults(handler=handle_list)


def wait_results(client: ControllerClient, jobs: dict[str, str], deadline: float) -> dict[str, dict[str, Any]]:
    """Poll until each job's stored verification exists (or the job ended without one) or the deadline."""
    out: dict[str, dict[str, Any]] = {}
    pending = dict(jobs)
    while pending and time.monotonic() < deadline:
        for host, job_id in list(pending.items()):
            try:
                out[host] = client.get(f"/verifications/{job_id}")
                del pending[host]
                continue
            except NotFoundError:
                pass
            job = client.get(f"/jobs/{job_id}")
            refused = busy_refusal(job.get("result"))
            if refused is not None:  # the GPUs were busy: nothing measured, nothing stored
                out[host] = {"hostname": host, "job_id": job_id, "passed": False, "reasons": [job.get("error") or ""],
                             "status": "skipped-busy" if refused.get("action") == "skipped" else "busy"}
                del pending[host]
                continue
            if job.get("status") == JobStatus.CANCELED:
                out[host] = {"hostname": host, "job_id": job_id, "status": JobStatus.CANCELED, "passed": False,
                             "reasons": [job.get("error") or "canceled"]}
                del pending[host]
        if pending:
            time.sleep(POLL_SECONDS)
    for host, job_id in pending.items():
        out[host] = {"hostname": host, "job_id": job_id, "status": "waiting", "passed": False,
                     "reasons": ["no result before --timeout; see `fleetctl job " + job_id + "`"]}
    return out


def rows_of(results: list[dict[str, Any]]) -> list[list[Any]]:
    def num(v: Any, fmt: str = "{:.1f}") -> str | None:
        return None if v is None else fmt.format(v)

    rows = []
    for v in results:
        fa = v.get("flash_attn") or {}
        checked = v.get("verified") or {}
        reasons = v.get("reasons") or []
        rows.append([v["hostname"] + (" (sim)" if v.get("simulated") else ""), v.get("gpu_model") or None,
                     ",".join(map(str, v["gpus"])) if v.get("gpus") else None,
                     v.get("status"), v.get("mode") or None,
                     f"{fa.get('version')} ({fa.get('variant')})" if fa.get("version") else None,
                     (f"{checked.get('implementation')} {checked.get('version') or ''}".strip()
                      + (f" ({checked['module']})" if checked.get("module") else "")) if checked
                     else ("sdpa" if v.get("expect") == "sdpa" else None),
                     num(v.get("tflops")), num(v.get("sdpa_tflops")), num(v.get("peak_mem_mib"), "{:.0f}"),
                     (reasons[0][:90] if reasons else "")])
    return rows


HEADERS = ["host", "gpu", "GPUs", "status", "mode", "flash-attn", "verified", "FA TFLOP/s", "SDPA TFLOP/s", "peak MiB",
           "reason"]


def handle(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    mode = "quick" if args.quick else "full"
    sub = client.post("/verify", {"hosts": list(args.hosts), "selector": args.nodes, "labels": args.labels,
                                  "mode": mode,
                                  "model_path": args.model, "gpus": args.gpus, "when_busy": args.when_busy,
                                  "busy_timeout": args.busy_timeout})
    jobs: dict[str, str] = sub["jobs"]
    if args.no_wait:
        if args.json:
            print_json(sub)
        else:
            for host, job in jobs.items():
                print(f"{host}  verify job {job}")
        return 0
    if not args.json:
        print(f"verifying {len(jobs)} node(s) ({mode})…", file=sys.stderr, flush=True)
    timeout = args.timeout if args.timeout is not None else (360.0 if args.quick else 960.0)
    try:
        found = wait_results(client, jobs, time.monotonic() + timeout)
    except ControllerUnavailable:
        raise
    results = [found[h] for h in jobs]
    if args.json:
        print_json({"verifications": results})
    else:
        print(render(rows_of(results), HEADERS))
        bad = [r for r in results if r.get("status") != "pass"]
        print(f"\n{len(results) - len(bad)}/{len(results)} passed" + (
            "" if not any(r.get("simulated") for r in results) else " (simulated nodes: GPU model, not measured)"))
    return 0 if all(r.get("status") == "pass" for r in results) else EXIT_FAILED


def handle_list(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/verifications", node=args.node, limit=args.limit,
                                                latest="true" if args.latest else None)
    if print_structured(args, data):
        return 0
    print(render([[v["at"][:19] if v.get("at") else None, *row]
                  for v, row in zip(data["verifications"], rows_of(data["verifications"]), strict=True)],
                 ["at (UTC)", *HEADERS]))
    return 0


def print_node_health(health: dict[str, Any]) -> None:
    """The verification part of ``fleetctl node HOST``."""
    print("\nverification:")
    if health.get("degraded"):
        print(f"  DEGRADED since {str(health.get('since'))[:19]}: {health.get('reason')}")
        for d in health.get("diagnosis") or []:
            if not d.get("red_herring"):
                print(f"  diagnosis   {d.get('id')}: {d.get('cause')}")
                print(f"              remedy: {d.get('remedy')}")
        plan = health.get("replan") or {}
        if plan:
            what = f"{plan.get('variant')} {plan.get('flash_attn_version') or ''}".strip()
            print(f"  re-plan     {what}: steps {', '.join(plan.get('steps') or []) or '-'}"
                  + (f" (wheel {plan['artifact']})" if plan.get("artifact") else ""))
            for reason in (plan.get("reasons") or [])[:3]:
                print(f"              {reason}")
    latest = health.get("latest") or []
    if not latest:
        print("  never verified (`fleetctl verify HOST`)")
    for v in latest:
        fa = v.get("flash_attn") or {}
        tf = f"{v['tflops']:.1f} TFLOP/s" if v.get("tflops") is not None else "-"
        print(f"  {str(v.get('at'))[:19]}  {v.get('status'):<10} {v.get('mode') or '-':<5} "
              f"{v.get('trigger') or '-':<8} fa {fa.get('version') or '-'}  {tf}"
              f"{'  GPU ' + ','.join(map(str, v['gpus'])) if v.get('gpus') else ''}"
              f"{'  (simulated)' if v.get('simulated') else ''}")
