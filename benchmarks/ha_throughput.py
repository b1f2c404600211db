"""Heartbeat throughput with 1, 2 and 3 controllers on one PostgreSQL (issue 17), in one run, side by side.

For each controller count C and each load K (agents per controller): C ``fleet-controller serve`` processes on a
PostgreSQL database of their own (127.0.0.1:5432, trust auth; created and dropped per level), sharing one CA (copies
of the first's ``ca/``, docs/ha.md), each connecting with ``application_name=fleet-tp-ctl-N``. C·K enrollment tokens
are bulk-inserted; one client process per controller enrolls K agents there (real key, CSR and certificate each),
opens one mutual-TLS gRPC channel per agent, reports facts and heartbeats every ``--interval`` seconds at a random
phase (the client of benchmarks/heartbeat_load.py). Over the measured window:

* heartbeats/s (all controllers) and the client-side latency p50/p99/max of each ``Heartbeat`` call;
* each controller's CPU (``/proc``), summed;
* the database's share: the CPU of the PostgreSQL backends serving the controllers (found by application name in
  ``pg_stat_activity``, their ``/proc`` CPU; backends opened during the window are counted from their start) and the
  controllers' own time in database calls (``fleet_controller_db_call_duration_seconds`` on each ``/metrics``:
  wall time on the store's worker threads, the wait for a free worker included).

The load generator, the controllers and PostgreSQL share the machine; the load average is printed per level.

    .venv/bin/python -m benchmarks.ha_throughput [--controllers 1 2 3] [--per-controller 250 500] [--interval 2]
        [--duration 20] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks.heartbeat_load import bulk_tokens, cpu_seconds, free_port, worker_entry

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
DB_SUM = re.compile(r"^fleet_controller_db_call_duration_seconds_sum\s+(\S+)", re.M)
DB_COUNT = re.compile(r"^fleet_controller_db_call_duration_seconds_count\s+(\S+)", re.M)


class Ctl:
    def __init__(self, index: int, root: Path, db: str, interval: float) -> None:
        self.state = root / f"ctl-{index}"
        self.app = f"fleet-tp-ctl-{index}"
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        self.cmd = [sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
                    "--db", f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}?application_name={self.app}",
                    "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}",
                    "--enroll-listen", f"127.0.0.1:{self.ports['enroll']}",
                    "--http-listen", f"127.0.0.1:{self.ports['http']}", "--heartbeat-interval", str(interval),
                    "--log-level", "WARNING", "--enroll-rate", "100000", "--http-insecure"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        log = (self.state.parent / f"{self.app}.log").open("wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"controller exited; see {self.state.parent / (self.app + '.log')}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit("controller did not come up")

    def db_time(self) -> tuple[float, float]:
        """(seconds in database calls, calls) so far, from the controller's /metrics."""
        token = (self.state / "admin.token").read_text().strip()
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
        s, c = DB_SUM.search(text), DB_COUNT.search(text)
        return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def backend_cpu(db: str, apps: list[str]) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving the controllers (by application name)."""
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={db} connect_timeout=3") as conn:
        pids = [p for (p,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)",
                                           (apps,)).fetchall()]
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(pid)
    return out


def run_level(controllers: int, per: int, interval: float, duration: float, warmup: float) -> dict[str, Any]:
    db = f"fleet_tp_{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="ha-tp-"))
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    ctls = [Ctl(i, root, db, interval) for i in range(controllers)]
    procs: list[Any] = []
    try:
        ctls[0].start()
        ctls[0].wait_ready()
        for c in ctls[1:]:
            shutil.copytree(ctls[0].state / "ca", c.state / "ca")
            c.start()
        for c in ctls[1:]:
            c.wait_ready()
        tokens = bulk_tokens(f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", per * controllers)
        ctx = mp.get_context("spawn")
        pipes = []
        for i, c in enumerate(ctls):
            a, b = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_entry, args=({
                "worker": i, "tokens": tokens[i * per:(i + 1) * per], "ca": str(ctls[0].state / "ca" / "ca.pem"),
                "grpc": f"127.0.0.1:{c.ports['grpc']}", "enroll": f"127.0.0.1:{c.ports['enroll']}",
                "interval": interval, "duration": duration, "warmup": warmup, "gc_freeze": True}, b))
            p.start()
            pipes.append(a)
            procs.append(p)
        t_setup = time.monotonic()
        for pp in pipes:
            pp.recv()
        setup_s = time.monotonic() - t_setup
        start_at = time.time() + 1
        for pp in pipes:
            pp.send(start_at)
        time.sleep(max(0.0, start_at + warmup - time.time()))
        apps = [c.app for c in ctls]
        la0 = os.getloadavg()[0]
        b0 = backend_cpu(db, apps)
        c0 = sum(cpu_seconds(c.proc.pid) for c in ctls if c.proc)
        d0 = [c.db_time() for c in ctls]
        t0 = time.monotonic()
        time.sleep(duration)
        wall = time.monotonic() - t0
        b1 = backend_cpu(db, apps)
        c1 = sum(cpu_seconds(c.proc.pid) for c in ctls if c.proc)
        d1 = [c.db_time() for c in ctls]
        la1 = os.getloadavg()[0]
        results = [pp.recv() for pp in pipes]
        lat = sorted(x for r in results for x in r["lat"])
        errors = sum(sum(r["errors"].values()) for r in results)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

        pg_cpu = sum(v - b0.get(pid, 0.0) for pid, v in b1.items())
        ctl_cpu = c1 - c0
        return {"controllers": controllers, "agents_per_controller": per, "agents": per * controllers,
                "interval_s": interval, "setup_s": round(setup_s, 1),
                "heartbeats_per_s": round(len(lat) / duration, 1),
                "expected_per_s": round(per * controllers / interval, 1),
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0), "errors": errors,
                "controller_cpu_pct": round(100 * ctl_cpu / wall, 1),
                "postgres_cpu_pct": round(100 * pg_cpu / wall, 1),
                "db_share_of_cpu_pct": round(100 * pg_cpu / (pg_cpu + ctl_cpu), 1) if pg_cpu + ctl_cpu else None,
                "db_call_s_per_s": round(sum(b[0] - a[0] for a, b in zip(d0, d1, strict=True)) / wall, 3),
                "db_calls_per_s": round(sum(b[1] - a[1] for a, b in zip(d0, d1, strict=True)) / wall, 1),
                "backends": len(b1), "loadavg_1m": [round(la0, 2), round(la1, 2)]}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        for c in ctls:
            c.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--controllers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--per-controller", type=int, nargs="+", default=[250, 500])
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    rows = []
    for per in args.per_controller:
        for c in args.controllers:
            r = run_level(c, per, args.interval, args.duration, args.warmup)
            print(json.dumps(r), flush=True)
            rows.append(r)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}"
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "date": date, "rows": rows}, indent=1) + "\n")
    print(f"\n{machine}; {date}")
    print("| controllers | agents (per controller) | heartbeats/s (expected) | p50 / p99 / max ms | errors | "
          "controllers' CPU | PostgreSQL CPU | DB share of CPU | time in DB calls (s/s) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['controllers']} | {r['agents']} ({r['agents_per_controller']}) | {r['heartbeats_per_s']} "
              f"({r['expected_per_s']}) | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} | {r['errors']} | "
              f"{r['controller_cpu_pct']}% | {r['postgres_cpu_pct']}% | {r['db_share_of_cpu_pct']}% | "
              f"{r['db_call_s_per_s']} | {r['loadavg_1m'][0]}–{r['loadavg_1m'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
