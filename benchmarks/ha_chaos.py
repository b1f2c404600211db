"""HA fault soak (issue 17): three controllers on one PostgreSQL, ≥ 20 agents, a rollout with source builds, and
faults while it runs — ``kill -9`` of a random controller (restarted after a random down time),
``pg_terminate_backend`` of one controller's database connections, PostgreSQL stopped and started again, and a
network cut between the controllers and PostgreSQL.

Real processes: a PostgreSQL server of the run's own (tests/integration/harness/pgserver.py: Debian's ``initdb`` and
``pg_ctl``, a free port on 127.0.0.1, trust auth; removed afterwards) — the shared cluster on 127.0.0.1:5432 serves
other test runs at the same time, and this one is stopped; three ``fleet-controller serve`` on one database in it,
sharing one CA (copies of the first's ``ca/``, docs/ha.md), each connecting with ``application_name=fleet-chaos-ctl-N``
so its backends can be found in ``pg_stat_activity``; N ``fleet-agent run --controller A,B,C --simulate PROFILE
--executor simulated`` processes (wheel installs and source builds; job durations from ``$FLEET_SIM_JOB_SECONDS``).
The rollout is started through one controller's API; kills and database faults follow at seeded random intervals.

**A PostgreSQL stop** (``--pg-stops``) is ``pg_ctl stop``, alternately ``-m fast`` (every backend told
"terminating connection due to administrator command", a shutdown checkpoint) and ``-m immediate`` (a crash: the
backends vanish, crash recovery at the next start), the server down for ``--pg-stop-seconds``, then ``pg_ctl start``.
**A network cut** (``--outages``) leaves PostgreSQL running: every controller reaches it through a TCP relay of this
script, and a cut resets every relayed connection and refuses new ones for ``--outage-seconds`` (no message from the
server, connects refused: what a lost route looks like).

After the faults stop, the rollout must end by itself (a paused rollout is resumed with ``--retry-failed`` and
counted: a resume is an operator's move the faults forced). Read from the database afterwards:

* final: every node of the rollout in a terminal state, the state it should be (``done``);
* lost: nodes not terminal; stuck: nodes in a step with no live job;
* steps run twice: more than one *successful* job per (node, step kind) in the rollout, a build key built twice,
  or a job id the agents' logs show started twice;
* audit: ``rollout.start`` and ``rollout.finish`` rows for the rollout;
* controllers: none exited through a database fault, and each healthy again within 60 s of the database being back;
* recovery per kill: seconds until no agent session is held by the dead controller (its agents report to another),
  until the restarted controller serves, and (when it drove the rollout) until another controller holds the
  rollout's lease; per database fault: seconds after the database is back until each controller's ``/health`` is
  200, and (PostgreSQL stops) until every node's heartbeat is written again.

Exit status 1 when anything above is wrong.

    .venv/bin/python -m benchmarks.ha_chaos [--seed 1] [--agents 20] [--kills 12] [--pg-stops 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks.chaos_kill9 import LIVE_JOB, PROFILES, STEP_STATES, TERMINAL, Proc, free_port
from tests.integration.harness.pgserver import PgServer, StopMode, pg_server

STOP_MODES: tuple[StopMode, ...] = ("fast", "immediate")  # a PostgreSQL stop's mode, in turn: clean, then a crash
JOB_STARTED = re.compile(r"job (\S+) \((\S+)\) started")  # fleetctl/agent/client.py, one line per execution


class PgRelay(threading.Thread):
    """A TCP relay to PostgreSQL that can go dark: ``outage(seconds)`` resets every relayed connection and refuses
    new ones (accepted, then closed at once) until the outage ends."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.dark_until = 0.0
        self.closed = False

    def run(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.dark_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=3)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self.lock:
            self.conns = [c for c in self.conns if c not in (src, dst)]

    def outage(self, seconds: float) -> int:
        """Cut every relayed connection now and refuse new ones for ``seconds``: how many connections were cut."""
        self.dark_until = time.monotonic() + seconds
        with self.lock:
            cut = list(self.conns)
        for s in cut:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                s.shutdown(socket.SHUT_RDWR)
        return len(cut) // 2

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class Controller:
    def __init__(self, index: int, root: Path, db_url: str) -> None:
        self.index = index
        self.state = root / f"ctl-{index}"
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        self.app = f"fleet-chaos-ctl-{index}"
        self.proc = Proc(f"ctl-{index}", [
            sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
            "--db", f"{db_url}?application_name={self.app}",
            "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}", "--enroll-listen", f"127.0.0.1:{self.ports['enroll']}",
            "--http-listen", f"127.0.0.1:{self.ports['http']}", "--http-insecure",  # loopback; bare httpx
            "--heartbeat-interval", "1", "--missed-heartbeats", "5", "--log-level", "WARNING"],
            root / "logs" / f"ctl-{index}.log", {"FLEET_ROLLOUT_LEASE_TTL": "5"})

    @property
    def pid(self) -> int | None:
        p = self.proc.popen
        return p.pid if p is not None and p.poll() is None else None

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5) -> Any:
        token = (self.state / "admin.token").read_text().strip()
        with httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}) as c:
            resp = c.request(method, f"/api/v1{path}", json=body)
        resp.raise_for_status()
        return resp.json()

    def wait_ready(self, timeout: float = 60) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            p = self.proc.popen
            if p is None or p.poll() is not None:
                raise RuntimeError(f"controller {self.index} exited; see {self.proc.log}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"controller {self.index} did not serve in {timeout:.0f} s; see {self.proc.log}")


class Cluster:
    def __init__(self, root: Path, pg: PgServer, db: str, agents: int, job_seconds: dict[str, float], *,
                 relayed: bool) -> None:
        self.root, self.pg, self.db = root, pg, db
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.relay = PgRelay((pg.host, pg.port))
        self.relay.start()
        # through the relay only when the run cuts the network: else a PostgreSQL stop reaches the controllers
        # exactly as it is (connects refused by the host, not accepted by the relay and closed)
        url = f"postgresql+psycopg://postgres@127.0.0.1:{self.relay.port if relayed else pg.port}/{db}"
        self.ctl = [Controller(i, root, url) for i in range(3)]
        grpc = ",".join(f"127.0.0.1:{c.ports['grpc']}" for c in self.ctl)
        enroll = ",".join(f"127.0.0.1:{c.ports['enroll']}" for c in self.ctl)
        self.agents: dict[str, Proc] = {}
        for i in range(agents):
            profile = PROFILES[i % len(PROFILES)]
            host = f"ha-{profile}-{i + 1:02d}"
            self.agents[host] = Proc(host, [
                sys.executable, "-m", "fleetctl.agent.main", "run", "--controller", grpc, "--enroll-address", enroll,
                "--ca", str(self.ctl[0].state / "ca" / "ca.pem"), "--state-dir", str(root / "agents" / host),
                "--simulate", profile, "--hostname", host, "--executor", "simulated", "--server-name", "127.0.0.1",
                "--connect-timeout", "120"],
                root / "logs" / f"{host}.log", {"FLEET_SIM_JOB_SECONDS": json.dumps(job_seconds)})

    def live(self) -> Controller:
        return next(c for c in self.ctl if c.pid is not None)

    def up(self) -> None:
        first = self.ctl[0]
        first.proc.start()
        first.wait_ready()
        for c in self.ctl[1:]:  # one CA for all: copies of the first's, before their first start (docs/ha.md)
            shutil.copytree(first.state / "ca", c.state / "ca")
            c.proc.start()
        for c in self.ctl[1:]:
            c.wait_ready()
        for host, agent in self.agents.items():
            token = first.api("POST", "/tokens", {"ttl_seconds": 900, "hostname": host})["token"]
            agent.env["FLEET_AGENT_TOKEN"] = token  # in the environment, never on a command line
            agent.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if sum(n["status"] == "online" for n in first.api("GET", "/nodes")["nodes"]) == len(self.agents):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"not every agent came online; see {self.root / 'logs'}")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.dsn(self.db)) as conn:
            return conn.execute(sql, params).fetchall()

    def holders(self) -> dict[str, str]:
        """Each node's session holder (``host:pid:nonce`` of a controller)."""
        return dict(self.query("SELECT n.hostname, s.controller_id FROM agent_sessions s "
                                   "JOIN nodes n ON n.id = s.node_id"))

    def rollout_owner(self, rid: str) -> str:
        rows = self.query("SELECT holder FROM leases WHERE name = %s", f"rollout:{rid}")
        return str(rows[0][0] or "") if rows else ""

    def down(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for c in self.ctl:
            c.proc.stop()
        self.relay.close()


def held_by(holder: str, pid: int) -> bool:
    return f":{pid}:" in holder


def kill_controller(cl: Cluster, rid: str, rng: random.Random, max_down: float) -> dict[str, Any]:
    """kill -9 a random live controller; restart it after a random down time; measure its agents' move, its
    restart and (when it drove the rollout) the rollout's move to another controller."""
    victim = rng.choice([c for c in cl.ctl if c.pid is not None])
    pid = victim.pid
    assert pid is not None
    moved = [h for h, holder in cl.holders().items() if held_by(holder, pid)]
    drove = held_by(cl.rollout_owner(rid), pid)
    down = rng.uniform(0.2, max_down)
    victim.proc.kill9()
    t0 = time.monotonic()
    restarted_at: float | None = None
    sessions_s = rollout_s = serving_s = None
    while time.monotonic() - t0 < 60 and (sessions_s is None or (drove and rollout_s is None) or serving_s is None):
        if restarted_at is None and time.monotonic() - t0 >= down:
            victim.proc.start()
            restarted_at = time.monotonic()
        if restarted_at is not None and serving_s is None:  # polled, not waited on: the other clocks keep running
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{victim.url}/api/v1/health", timeout=0.5).status_code == 200:
                    serving_s = time.monotonic() - restarted_at
        with contextlib.suppress(psycopg.Error):
            holders = cl.holders()
            if sessions_s is None and not any(held_by(holders.get(h, f":{pid}:"), pid) for h in moved):
                sessions_s = time.monotonic() - t0
            if drove and rollout_s is None:
                owner = cl.rollout_owner(rid)
                if owner and not held_by(owner, pid):
                    rollout_s = time.monotonic() - t0
        time.sleep(0.05)
    if restarted_at is None:
        victim.proc.start()
    if serving_s is None:
        serving_s = victim.wait_ready()
    return {"fault": "kill-9", "controller": victim.index, "agents": len(moved), "drove_rollout": drove,
            "down_s": round(down, 2), "agents_moved_s": None if sessions_s is None else round(sessions_s, 2),
            "rollout_moved_s": None if rollout_s is None else round(rollout_s, 2),
            "serving_after_restart_s": None if serving_s is None else round(serving_s, 2)}


def terminate_backends(cl: Cluster, rng: random.Random) -> dict[str, Any]:
    victim = rng.choice([c for c in cl.ctl if c.pid is not None])
    rows = cl.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                 victim.app)
    health = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:  # the controller answers health again (its pool reconnects)
        with contextlib.suppress(httpx.HTTPError, OSError):
            if httpx.get(f"{victim.url}/api/v1/health", timeout=2).status_code == 200:
                health = time.monotonic() - t0
                break
        time.sleep(0.1)
    return {"fault": "pg_terminate_backend", "controller": victim.index, "backends": len(rows),
            "healthy_after_s": None if health is None else round(health, 2),
            "still_running": [c.pid is not None for c in cl.ctl]}


