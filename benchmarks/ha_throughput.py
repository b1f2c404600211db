"""Heartbeat and job throughput with 1, 2 and 3 controllers on one PostgreSQL (issue 17), in one run, side by side.

For each load K (agents per controller) and each controller count C: C ``fleet-controller serve`` processes on a
PostgreSQL database of their own (``--pg``, created and dropped per level), one CA (copies of the first's ``ca/``,
docs/ha.md), each connecting with ``application_name=fleet-tp-ctl-N``. C·K enrollment tokens are bulk-inserted; one
client process per controller enrolls K agents there (real key, CSR and certificate each), opens one mutual-TLS gRPC
channel per agent, reports facts and heartbeats every ``--interval`` seconds at a random phase (the client of
benchmarks/heartbeat_load.py); with jobs, each agent also holds its ``Jobs`` stream open and answers every job at
once as fleet-agent does (its events in two ``ReportJobEvents`` calls, then ``CompleteJob`` with the simulated
executor's successful result). The agents stay up through the level's measured windows:

* **heartbeats** (unless ``--no-heartbeats``): ``--duration`` seconds of heartbeats alone — heartbeats/s and the
  client-side latency p50/p99/max of each ``Heartbeat`` call;
* **jobs** (unless ``--no-jobs``), one window per ``--jobs-per-second`` rate: a submitter process sends
  ``POST /api/v1/verify {"hosts": [NODE], "mode": "quick"}`` (the path of ``fleetctl verify``) at that fixed
  offered rate (open loop: on schedule, whatever the answers), round-robin over the controllers and over every
  (submitting controller, agent's controller) pair, so (C−1)/C of the jobs are submitted on a controller other than
  the agent's — those are claimed by the agent's controller's 1 s poll (docs/ha.md, "job dispatch"). After
  ``--job-warmup`` s of submitting, ``--duration`` s are measured, then submitting stops and the jobs still open get
  up to ``--drain`` s. Reported: jobs/s completed (``jobs.finished_at`` inside the window), the latency from the
  submitter sending the POST to the result recorded (``jobs.finished_at``, read from the jobs table after the
  drain: the controllers and the submitter share this machine's clock) p50/p99/max, split by same / other
  controller, the POST's own answer time, errors (refused or failed submissions, jobs unfinished after the drain
  or not successful, the agents' failed calls), and the heartbeat p99 meanwhile;
* for every window: each controller's CPU (``/proc``), summed; the database's share — the CPU of the PostgreSQL
  backends serving the controllers (by ``application_name`` in ``pg_stat_activity``, their ``/proc`` CPU; only when
  PostgreSQL runs on this machine) and the controllers' time in database calls
  (``fleet_controller_db_call_duration_seconds`` on each ``/metrics``: wall time on the store's threads, the wait
  for a free worker included); for jobs also the CPU per job above the heartbeat window's (controllers, PostgreSQL);
* the machine: cores, load average, and how busy its CPUs were (``/proc/stat``: all, steal, and the part no process
  of this benchmark used — other work on a shared machine). A window is marked **starved** when the load average
  reached the cores, the CPUs were ≥ 90 % busy or ≥ 5 % stolen: its latency tail is then the machine's queue for a
  CPU, and it does not count when the summary states agents per controller at heartbeat p99 < 100 ms.

    python -m benchmarks.ha_throughput [--controllers 1 2 3] [--per-controller 250 500] [--interval 2]
        [--duration 20] [--jobs-per-second 20 50] [--no-jobs | --no-heartbeats]
        [--pg "host=127.0.0.1 port=5432 user=postgres"] [--python PATH] [--json-out FILE]

Results go to docs/benchmarks.md by hand (the script prints the machine line and markdown tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import URL

from benchmarks.heartbeat_load import bulk_tokens, cpu_seconds, free_port, worker_entry

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "host=127.0.0.1 port=5432 user=postgres"
DB_SUM = re.compile(r"^fleet_controller_db_call_duration_seconds_sum\s+(\S+)", re.M)
DB_COUNT = re.compile(r"^fleet_controller_db_call_duration_seconds_count\s+(\S+)", re.M)
HEARTBEAT_P99_GOAL_MS = 100.0
SATURATED_BELOW = 0.95  # completed / offered under this (or jobs left unfinished): the level is saturated
STARVED_BUSY = 0.90  # of all CPUs
STARVED_STEAL = 0.05


# ---- pure helpers ------------------------------------------------------------------------------------------------

def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ascending values; None when there are none."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))  # ceil(q·n), at least the first
    return ordered[min(len(ordered), rank) - 1]


def offered_times(rate: float, start: float, duration: float) -> list[float]:
    """When each job is submitted at a fixed offered rate: ``start + k/rate`` for every k inside ``duration``."""
    if rate <= 0:
        raise ValueError(f"offered rate {rate} jobs/s: use a rate above 0")
    return [start + k / rate for k in range(int(duration * rate + 1e-9))]


def job_routes(controllers: int, count: int) -> list[tuple[int, int]]:
    """(controller the job is submitted on, controller holding the node's agent) for ``count`` jobs: submissions
    round-robin over the controllers, and every block of C·C jobs takes each pair once, so (C−1)/C of them are
    submitted on a controller other than the agent's."""
    return [(k % controllers, (k + k // controllers) % controllers) for k in range(count)]


@dataclass(frozen=True)
class CpuTicks:
    """The machine's CPU time so far (all CPUs, clock ticks), from the first line of /proc/stat."""

    busy: int
    steal: int
    total: int

    @classmethod
    def parse(cls, proc_stat: str) -> CpuTicks:
        fields = [int(v) for v in proc_stat.splitlines()[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
        return cls(busy=user + nice + system + irq + softirq, steal=steal,
                   total=user + nice + system + idle + iowait + irq + softirq + steal)


def starvation(load_1m: float, cores: int, busy: float, steal: float) -> str:
    """Why a window's latency tail is the machine's queue for a CPU ("" when it is not): the 1-minute load average
    reached the cores, or the CPUs were busy or stolen (fractions of all CPUs) past the limits."""
    why = []
    if load_1m >= cores:
        why.append(f"load average {load_1m:.1f} on {cores} cores")
    if busy >= STARVED_BUSY:
        why.append(f"CPUs {busy:.0%} busy")
    if steal >= STARVED_STEAL:
        why.append(f"{steal:.0%} stolen")
    return ", ".join(why)


# ---- where PostgreSQL is -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Postgres:
    """The PostgreSQL the controllers share, from a libpq connection string (``--pg``)."""

    dsn: str

    def conninfo(self, db: str) -> str:
        return make_conninfo(self.dsn, dbname=db, connect_timeout=5)

    @property
    def admin(self) -> str:
        """Where databases are created and dropped: the DSN's own database, else ``postgres``."""
        return self.conninfo(str(conninfo_to_dict(self.dsn).get("dbname") or "postgres"))

    def url(self, db: str, app: str | None = None) -> str:
        """The controllers' SQLAlchemy URL for database ``db`` (a socket directory as ``host`` stays one)."""
        params = {k: str(v) for k, v in conninfo_to_dict(self.dsn).items() if v is not None}
        host = params.pop("host", None)
        port = params.pop("port", None)
        user = params.pop("user", None)
        password = params.pop("password", None)
        params.pop("dbname", None)
        if host is not None and host.startswith("/"):
            params["host"] = host
            host = None
        if app is not None:
            params["application_name"] = app
        return URL.create("postgresql+psycopg", username=user, password=password, host=host,
                          port=int(port) if port else None, database=db,
                          query=params).render_as_string(hide_password=False)

    def where(self) -> str:
        params = conninfo_to_dict(self.dsn)
        return f"{params.get('host') or 'the default socket'}:{params.get('port') or 5432}"


# ---- the processes -----------------------------------------------------------------------------------------------

class Ctl:
    def __init__(self, index: int, root: Path, pg: Postgres, db: str, interval: float, python: str) -> None:
        self.state = root / f"ctl-{index}"
        self.app = f"fleet-tp-ctl-{index}"
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        self.cmd = [python, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
                    "--db", pg.url(db, self.app),
                    "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}",
                    "--enroll-listen", f"127.0.0.1:{self.ports['enroll']}",
                    "--http-listen", f"127.0.0.1:{self.ports['http']}", "--heartbeat-interval", str(interval),
                    "--log-level", "WARNING", "--enroll-rate", "100000", "--http-insecure"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.state.parent / f"{self.app}.log"

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"controller exited; see {self.log}:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"controller did not come up in 90 s; see {self.log}")

    @property
    def token(self) -> str:
        return (self.state / "admin.token").read_text().strip()

    def db_time(self) -> tuple[float, float]:
        """(seconds in database calls, calls) so far, from the controller's /metrics."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.token}"}, timeout=10).text
        s, c = DB_SUM.search(text), DB_COUNT.search(text)
        return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def backend_cpu(pg: Postgres, db: str, apps: list[str]) -> dict[int, float] | None:
    """CPU seconds so far of each PostgreSQL backend serving the controllers (by application name); None when
    PostgreSQL does not run on this machine (its backends' process ids are not postgres processes here)."""
    with psycopg.connect(pg.conninfo(db)) as conn:
        pids = [p for (p,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)",
                                           (apps,)).fetchall()]
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            if "postgres" in Path(f"/proc/{pid}/comm").read_text():
                out[pid] = cpu_seconds(pid)
    return out if out or not pids else None


@dataclass(frozen=True)
class Sample:
    """Cumulative costs at one moment; two of them make a window."""

    wall: float
    monotonic: float
    controllers: float
    backends: dict[int, float] | None
    db_calls: tuple[float, float]
    metrics_s: float  # how long one GET /metrics took, on average over the controllers
    load_clients: float
    machine: CpuTicks
    load_1m: float


@dataclass
class Level:
    """One level's processes: C controllers on their database, their agents' client processes."""

    pg: Postgres
    db: str
    ctls: list[Ctl]
    clients: list[Any] = field(default_factory=list)  # multiprocessing processes

    def sample(self, extra_pids: Iterable[int] = ()) -> Sample:
        # /metrics first: rendering it costs the controller (and its database) real work (the attention report
        # reads every node), which must fall outside the window the CPU readings below bound
        began = time.monotonic()
        calls = [c.db_time() for c in self.ctls]
        metrics_s = (time.monotonic() - began) / len(self.ctls)
        return Sample(wall=time.time(), monotonic=time.monotonic(), controllers=sum(c.cpu() for c in self.ctls),
                      backends=backend_cpu(self.pg, self.db, [c.app for c in self.ctls]),
                      db_calls=(sum(t for t, _ in calls), sum(n for _, n in calls)), metrics_s=metrics_s,
                      load_clients=sum(cpu_seconds(p) for p in [*(w.pid for w in self.clients), *extra_pids] if p),
                      machine=CpuTicks.parse(Path("/proc/stat").read_text()), load_1m=os.getloadavg()[0])


def costs(a: Sample, b: Sample, cores: int) -> dict[str, Any]:
    """What the window between two samples cost: CPU as % of one core, the database's share, the machine."""
    wall = b.monotonic - a.monotonic
    ctl = b.controllers - a.controllers
    pg = sum(v - a.backends.get(pid, 0.0) for pid, v in b.backends.items()) \
        if a.backends is not None and b.backends is not None else None
    clients = b.load_clients - a.load_clients
    ticks = os.sysconf("SC_CLK_TCK")
    total = max(1, b.machine.total - a.machine.total)
    busy = (b.machine.busy - a.machine.busy) / total
    steal = (b.machine.steal - a.machine.steal) / total
    ours = (ctl + (pg or 0.0) + clients) * ticks / total  # fraction of all CPUs
    load = max(a.load_1m, b.load_1m)
    return {"controller_cpu_pct": round(100 * ctl / wall, 1),
            "postgres_cpu_pct": round(100 * pg / wall, 1) if pg is not None else None,
            "db_share_of_cpu_pct": round(100 * pg / (pg + ctl), 1) if pg is not None and pg + ctl else None,
            "db_call_s_per_s": round((b.db_calls[0] - a.db_calls[0]) / wall, 3),
            "db_calls_per_s": round((b.db_calls[1] - a.db_calls[1]) / wall, 1),
            "load_clients_cpu_pct": round(100 * clients / wall, 1),
            "cores": cores, "machine_busy_cores": round(busy * cores, 2),
            "machine_steal_cores": round(steal * cores, 2),
            "others_busy_cores": round(max(0.0, busy - ours) * cores, 2),  # processes not of this benchmark
            "loadavg_1m": [round(a.load_1m, 2), round(b.load_1m, 2)],
            "metrics_get_s": round(b.metrics_s, 2),
            "starved": starvation(load, cores, busy, steal)}


def heartbeat_stats(results: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Heartbeats sent inside [start, end) by every client: rate, latency, errors."""
    lat = sorted(x for r in results for t, x in zip(r["sent"], r["lat"], strict=True) if start <= t < end)
    errors = sum(1 for r in results for t in r["error_times"] if start <= t < end)

    def ms(q: float) -> float | None:
        v = percentile(lat, q)
        return round(v * 1000, 1) if v is not None else None

    return {"heartbeats_per_s": round(len(lat) / (end - start), 1), "p50_ms": ms(0.5), "p99_ms": ms(0.99),
            "max_ms": ms(1.0), "errors": errors}


# ---- the job submitter (a process of its own) --------------------------------------------------------------------

async def submit_main(args: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /api/v1/verify for one node at each offered time, on schedule (open loop); one record per job."""
    controllers: int = len(args["urls"])
    times = offered_times(args["rate"], args["start"], args["duration"])
    routes = job_routes(controllers, len(times))
    nodes: list[list[str]] = args["nodes"]
    cursors = [0] * controllers
    http = [httpx.AsyncClient(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                              limits=httpx.Limits(max_connections=args["max_in_flight"]))
            for url, token in zip(args["urls"], args["tokens"], strict=True)]
    records: list[dict[str, Any]] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def submit(record: dict[str, Any]) -> None:
        record["sent"] = time.time()
        try:
            resp = await http[record["on"]].post("/verify", json={"hosts": [record["node"]], "mode": "quick"})
            record["answered"] = time.time()
            if resp.status_code == 200:
                record["job"] = resp.json()["jobs"].get(record["node"])
                if record["job"] is None:
                    record["error"] = "not submitted: " + json.dumps(resp.json().get("skipped"))[:200]
            else:
                record["error"] = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            record["error"] = type(exc).__name__

    for k, at in enumerate(times):
        await asyncio.sleep(max(0.0, at - time.time()))
        on, agent_on = routes[k]
        node = nodes[agent_on][cursors[agent_on] % len(nodes[agent_on])]
        cursors[agent_on] += 1
        record: dict[str, Any] = {"scheduled": at, "sent": time.time(), "on": on, "agent_on": agent_on,
                                  "node": node, "job": None, "error": None, "answered": None}
        records.append(record)
        if len(in_flight) >= args["max_in_flight"]:
            record["error"] = "not sent: too many submissions in flight"
            continue
        task = asyncio.create_task(submit(record))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    for client in http:
        await client.aclose()
    return records


def submitter_entry(args: dict[str, Any], conn: Any) -> None:
    conn.send(asyncio.run(submit_main(args)))


def job_rows(pg: Postgres, db: str, ids: list[str]) -> dict[str, tuple[str, float, float | None, float | None]]:
    """{job id: (status, created, dispatched, finished)} from the jobs table, as Unix times."""
    with psycopg.connect(pg.conninfo(db)) as conn:
        rows = conn.execute("SELECT id, status, extract(epoch FROM created_at), extract(epoch FROM dispatched_at), "
                            "extract(epoch FROM finished_at) FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: (r[1], float(r[2]), float(r[3]) if r[3] is not None else None,
                   float(r[4]) if r[4] is not None else None) for r in rows}


def unfinished(pg: Postgres, db: str, ids: list[str]) -> int:
    with psycopg.connect(pg.conninfo(db)) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND finished_at IS NULL", (ids,)).fetchone()
    return int(row[0]) if row else 0


def job_stats(records: list[dict[str, Any]], rows: Mapping[str, tuple[str, float, float | None, float | None]],
              start: float, end: float, rate: float) -> dict[str, Any]:
    """The job window [start, end): what was submitted in it and how it went, and what finished in it."""
    errors: dict[str, int] = {}

    def error(what: str) -> None:
        errors[what] = errors.get(what, 0) + 1

    lat: dict[str, list[float]] = {"all": [], "same": [], "other": []}
    dispatch: dict[str, list[float]] = {"same": [], "other": []}
    seen: set[str] = set()
    reused: set[int] = set()  # indexes of submissions answered with a job an earlier one got
    for k, r in enumerate(records):
        if r["job"] is not None and r["job"] in seen:
            reused.add(k)
        seen.add(r["job"])
    mine = [(k, r) for k, r in enumerate(records) if start <= r["scheduled"] < end]
    for k, r in mine:
        if r["error"]:
            error(r["error"])
            continue
        if k in reused:  # POST /verify hands back a node's verify job still open: the node was still busy
            error("node still busy (job reused)")
            continue
        if r["job"] not in rows:
            error("job not in the jobs table")
            continue
        status, created, dispatched, finished = rows[r["job"]]
        if finished is None:
            error("unfinished after the drain")
            continue
        if status != "successful":
            error(f"job {status}")
            continue
        where = "same" if r["on"] == r["agent_on"] else "other"
        lat["all"].append(finished - r["sent"])
        lat[where].append(finished - r["sent"])
        if dispatched is not None:
            dispatch[where].append(dispatched - created)
    done_in_window = sum(1 for _, _, _, finished in rows.values() if finished is not None and start <= finished < end)

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(sorted(values), q)
        return round(v * 1000, 1) if v is not None else None

    answered = sorted(r["answered"] - r["sent"] for _, r in mine if r["answered"] is not None)
    completed = done_in_window / (end - start)
    saturated = completed < SATURATED_BELOW * rate or any(k.startswith(("unfinished", "not sent")) for k in errors)
    return {"offered_per_s": rate, "submitted": len(mine), "completed_per_s": round(completed, 1),
            "saturated": saturated,
            "other_controller_fraction": round(sum(r["on"] != r["agent_on"] for _, r in mine) / len(mine), 2)
            if mine else None,
            "p50_ms": ms(lat["all"], 0.5), "p99_ms": ms(lat["all"], 0.99), "max_ms": ms(lat["all"], 1.0),
            "same_p50_ms": ms(lat["same"], 0.5), "same_p99_ms": ms(lat["same"], 0.99),
            "other_p50_ms": ms(lat["other"], 0.5), "other_p99_ms": ms(lat["other"], 0.99),
            "dispatch_wait_same_p50_ms": ms(dispatch["same"], 0.5),
            "dispatch_wait_other_p50_ms": ms(dispatch["other"], 0.5),
            "post_p50_ms": ms(answered, 0.5), "post_p99_ms": ms(answered, 0.99),
            "errors": sum(errors.values()), "error_kinds": errors}


# ---- one level ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    pg: Postgres
    python: str
    interval: float
    duration: float
    warmup: float
    heartbeats: bool
    rates: list[float]
    job_warmup: float
    drain: float
    max_in_flight: int
    cores: int


def run_jobs(opts: Options, level: Level, per: int, rate: float) -> tuple[dict[str, Any], Sample, Sample]:
    """One job window at ``rate``: its row (with the window's bounds) and the samples around it."""
    controllers = len(level.ctls)
    nodes = [[f"load-{c}-{j}" for j in range(per)] for c in range(controllers)]
    start = time.time() + 0.5
    window = (start + opts.job_warmup, start + opts.job_warmup + opts.duration)
    a_end, b_end = mp.get_context("spawn").Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=submitter_entry, args=({
        "urls": [c.url for c in level.ctls], "tokens": [c.token for c in level.ctls], "rate": rate, "start": start,
        "duration": opts.job_warmup + opts.duration, "nodes": nodes, "max_in_flight": opts.max_in_flight}, b_end))
    proc.start()
    try:
        time.sleep(max(0.0, window[0] - time.time()))
        a = level.sample([proc.pid] if proc.pid else [])
        time.sleep(max(0.0, window[1] - time.time()))
        b = level.sample([proc.pid] if proc.pid else [])
        if not a_end.poll(opts.drain + 60):
            raise SystemExit("the job submitter did not finish")
        records: list[dict[str, Any]] = a_end.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    ids = [r["job"] for r in records if r["job"]]
    deadline = time.monotonic() + opts.drain
    while ids and unfinished(opts.pg, level.db, ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    row = job_stats(records, job_rows(opts.pg, level.db, ids), window[0], window[1], rate)
    row["window"] = window
    row["span"] = (start, time.time())  # submitting to the end of the drain: the agents' errors of this window
    return row, a, b


def run_level(opts: Options, controllers: int, per: int) -> list[dict[str, Any]]:
    """Start C controllers and their agents, measure the heartbeat window and each job window; their rows."""
    db = f"fleet_tp_{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="ha-tp-"))
    with psycopg.connect(opts.pg.admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    level = Level(opts.pg, db, [Ctl(i, root, opts.pg, db, opts.interval, opts.python) for i in range(controllers)])
    base = {"controllers": controllers, "agents_per_controller": per, "agents": per * controllers,
            "interval_s": opts.interval}
    try:
        level.ctls[0].start()
        level.ctls[0].wait_ready()
        for c in level.ctls[1:]:
            shutil.copytree(level.ctls[0].state / "ca", c.state / "ca")
            c.start()
        for c in level.ctls[1:]:
            c.wait_ready()
        tokens = bulk_tokens(opts.pg.url(db), per * controllers)
        ctx = mp.get_context("spawn")
        pipes = []
        for i, c in enumerate(level.ctls):
            ours, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_entry, args=({
                "worker": i, "tokens": tokens[i * per:(i + 1) * per], "ca": str(level.ctls[0].state / "ca" / "ca.pem"),
                "grpc": f"127.0.0.1:{c.ports['grpc']}", "enroll": f"127.0.0.1:{c.ports['enroll']}",
                "interval": opts.interval, "duration": None, "warmup": 0.0, "gc_freeze": True,
                "jobs": bool(opts.rates)}, theirs))
            p.start()
            pipes.append(ours)
            level.clients.append(p)
        t_setup = time.monotonic()
        for pp in pipes:
            pp.recv()
        base["setup_s"] = round(time.monotonic() - t_setup, 1)
        start_at = time.time() + 1
        for pp in pipes:
            pp.send(start_at)
        time.sleep(max(0.0, start_at + opts.warmup - time.time()))
        windows: list[tuple[dict[str, Any], Sample, Sample]] = []
        if opts.heartbeats:
            a0 = level.sample()
            time.sleep(opts.duration)
            b0 = level.sample()
            windows.append(({"part": "heartbeats", "window": (a0.wall, b0.wall)}, a0, b0))
        for rate in opts.rates:
            row, a1, b1 = run_jobs(opts, level, per, rate)
            windows.append(({"part": "jobs", **row}, a1, b1))
        for pp in pipes:
            pp.send("stop")
        results = [pp.recv() for pp in pipes]
    finally:
        for p in level.clients:
            p.join(30)
            if p.is_alive():
                p.kill()
        for c in level.ctls:
            c.stop()
        with psycopg.connect(opts.pg.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for row, a, b in windows:
        start, end = row.pop("window")
        hb = heartbeat_stats(results, start, end)
        out = {**base, **row, **costs(a, b, opts.cores)}
        if row["part"] == "heartbeats":
            out.update(hb, expected_per_s=round(per * controllers / opts.interval, 1))
        else:
            out.update(heartbeat_p99_ms=hb["p99_ms"], heartbeat_errors=hb["errors"])
            first, last = out.pop("span")
            for r in results:  # the agents' failed job calls while this window's jobs ran
                for at, what in r["job_errors"]:
                    if first <= at < last:
                        out["error_kinds"][f"agent: {what}"] = out["error_kinds"].get(f"agent: {what}", 0) + 1
                        out["errors"] += 1
        rows.append(out)
    jobs = [r for r in rows if r["part"] == "jobs"]
    baseline = next((r for r in rows if r["part"] == "heartbeats"), None)
    for r in jobs:  # CPU per completed job above the heartbeats-only window's
        if baseline is not None and r["completed_per_s"]:
            r["controller_cpu_ms_per_job"] = round(
                10 * (r["controller_cpu_pct"] - baseline["controller_cpu_pct"]) / r["completed_per_s"], 2)
            if r["postgres_cpu_pct"] is not None and baseline["postgres_cpu_pct"] is not None:
                r["postgres_cpu_ms_per_job"] = round(
                    10 * (r["postgres_cpu_pct"] - baseline["postgres_cpu_pct"]) / r["completed_per_s"], 2)
    return rows


# ---- the report --------------------------------------------------------------------------------------------------

def machine_line(pg: Postgres, python: str) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), 0)
    with psycopg.connect(pg.admin) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    ctl_python = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                capture_output=True, text=True, check=True).stdout.strip()
    cores = len(os.sched_getaffinity(0))
    return (f"{platform.machine()}, {model}, {cores} cores usable ({os.cpu_count()} online), "
            f"{mem_kib / 2**20:.0f} GiB, Linux {platform.release()}; controllers on Python {ctl_python}; "
            f"PostgreSQL {row[0] if row else '?'} at {pg.where()}")


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v >= 1000:
        return f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def machine_cell(r: Mapping[str, Any]) -> str:
    load = f"{r['loadavg_1m'][0]}–{r['loadavg_1m'][1]}"
    verdict = f"; **starved**: {r['starved']}" if r["starved"] else ""
    return (f"{load}; {r['machine_busy_cores']} of {r['cores']} cores busy ({r['others_busy_cores']} others', "
            f"{r['machine_steal_cores']} stolen){verdict}")


def report(rows: list[dict[str, Any]], machine: str, date: str, load_at_start: tuple[float, float, float]) -> str:
    out = [f"{machine}; {date}; load average at the start {load_at_start[0]:.2f} / {load_at_start[1]:.2f} / "
           f"{load_at_start[2]:.2f} (1 / 5 / 15 min)"]
    beats = [r for r in rows if r["part"] == "heartbeats"]
    jobs = [r for r in rows if r["part"] == "jobs"]
    if beats:
        out += ["", "Heartbeats:", "",
                "| controllers | agents (per controller) | heartbeats/s (offered) | p50 / p99 / max ms | errors | "
                "controllers' CPU | PostgreSQL CPU | DB share of CPU | time in DB calls (s/s) | "
                "load clients' CPU | machine (load avg; CPUs) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['controllers']} | {r['agents']} ({r['agents_per_controller']}) | {fmt(r['heartbeats_per_s'])} "
                f"({fmt(r['expected_per_s'])}) | {fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} / {fmt(r['max_ms'])} | "
                f"{r['errors']} | {r['controller_cpu_pct']} % | {fmt(r['postgres_cpu_pct'], ' %')} | "
                f"{fmt(r['db_share_of_cpu_pct'], ' %')} | {r['db_call_s_per_s']} | {r['load_clients_cpu_pct']} % | "
                f"{machine_cell(r)} |" for r in beats]
    if jobs:
        out += ["", "Jobs (verify, answered at once by the agents; latency: POST sent → jobs.finished_at):", "",
                "| controllers | agents (per controller) | jobs/s offered → completed | submitted on another "
                "controller | p50 / p99 / max ms | same controller p50 / p99 | other controller p50 / p99 | "
                "POST p50 / p99 ms | errors | controllers' CPU | PostgreSQL CPU | DB share of CPU | "
                "CPU per job above heartbeats (controllers / PostgreSQL, ms) | time in DB calls (s/s) | "
                "heartbeat p99 ms | machine (load avg; CPUs) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in jobs:
            kinds = "; ".join(f"{k}: {v}" for k, v in r["error_kinds"].items())
            out.append(
                f"| {r['controllers']} | {r['agents']} ({r['agents_per_controller']}) | {fmt(r['offered_per_s'])} → "
                f"{fmt(r['completed_per_s'])}{' **saturated**' if r['saturated'] else ''} | "
                f"{fmt(r['other_controller_fraction'])} | {fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} / "
                f"{fmt(r['max_ms'])} | {fmt(r['same_p50_ms'])} / {fmt(r['same_p99_ms'])} | "
                f"{fmt(r['other_p50_ms'])} / {fmt(r['other_p99_ms'])} | {fmt(r['post_p50_ms'])} / "
                f"{fmt(r['post_p99_ms'])} | {r['errors']}{f' ({kinds})' if kinds else ''} | "
                f"{r['controller_cpu_pct']} % | {fmt(r['postgres_cpu_pct'], ' %')} | "
                f"{fmt(r['db_share_of_cpu_pct'], ' %')} | {fmt(r.get('controller_cpu_ms_per_job'))} / "
                f"{fmt(r.get('postgres_cpu_ms_per_job'))} | {r['db_call_s_per_s']} | {fmt(r['heartbeat_p99_ms'])} | "
                f"{machine_cell(r)} |")
    out += ["", *summary(rows)]
    return "\n".join(out)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Agents per controller at heartbeat p99 < 100 ms, and where jobs saturate, per controller count."""
    lines = []
    for c in sorted({r["controllers"] for r in rows}):
        beats = [r for r in rows if r["part"] == "heartbeats" and r["controllers"] == c]
        if beats:
            fair = [r for r in beats if not r["starved"]]
            held = [r["agents_per_controller"] for r in fair
                    if r["p99_ms"] is not None and r["p99_ms"] < HEARTBEAT_P99_GOAL_MS and not r["errors"]]
            if held:
                verdict = f"held at {max(held)} agents per controller (the largest level measured that held)"
            elif fair:
                verdict = f"not held at {min(r['agents_per_controller'] for r in fair)} agents per controller"
            else:
                verdict = ("not established: the machine was starved in every heartbeat window ("
                           + "; ".join(r["starved"] for r in beats) + ")")
            lines.append(f"- {c} controller(s), heartbeat p99 < {HEARTBEAT_P99_GOAL_MS:g} ms at "
                         f"1 beat / {beats[0]['interval_s']:g} s: {verdict}")
        jobs = [r for r in rows if r["part"] == "jobs" and r["controllers"] == c]
        if jobs:
            kept = [r["offered_per_s"] for r in jobs if not r["saturated"]]
            lost = [r["offered_per_s"] for r in jobs if r["saturated"]]
            best = max(r["completed_per_s"] for r in jobs)
            starved = any(r["starved"] for r in jobs)
            lines.append(f"- {c} controller(s), jobs: kept up with {fmt(max(kept)) if kept else 'none'} jobs/s "
                         f"offered; saturated at {fmt(min(lost)) if lost else 'none measured'}; most completed "
                         f"{best} jobs/s{' (starved machine)' if starved else ''}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controllers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--per-controller", type=int, nargs="+", default=[250, 500], help="agents per controller")
    ap.add_argument("--interval", type=float, default=2.0, help="heartbeat interval, seconds")
    ap.add_argument("--duration", type=float, default=20.0, help="each measured window, seconds")
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds of heartbeating before the first window")
    ap.add_argument("--jobs-per-second", type=float, nargs="+", default=[20.0, 50.0], metavar="RATE",
                    help="offered job rates, one job window each")
    ap.add_argument("--job-warmup", type=float, default=3.0, help="seconds of submitting before a job window")
    ap.add_argument("--drain", type=float, default=20.0, help="seconds the jobs still open after a window get")
    ap.add_argument("--max-in-flight", type=int, default=200, help="submissions awaiting an answer, at most")
    ap.add_argument("--no-jobs", action="store_true", help="heartbeats only (the agents serve no job stream)")
    ap.add_argument("--no-heartbeats", action="store_true",
                    help="no heartbeats-only window (the agents still heartbeat through the job windows)")
    ap.add_argument("--pg", default=DEFAULT_PG, metavar="DSN",
                    help=f"libpq connection string of the PostgreSQL to use, as a superuser that may create "
                         f"databases (default {DEFAULT_PG!r}); its backends' CPU is read from /proc when it runs here")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs the controllers, with fleetctl installed (default: this one)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.no_jobs and args.no_heartbeats:
        ap.error("--no-jobs with --no-heartbeats leaves nothing to measure: drop one")
    if any(r <= 0 for r in args.jobs_per_second):
        ap.error("--jobs-per-second: rates must be above 0")
    pg = Postgres(args.pg)
    try:
        machine = machine_line(pg, args.python)
    except psycopg.Error as exc:
        ap.error(f"cannot reach PostgreSQL with --pg {args.pg!r}: {exc}")
    except (OSError, subprocess.CalledProcessError) as exc:
        ap.error(f"--python {args.python!r} does not run: {exc}")
    opts = Options(pg=pg, python=args.python, interval=args.interval, duration=args.duration, warmup=args.warmup,
                   heartbeats=not args.no_heartbeats, rates=[] if args.no_jobs else args.jobs_per_second,
                   job_warmup=args.job_warmup, drain=args.drain, max_in_flight=args.max_in_flight,
                   cores=os.cpu_count() or 1)
    load_at_start = os.getloadavg()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{machine}; load average {load_at_start[0]:.2f}", flush=True)
    rows = []
    for per in args.per_controller:
        for c in args.controllers:
            for r in run_level(opts, c, per):
                print(json.dumps(r), flush=True)
                rows.append(r)
    date += dt.datetime.now(dt.UTC).strftime("–%H:%M")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "date": date, "load_at_start": load_at_start,
                                             "argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")
    print("\n" + report(rows, machine, date, load_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
