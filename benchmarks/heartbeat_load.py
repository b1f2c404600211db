"""Heartbeat load: N agents (real gRPC channels with their own mTLS identities, many per process).

Starts a controller (``fleet-controller serve``, SQLite by default) as a subprocess, bulk-creates
N enrollment tokens, then W worker processes each enroll N/W agents over the enrollment port,
open one mutual-TLS channel per agent, report facts and heartbeat every ``--interval`` seconds
at a random phase. Measures, over a steady-state window: heartbeats/s, client-side latency
p50/p99/max, errors, the controller's CPU and the generator processes' CPU (separately), the
controller's event-loop lag and garbage-collection pauses, and the DB rows written by liveness
bookkeeping. The generator freezes its own GC after setup (its full collections over thousands of
channels would otherwise count as heartbeat latency). ``--profile DIR`` records the controller
with py-spy over the measured window (it pauses the process to sample: don't read latencies from
profiled runs). The same client serves each agent's job stream when asked (``worker_main``'s ``jobs``:
benchmarks/ha_throughput.py), answering every job at once with the agent's calls.

    .venv/bin/python benchmarks/heartbeat_load.py --agents 1000 5000 10000 --interval 10 --duration 30

Results go to docs/benchmarks.md by hand (the script prints a markdown table).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import hashlib
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk_tokens(db_url: str, n: int) -> list[str]:
    from fleetctl.controller.store import open_store, utcnow
    from fleetctl.controller.store.models import EnrollmentToken

    store = open_store(db_url)
    tokens = ["fleet_" + secrets.token_urlsafe(24) for _ in range(n)]
    now = utcnow()
    with store.session() as s:
        s.add_all([EnrollmentToken(token_hash=hashlib.sha256(t.encode()).hexdigest(), prefix=t[:12], hostname=None,
                                   created_at=now, expires_at=now + dt.timedelta(hours=2), revoked=False)
                   for t in tokens])
    store.close()
    return tokens


async def worker_main(args: dict[str, Any]) -> dict[str, Any]:
    import grpc
    import grpc.aio

    from fleetctl.agent import wire
    from fleetctl.agent.client import RPC_TIMEOUT, channel_options, enroll
    from fleetctl.agent.profiles import load_profile
    from fleetctl.agent.simexec import SimulatedJobRunner
    from fleetctl.fleet.errors import FleetError
    from fleetctl.fleet.v1 import fleet_pb2 as pb
    from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc

    ca = Path(args["ca"]).read_bytes()
    tokens: list[str] = args["tokens"]
    wid: int = args["worker"]
    profile = load_profile("h100")
    sem = asyncio.Semaphore(32)
    stubs: list[tuple[Any, Any]] = []
    interval: float = args["interval"]
    window = [float("inf"), float("inf")]  # measured [from, to): set once every worker is ready
    lat: list[float] = []
    sent: list[float] = []  # when each measured heartbeat was sent (wall clock), beside its latency in lat
    errors: dict[str, int] = {}
    error_times: list[float] = []
    # args["jobs"]: each agent also serves its Jobs stream as fleet-agent does (agent/client.py), answering at once
    answered: list[tuple[str, float, float]] = []  # (job id, received, result acknowledged), wall clock
    job_errors: list[tuple[float, str]] = []  # (when, what) of the agents' failed job calls
    answering: set[asyncio.Task[None]] = set()
    work_dir = Path(tempfile.mkdtemp(prefix="load-jobs-"))

    async def beat(stub: Any) -> None:
        # like a real agent: heartbeat from registration on, at a random phase
        await asyncio.sleep(random.random() * interval)
        seq = 0
        next_t = time.monotonic()
        while time.time() < window[1]:
            seq += 1
            t, at = time.perf_counter(), time.time()
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(sequence=seq), timeout=10)
                if at >= window[0]:
                    lat.append(time.perf_counter() - t)
                    sent.append(at)
            except grpc.aio.AioRpcError as exc:
                if at >= window[0]:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    error_times.append(at)
            next_t += interval
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    def job_error(what: str) -> None:
        if time.time() < window[1]:  # not the streams and calls cut by the end of the run
            job_errors.append((time.time(), what))

    async def answer(stub: Any, runner: SimulatedJobRunner, msg: Any) -> None:
        # the agent's calls for a job that takes no time: its events as its sender batches them (the start, then the
        # runner's task and the finish), then the result; the runner is the simulated executor's (a verify job gets
        # the node's simulated verification, which the controller records)
        received = time.time()
        try:
            spec = wire.job_from_proto(msg)
            events: list[dict[str, Any]] = [{"event": "fleet_job_started", "event_data": {"kind": spec.kind}}]
            outcome = await runner.run(spec, events.append)
            events.append({"event": "fleet_job_finished",
                           "event_data": {"status": str(outcome.status), "rc": outcome.rc, "events_dropped": 0}})
            protos = [wire.event_to_proto(spec.job_id, n, ev) for n, ev in enumerate(events, 1)]
            await stub.ReportJobEvents(iter(protos[:1]), timeout=RPC_TIMEOUT)
            await stub.ReportJobEvents(iter(protos[1:]), timeout=RPC_TIMEOUT)
            await stub.CompleteJob(wire.result_to_proto(spec.job_id, outcome), timeout=RPC_TIMEOUT)
            answered.append((spec.job_id, received, time.time()))
        except grpc.aio.AioRpcError as exc:
            job_error(exc.code().name)
        except FleetError as exc:
            job_error(type(exc).__name__)

    async def serve_jobs(stub: Any, host: str) -> None:
        runner = SimulatedJobRunner(lambda: profile.with_hostname(host), work_dir / host)
        runner.seconds = {"*": 0.0}  # answered at once: the benchmark measures the controllers, not playbooks
        try:
            async for msg in stub.Jobs(wire.jobs_request(())):
                task = asyncio.create_task(answer(stub, runner, msg))
                answering.add(task)
                task.add_done_callback(answering.discard)
            job_error("jobs stream ended")
        except grpc.aio.AioRpcError as exc:
            job_error(f"jobs stream {exc.code().name}")

    beats: list[asyncio.Task[None]] = []
    streams: list[asyncio.Task[None]] = []

    async def setup(i: int, token: str) -> None:
        host = f"load-{wid}-{i}"
        async with sem:
            creds = await enroll(args["enroll"], ca, token, host, timeout=120)
            ch = grpc.aio.secure_channel(args["grpc"], grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=creds.key_pem, certificate_chain=creds.cert_pem),
                options=channel_options())
            stub = pb_grpc.AgentServiceStub(ch)
            await stub.ReportFacts(pb.ReportFactsRequest(facts=wire.facts_to_proto(profile.with_hostname(host))),
                                   timeout=120)
            stubs.append((ch, stub))
            beats.append(asyncio.create_task(beat(stub)))
            if args.get("jobs"):
                streams.append(asyncio.create_task(serve_jobs(stub, host)))

    t0 = time.monotonic()
    await asyncio.gather(*(setup(i, t) for i, t in enumerate(tokens)))
    setup_s = time.monotonic() - t0
    if args["gc_freeze"]:
        # the generator's own full collections (thousands of channels' objects) would stall its loop and show
        # up as heartbeat latency: freeze what setup built, as the controller does
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, *gc.get_threshold()[1:])
    # barrier: tell the parent we are set up; it answers with the common start of the measured window
    conn = args["conn"]
    conn.send({"ready": setup_s})
    start_at: float = await asyncio.to_thread(conn.recv)
    window[0] = start_at + args["warmup"]
    if args["duration"] is not None:
        window[1] = window[0] + args["duration"]
    else:  # several measured windows (benchmarks/ha_throughput.py): until the parent says stop
        await asyncio.to_thread(conn.recv)
        window[1] = time.time()
    await asyncio.gather(*beats)
    for ch, _ in stubs:
        await ch.close()
    await asyncio.gather(*streams, *answering, return_exceptions=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {"lat": lat, "sent": sent, "errors": errors, "error_times": error_times, "setup_s": setup_s,
            "answered": answered, "job_errors": job_errors}


def worker_entry(args: dict[str, Any], conn: Any) -> None:
    args["conn"] = conn
    conn.send(asyncio.run(worker_main(args)))


def run_level(n: int, interval: float, duration: float, warmup: float, workers: int, db: str | None,
              profile: Path | None = None, native: bool = False, gc_tuning: bool = True) -> dict[str, Any]:
    import httpx

    state = Path(tempfile.mkdtemp(prefix="hbload-"))
    gport, eport, hport = free_port(), free_port(), free_port()
    db_url = db or f"sqlite:///{state / 'controller.db'}"
    cmd = [sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(state), "--db", db_url,
           "--grpc-listen", f"127.0.0.1:{gport}", "--enroll-listen", f"127.0.0.1:{eport}",
           "--http-listen", f"127.0.0.1:{hport}", "--heartbeat-interval", str(interval), "--log-level", "WARNING",
           "--enroll-rate", "100000",  # thousands of agents enroll from this one host at once
           "--http-insecure",  # loopback only; the load generator's bare httpx client
           *([] if gc_tuning else ["--no-gc-tuning"])]
    log = (state / "controller.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not (state / "controller.json").exists():
            if proc.poll() is not None:
                raise SystemExit(f"controller died, see {state / 'controller.log'}")
            time.sleep(0.1)
        token = (state / "admin.token").read_text().strip()
        http = httpx.Client(base_url=f"http://127.0.0.1:{hport}/api/v1", headers={"Authorization": f"Bearer {token}"})
        tokens = bulk_tokens(db_url, n)
        per = [tokens[i::workers] for i in range(workers)]
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for w in range(workers):
            a, b = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_entry, args=({"worker": w, "tokens": per[w], "ca": str(state / "ca/ca.pem"),
                                                        "grpc": f"127.0.0.1:{gport}", "enroll": f"127.0.0.1:{eport}",
                                                        "interval": interval, "duration": duration, "warmup": warmup,
                                                        "gc_freeze": gc_tuning,
                                                        }, b))
            p.start()
            pipes.append(a)
            procs.append(p)
        t_setup = time.monotonic()
        setup_s = max(pp.recv()["ready"] for pp in pipes)  # every agent enrolled, registered, channel open
        print(f"  {n} agents enrolled and registered in {time.monotonic() - t_setup:.1f}s", file=sys.stderr)
        start_at = time.time() + 2
        for pp in pipes:
            pp.send(start_at)
        time.sleep(max(0.0, start_at + warmup - time.time()))
        spy = None
        if profile is not None:  # py-spy (pip install py-spy) samples the controller over the measured window
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
                                    "--duration", str(int(duration)), "--rate", "200", "--gil", "--format", "raw",
                                    *(["--native"] if native else []),
                                    "--output", str(profile / f"controller-{n}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        la0 = os.getloadavg()[0]
        s0, c0, t0 = http.get("/stats", params={"reset_lag": "true"}).json(), cpu_seconds(proc.pid), time.monotonic()
        g0 = sum((cpu_seconds(w.pid) for w in procs if w.pid is not None), 0.0)
        time.sleep(duration)
        s1, c1, t1 = http.get("/stats").json(), cpu_seconds(proc.pid), time.monotonic()
        g1 = sum((cpu_seconds(w.pid) for w in procs if w.pid is not None), 0.0)
        la1 = os.getloadavg()[0]
        if spy is not None:
            spy.wait(60)
        results = [pp.recv() for pp in pipes]
        for p in procs:
            p.join(30)
        lat = sorted(x for r in results for x in r["lat"])
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

        wall = t1 - t0
        return {"agents": n, "interval_s": interval, "registered": s1["nodes"],
                "heartbeats_per_s": round((s1["heartbeats"] - s0["heartbeats"]) / wall, 1),
                "expected_per_s": round(n / interval, 1),
                "heartbeats_measured": len(lat), "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
                "max_ms": round(lat[-1] * 1000, 2)
                if lat else None, "errors": errors,
                "controller_cpu_pct": round(100 * (c1 - c0) / wall, 1), "controller_loop_lag": s1["loop_lag"],
                "generator_cpu_pct": round(100 * (g1 - g0) / wall, 1), "workers": workers,
                "controller_gc": s1.get("gc"),
                "loadavg_1m": [round(la0, 2), round(la1, 2)],
                "db_rows_per_s": round((s1["liveness_db_writes"] - s0["liveness_db_writes"]) / wall, 1),
                "setup_s": round(setup_s, 1)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=30.0, help="measured window, seconds")
    ap.add_argument("--warmup", type=float, default=12.0, help="seconds of heartbeating before measuring")
    ap.add_argument("--workers", type=int, default=2, help="client processes")
    ap.add_argument("--db", help="database URL (default: SQLite in a temp state dir)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record the controller with py-spy (raw collapsed stacks, --gil) into DIR")
    ap.add_argument("--native", action="store_true", help="with --profile: include native (C/Cython) frames")
    ap.add_argument("--no-gc-tuning", dest="gc_tuning", action="store_false",
                    help="run the controller with --no-gc-tuning (CPython's default GC settings)")
    args = ap.parse_args()
    rows = []
    for n in args.agents:
        r = run_level(n, args.interval, args.duration, args.warmup, args.workers, args.db, args.profile,
                      args.native, args.gc_tuning)
        print(json.dumps(r), flush=True)
        rows.append(r)
    print("\n| agents | interval | heartbeats/s (expected) | p50 ms | p99 ms | max ms | errors | controller CPU | "
          "generator CPU | loop lag p99 / max ms | liveness DB rows/s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lag = r["controller_loop_lag"] or {}
        print(f"| {r['agents']} | {r['interval_s']:g} s | {r['heartbeats_per_s']} ({r['expected_per_s']}) | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors']} | {r['controller_cpu_pct']}% | "
              f"{r['generator_cpu_pct']}% | {lag.get('p99_ms')} / {lag.get('max_ms')} | {r['db_rows_per_s']} | "
              f"{r['loadavg_1m'][0]}–{r['loadavg_1m'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