def healthy_again(cl: Cluster, patience_s: float = 60) -> dict[int, float | None]:
    """Seconds from now until each controller's ``/health`` is 200 (its pool reconnected, a write went through;
    None: not within ``patience_s``)."""
    t0 = time.monotonic()
    healthy: dict[int, float | None] = {c.index: None for c in cl.ctl}
    while time.monotonic() - t0 < patience_s and any(v is None for v in healthy.values()):
        for c in cl.ctl:
            if healthy[c.index] is None:
                with contextlib.suppress(httpx.HTTPError, OSError):
                    if httpx.get(f"{c.url}/api/v1/health", timeout=2).status_code == 200:
                        healthy[c.index] = round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return healthy


def outage(cl: Cluster, seconds: float) -> dict[str, Any]:
    cut = cl.relay.outage(seconds)
    time.sleep(seconds)
    return {"fault": "network-cut", "seconds": seconds, "connections_cut": cut, "healthy_after_s": healthy_again(cl),
            "still_running": [c.pid is not None for c in cl.ctl]}


def stop_postgres(cl: Cluster, mode: StopMode, seconds: float) -> dict[str, Any]:
    """``pg_ctl stop -m MODE``, down for ``seconds``, ``pg_ctl start``; then until each controller is healthy and
    until every node's heartbeat is written again (``last_seen`` newer than the server's start)."""
    backends = cl.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fleet-chaos-ctl-%%'")
    stop_s = cl.pg.stop(mode)
    time.sleep(seconds)
    start_s = cl.pg.start()
    t0 = time.monotonic()
    [(back_at,)] = cl.query("SELECT now()")
    healthy = healthy_again(cl)
    heartbeats_s = None
    while heartbeats_s is None and time.monotonic() - t0 < 60:
        with contextlib.suppress(psycopg.Error):
            [(behind,)] = cl.query("SELECT count(*) FROM nodes WHERE last_seen IS NULL OR last_seen < %s", back_at)
            if behind == 0:
                heartbeats_s = round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return {"fault": f"pg-stop-{mode}", "seconds": seconds, "backends": backends[0][0], "stop_s": round(stop_s, 2),
            "start_s": round(start_s, 2), "healthy_after_s": healthy, "heartbeats_after_s": heartbeats_s,
            "still_running": [c.pid is not None for c in cl.ctl]}


