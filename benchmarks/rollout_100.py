"""Benchmark: `rollout flash-attn` over 100 simulated nodes with 5 distinct build keys.

A real controller process (`python -m fleetctl.controller.main serve`, SQLite), 100 real agents in this process
(gRPC mTLS) with the simulated executor (tests/integration/rollout/simrunner.py: a build takes
``--build-seconds``, an install or a verify ``--step-seconds``; verify results come from the GPU model).
Reports: wall time, controller CPU seconds per node (from /proc), the number of builds (must be exactly
5), and build time once-per-key vs building on every node, in the resolver's estimated build minutes.

    .venv/bin/python -m benchmarks.rollout_100 [--nodes 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.integration.rollout.controller_proc import (
    all_online,
    api,
    controller_proc,
    start_agents,
    stop_agents,
    until,
)
from tests.integration.rollout.simrunner import Script

BUILD_PROFILES = ("b200", "gh200", "l40s", "old-glibc-ubuntu2004", "t4")  # 5 distinct build keys
WHEEL_PROFILES = ("h100", "a100", "h200", "rtx4090", "l4", "a10")


def fleet(n: int) -> list[tuple[str, str]]:
    builders = int(n * 0.6)
    out = [(f"{BUILD_PROFILES[i % 5]}-{i:03d}", BUILD_PROFILES[i % 5]) for i in range(builders)]
    out += [(f"{WHEEL_PROFILES[i % 6]}-{i:03d}", WHEEL_PROFILES[i % 6]) for i in range(builders, n)]
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nodes = fleet(args.nodes)
    script = Script(delays={"build-from-source": args.build_seconds}, default_delay=args.step_seconds)
    with tempfile.TemporaryDirectory(prefix="rollout100-") as tmp_s:
        tmp = Path(tmp_s)
        async with controller_proc(tmp, heartbeat=5.0) as cp:
            agents = await start_agents(cp, nodes, script, tmp)
            try:
                await until(lambda: all_online(cp, len(nodes)), 120, interval=0.5)
                cpu0 = cp.cpu_seconds()
                t0 = time.monotonic()
                out = await api(cp, "POST", "/rollouts", {"batch": args.batch, "max_parallel": args.max_parallel,
                                                          "actor": "benchmark"})
                rid = out["id"]

                async def finished() -> dict[str, Any] | None:
                    st: dict[str, Any] = await api(cp, "GET", f"/rollouts/{rid}")
                    return st if not st["active"] else None

                st = await until(finished, args.timeout, interval=0.25)
                wall = time.monotonic() - t0
                cpu = cp.cpu_seconds() - cpu0
                jobs = (await api(cp, "GET", "/jobs?limit=1000"))["jobs"]
            finally:
                await stop_agents(agents)
    kinds = Counter(j["kind"] for j in jobs if (j.get("vars") or {}).get("rollout_id") == rid)
    others = sum(1 for j in jobs if (j.get("vars") or {}).get("rollout_id") != rid)
    per_key = {b["build_key"]: b["estimated_minutes"] for b in out["builds"]}
    every = out["build_minutes"]["on_every_node"]
    once = out["build_minutes"]["once_per_key"]
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores (shared), Python "
                   f"{platform.python_version()}, SQLite",
        "nodes": len(nodes), "status": st["status"], "counts": st["counts"], "batches": len(out["batches"]),
        "canaries": len(out["canaries"]), "wall_seconds": round(wall, 2),
        "controller_cpu_seconds": round(cpu, 2), "controller_cpu_ms_per_node": round(1000 * cpu / len(nodes), 1),
        "builds": kinds.get("build-from-source", 0), "build_keys": len(per_key),
        "installs": kinds.get("install-wheel", 0), "verifies": kinds.get("verify", 0),
        "other_jobs_during_rollout": others,  # e.g. the scheduler's drift re-verification after installs
        "build_minutes_once_per_key": once, "build_minutes_every_node": every,
        "build_ratio_every_vs_once": round(every / once, 1) if once else None,
        "simulated_build_seconds": args.build_seconds, "simulated_step_seconds": args.step_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--batch", default="5,25%")
    p.add_argument("--max-parallel", type=int, default=100)
    p.add_argument("--build-seconds", type=float, default=3.0)
    p.add_argument("--step-seconds", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = asyncio.run(run(args))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:32} {v}")
    ok = res["status"] == "succeeded" and res["builds"] == res["build_keys"] == 5
    if not ok:
        print("FAILED: expected a succeeded rollout with exactly 5 builds", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
