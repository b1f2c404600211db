"""Agent fail-over times (issue 17): a controller is killed (``kill -9``) while its agents run jobs.

Three controller processes on one PostgreSQL database of the run's own (127.0.0.1:5432, trust auth; created and
dropped here), sharing one CA; N ``fleet-agent run --controller A,B,C --simulate … --executor simulated`` processes
(tests/integration/ha/failover_rig.py). Each run submits a verify job (``--job-seconds`` long) to every node, waits
until they all run, kills the controller holding the most agents, and measures from the kill:

* reconnected: the last of its agents established a session with another controller (the agents' logs);
* lease moved: the last of their session leases is held by another controller (``agent_sessions``; written with the
  controller's batched heartbeat flush);
* result delivered: the last of their jobs' results recorded (``jobs.finished_at``) minus what was left of the job
  at the kill — the fail-over's cost to the result, the job itself runs on undisturbed.

``--fault stop`` freezes the controller instead (SIGSTOP: its connections stay open and silent, as for a hung
controller or a network partition); the agents notice when a heartbeat call times out (10 s).

The killed controller is restarted (same ports, state dir) before the next run. Prints a line per run and the
min/median/max of each figure, with the machine and date (docs/benchmarks.md, docs/ha.md 'Agent fail-over').

    .venv/bin/python -m benchmarks.failover [--runs 5] [--agents 6] [--job-seconds 6] [--fault kill|stop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests.integration.ha.failover_rig import FailoverRig, FailoverRun, failover_database, kill_and_measure


async def measure(runs: int, agents: int, job_seconds: float, tmp: Path, fault: str = "kill") -> list[FailoverRun]:
    out: list[FailoverRun] = []
    with failover_database() as db:
        rig = FailoverRig(db, tmp, job_seconds=job_seconds)
        try:
            await rig.start_controllers()
            await rig.start_agents([f"bench-node-{i}" for i in range(agents)])
            await rig.wait_online()
            for i in range(runs):
                jobs = await rig.submit_verify(via=rig.ctl[0])
                await rig.wait_running(list(jobs.values()))
                held = Counter(rig.holders().values())
                victim = max(rig.ctl, key=lambda cp: held.get(cp.proc.pid if cp.proc else -1, 0))
                run = await kill_and_measure(rig, jobs, victim, fault)
                out.append(run)
                print(f"run {i + 1}: killed {run.killed} ({len(run.moved)} agents): reconnected "
                      f"{run.reconnected_s:.2f}s, lease moved {run.lease_moved_s:.2f}s, result delivered "
                      f"{run.results_s - run.job_left_s:+.2f}s after the job's end", flush=True)
                if fault == "kill":
                    victim.start()
                    await victim.ready()
                elif victim.proc is not None:
                    os.kill(victim.proc.pid, signal.SIGCONT)
                await rig.wait_online()
        finally:
            for cp in rig.ctl:  # a frozen process does not stop on SIGTERM
                if cp.proc is not None and cp.proc.poll() is None:
                    os.kill(cp.proc.pid, signal.SIGCONT)
            rig.stop()
    return out


def summary(runs: list[FailoverRun]) -> dict[str, dict[str, float]]:
    figures = {"reconnected_s": [r.reconnected_s for r in runs], "lease_moved_s": [r.lease_moved_s for r in runs],
               "result_delivered_after_job_end_s": [r.results_s - r.job_left_s for r in runs]}
    return {name: {"min": min(v), "median": statistics.median(v), "max": max(v)} for name, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--job-seconds", type=float, default=6.0)
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill",
                        help="kill: kill -9 (its port refuses at once; restarted before the next run); stop: SIGSTOP, "
                             "a hung or cut-off controller whose connections stay open (resumed before the next run)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-failover-") as tmp:
        runs = asyncio.run(measure(args.runs, args.agents, args.job_seconds, Path(tmp), args.fault))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}")
    figures = summary(runs)
    if args.json:
        report: dict[str, Any] = {"machine": machine, "date": dt.date.today().isoformat(), "figures": figures,
                                  "runs": [dataclasses.asdict(r) for r in runs]}
        print(json.dumps(report, indent=1))
        return
    what = "kill -9" if args.fault == "kill" else "SIGSTOP"
    print(f"\n{machine}; {dt.date.today().isoformat()}; 3 controllers, {args.agents} agents, {len(runs)} x {what}")
    print(f"{'from the ' + what:40} {'min':>7} {'median':>7} {'max':>7}")
    for name, f in figures.items():
        print(f"{name:40} {f['min']:7.2f} {f['median']:7.2f} {f['max']:7.2f}")


if __name__ == "__main__":
    main()