def rollout_state(cl: Cluster, rid: str) -> dict[str, Any] | None:
    for c in cl.ctl:
        if c.pid is not None:
            with contextlib.suppress(httpx.HTTPError, OSError):
                st: dict[str, Any] = c.api("GET", f"/rollouts/{rid}")
                return st
    return None


def read_db(cl: Cluster, rid: str) -> dict[str, Any]:
    nodes = cl.query("SELECT hostname, state, job_id, build_key, cause FROM rollout_nodes WHERE rollout_id = %s",
                  rid)
    jobs = [{"id": i, "node": n, "kind": k, "status": s, "vars": v or {}, "error": e}
            for i, n, k, s, v, e in cl.query("SELECT id, node, kind, status, vars, error FROM jobs")]
    jobs = [j for j in jobs if j["vars"].get("rollout_id") == rid]
    by_id = {j["id"]: j for j in jobs}
    building = {k for (k,) in cl.query("SELECT build_key FROM builds WHERE status = 'building'")}
    [(status, reason)] = cl.query("SELECT status, reason FROM rollouts WHERE id = %s", rid)
    audit = [a for (a,) in cl.query("SELECT action FROM audit_log WHERE target = %s ORDER BY id", rid)]
    pauses = [str((d or {}).get("reason", ""))[:300] for (d,) in cl.query(
        "SELECT detail FROM audit_log WHERE target = %s AND action = 'rollout.pause' ORDER BY id", rid)]
    failures = [f"{h} {a}→{b}: {c[:300]}" for h, a, b, c in cl.query(
        "SELECT hostname, from_state, to_state, cause FROM rollout_transitions WHERE rollout_id = %s "
               "AND to_state = 'failed' ORDER BY id", rid)]
    ok = [j for j in jobs if j["status"] == "successful"]
    per_step = Counter((j["node"], j["kind"]) for j in ok)
    per_build = Counter(j["vars"].get("build_key") for j in ok if j["kind"] == "build-from-source")
    stuck = []
    for host, state, job_id, build_key, _ in nodes:
        live = job_id in by_id and by_id[job_id]["status"] in LIVE_JOB
        if (state in STEP_STATES and not live) or (state == "waiting" and build_key not in building):
            stuck.append(f"{host} ({state}, job {job_id})")
    return {
        "rollout_status": status, "rollout_reason": reason, "nodes": len(nodes),
        "states": dict(Counter(state for _, state, _, _, _ in nodes)),
        "lost": [h for h, state, _, _, _ in nodes if state not in TERMINAL],
        "not_done": {h: f"{state}: {(cause or '')[:160]}" for h, state, _, _, cause in nodes if state != "done"},
        "steps_run_twice": [f"{h} {k} ×{c}" for (h, k), c in per_step.items() if c > 1],
        "builds_twice": [f"{k} ×{c}" for k, c in per_build.items() if c > 1],
        "stuck": stuck,
        "successful_steps": len(ok),
        "jobs": dict(Counter(f"{j['kind']}:{j['status']}" for j in jobs)),
        "audit": audit,
        "pauses": pauses,  # why the engine paused (a resume is counted in "resumes")
        "step_failures": failures,  # node failures the faults caused (retried by a resume)
        "audit_complete": "rollout.start" in audit and "rollout.finish" in audit,
        "job_ids": [j["id"] for j in jobs],
    }


def read_agent_logs(logs: Path, job_ids: set[str]) -> dict[str, Any]:
    started: Counter[str] = Counter()
    for log in logs.glob("ha-*.log"):
        started.update(m.group(1) for m in JOB_STARTED.finditer(log.read_text(errors="replace"))
                       if m.group(1) in job_ids)
    return {"jobs_executed_twice": [f"{j} ×{c}" for j, c in started.items() if c > 1],
            "job_runs_logged": sum(started.values())}


def resume(cl: Cluster, rid: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, OSError, StopIteration):
        cl.live().api("POST", f"/rollouts/{rid}/resume", {"actor": "chaos", "retry_failed": True}, timeout=30)
        return True
    return False


def start_rollout(cl: Cluster, batch: str, patience_s: float = 60.0) -> str:
    """POST the rollout; a 503 (the store busy: three controllers just migrated and registered 20 agents on a loaded
    machine) is the controller saying "try again", so it is tried again, as an operator would, for ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return str(cl.ctl[0].api("POST", "/rollouts", {"canary": 0, "batch": batch, "actor": "chaos"},
                                     timeout=60)["id"])
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    db = f"fleet_chaos_{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="ha-chaos-"))
    job_seconds = {"build-from-source": args.build_seconds, "*": args.step_seconds}
    faults: list[dict[str, Any]] = []
    resumes = 0
    loads = [os.getloadavg()[0]]  # the machine is shared: its load, at the start, at each fault and at the end
    with pg_server() as pg:
        pg.create_database(db)
        cl = Cluster(root, pg, db, args.agents, job_seconds, relayed=args.outages > 0)
        t0 = time.monotonic()
        try:
            cl.up()
            setup_s = time.monotonic() - t0
            rid = start_rollout(cl, args.batch)
            started = time.monotonic()
            kills = stops = 0
            plan = (["kill"] * args.kills + ["terminate"] * args.terminates + ["outage"] * args.outages
                    + ["pg-stop"] * args.pg_stops)
            rng.shuffle(plan)
            end = started + args.duration
            for what in plan:
                if time.monotonic() >= end:
                    break
                time.sleep(rng.uniform(args.min_interval, args.max_interval))
                st = rollout_state(cl, rid)
                if st is not None and st["status"] == "paused":
                    resumes += resume(cl, rid)
                elif st is not None and not st["active"]:
                    break  # faults on an idle fleet test nothing of the rollout: the run says how many landed
                if what == "kill":
                    faults.append(kill_controller(cl, rid, rng, args.max_down))
                    kills += 1
                elif what == "terminate":
                    faults.append(terminate_backends(cl, rng))
                elif what == "pg-stop":
                    faults.append(stop_postgres(cl, STOP_MODES[stops % len(STOP_MODES)], args.pg_stop_seconds))
                    stops += 1
                else:
                    faults.append(outage(cl, args.outage_seconds))
                faults[-1]["at_s"] = round(time.monotonic() - started, 1)
                loads.append(os.getloadavg()[0])
                print(json.dumps(faults[-1]), flush=True)
            chaos_s = time.monotonic() - started
            deadline = time.monotonic() + args.settle
            final = None
            while time.monotonic() < deadline:
                final = rollout_state(cl, rid)
                if final is not None and final["status"] == "paused" and resumes < args.resumes:
                    resumes += resume(cl, rid)
                elif final is not None and not final["active"]:
                    break
                time.sleep(1)
            wall_s = time.monotonic() - started
            time.sleep(2)  # the last results and audit rows land
            figures = read_db(cl, rid)
            exited = [c.index for c in cl.ctl if c.pid is None]
        finally:
            cl.down()
    loads.append(os.getloadavg()[0])
    figures.update(read_agent_logs(root / "logs", set(figures.pop("job_ids"))))
    kill_rows = [f for f in faults if f["fault"] == "kill-9"]

    def spread(key: str) -> dict[str, float] | None:
        # a kill of a controller that held no agent moves none: it says nothing of the agents' move
        vals = [f[key] for f in kill_rows if f.get(key) is not None and (key != "agents_moved_s" or f["agents"])]
        return {"min": min(vals), "median": round(statistics.median(vals), 2), "max": max(vals),
                "n": len(vals)} if vals else None

    result = {
        "seed": args.seed, "agents": args.agents, "job_seconds": job_seconds, "rollout": rid,
        "setup_s": round(setup_s, 1), "chaos_s": round(chaos_s, 1), "wall_s": round(wall_s, 1),
        "faults": Counter(f["fault"] for f in faults), "kills": kills, "pg_stops": stops,
        "faults_planned": len(plan), "resumes": resumes,
        "agents_moved_s": spread("agents_moved_s"), "rollout_moved_s": spread("rollout_moved_s"),
        "serving_after_restart_s": spread("serving_after_restart_s"),
        "database_faults": [database_fault_summary(f) for f in faults if f["fault"] != "kill-9"],
        "controllers_exited": exited,
        "final_api_status": final["status"] if final else None, **figures, "events": faults,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        "load_1m": {"min": round(min(loads), 1), "max": round(max(loads), 1), "end": round(loads[-1], 1)},
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "state_dir": str(root),
    }
    if not args.keep and not problems(result):
        shutil.rmtree(root, ignore_errors=True)
        result["state_dir"] = None
    return result


def database_fault_summary(event: dict[str, Any]) -> dict[str, Any]:
    """A database fault in one line: the slowest controller's way back to healthy, whether every controller kept
    running, and (PostgreSQL stops) when every node's heartbeat was written again."""
    healthy = event["healthy_after_s"]
    times = list(healthy.values()) if isinstance(healthy, dict) else [healthy]
    return {"fault": event["fault"], "at_s": event.get("at_s"),
            "healthy_after_s": None if None in times else max(times),
            "heartbeats_after_s": event.get("heartbeats_after_s"), "still_running": all(event["still_running"])}


def problems(r: dict[str, Any]) -> list[str]:
    """What is wrong with a run's outcome (empty: nothing)."""
    out = [f"{k}: {r[k]}" for k in ("lost", "steps_run_twice", "builds_twice", "stuck", "jobs_executed_twice",
                                    "controllers_exited") if r[k]]
    for f in r["database_faults"]:
        heartbeats_lost = f["fault"].startswith("pg-stop") and f["heartbeats_after_s"] is None
        if not f["still_running"] or f["healthy_after_s"] is None or heartbeats_lost:
            out.append(f"after {f['fault']} at {f['at_s']} s: a controller exited or did not recover in 60 s: {f}")
    if r["rollout_status"] != "succeeded":
        out.append(f"rollout {r['rollout_status']}: {r['rollout_reason']}; not done: {r['not_done']}")
    if not r["audit_complete"]:
        out.append(f"audit log incomplete: {r['audit']}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ha_chaos", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--kills", type=int, default=12, help="kill -9 of a random controller, this many times")
    p.add_argument("--terminates", type=int, default=3, help="pg_terminate_backend of a controller's backends")
    p.add_argument("--outages", type=int, default=1, help=(
        "network cuts: the relay between the controllers and PostgreSQL resets and refuses connections (with 0 "
        "the controllers connect to PostgreSQL directly)"))
    p.add_argument("--outage-seconds", type=float, default=3.0)
    p.add_argument("--pg-stops", type=int, default=2, help=(
        f"PostgreSQL stopped and started again, this many times (modes in turn: {', '.join(STOP_MODES)})"))
    p.add_argument("--pg-stop-seconds", type=float, default=3.0, help="seconds PostgreSQL stays down")
    p.add_argument("--duration", type=float, default=300, help="seconds of faults at most")
    p.add_argument("--min-interval", type=float, default=2.0)
    p.add_argument("--max-interval", type=float, default=8.0)
    p.add_argument("--max-down", type=float, default=3.0, help="seconds a killed controller stays down, at most")
    p.add_argument("--build-seconds", type=float, default=90.0)
    p.add_argument("--step-seconds", type=float, default=10.0)
    p.add_argument("--batch", default="20%,40%,100%")
    p.add_argument("--settle", type=float, default=240)
    p.add_argument("--resumes", type=int, default=5)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json-out", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    r = run(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    summary = {k: v for k, v in r.items() if k != "events"}
    print(json.dumps(summary, indent=1, default=str))
    bad = problems(r)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
