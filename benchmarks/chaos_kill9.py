"""Chaos run: random ``kill -9`` of the controller and of agents during a rollout with source builds.

A real controller process (``python -m fleetctl.controller.main serve``, SQLite in a temp state dir) and N real
agent processes (``python -m fleetctl.agent.main run --simulate PROFILE --executor simulated``: gRPC mTLS, the agent's
real upload of built wheels; job durations from ``$FLEET_SIM_JOB_SECONDS``). The profiles mix wheel installs
(h100, a100) and source builds (l40s, t4, gh200; two nodes per build key, so one builds and the other waits
for it). ``fleetctl rollout flash-attn --detach`` starts a rollout; then, at seeded random intervals, the
controller (restarted on the same ports and state dir) or a random agent (restarted with its state dir) is
SIGKILLed, ``--kills`` times or until ``--duration`` ends or the rollout ends. A paused rollout is resumed
with ``fleetctl rollout resume ID --retry-failed`` (an agent killed mid-job fails that job ``interrupted``
and the failure budget pauses the rollout: the operator's move). After a settle period without kills the
database is read and the run reports:

* lost: nodes of the rollout not in a terminal state;
* duplicated: more than one *successful* job of the same kind for a node within one attempt, and build keys
  built successfully more than once;
* stuck: nodes in a step (or waiting on a build) with no live job;
* jobs run twice: a job id the agents' logs show started more than once (one job row, two runs on the node);
  build uploads retried (the agents' logs);
* verification records kept vs expected (one per successful verify job of the rollout);
* kills of each kind; the controller's longest event-loop stall (``/api/v1/stats`` ``loop_lag.max_ms``,
  polled with ``reset_lag`` every second, so a kill loses at most one second of samples) and longest GC pause.

Exit status 1 when lost, duplicated, stuck or jobs run twice is not 0 (or the rollout did not end), 0 otherwise.

    .venv/bin/python -m benchmarks.chaos_kill9 [--seed 1] [--kills 20] [--duration 120] [--nodes 8]
        [--json | --json-out FILE]
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
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
# wheel installs and source builds; each build profile twice, so a build key has a builder and a waiter
PROFILES = ("l40s", "h100", "t4", "a100", "gh200", "l40s", "t4", "h100")
TERMINAL = {"done", "failed", "skipped", "rolled-back"}
STEP_STATES = {"keyring", "toolkit", "build", "install", "verify", "rolling-back"}
LIVE_JOB = {"pending", "dispatched", "running"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One process we kill and restart: its command line is kept so the restart is the same process."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            # own session: a kill -9 of it reaches nothing of ours, and ours (Ctrl-C) does not reach it
            self.popen = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=ROOT, env={**os.environ, **self.env}, start_new_session=True)

    def kill9(self) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


class Fleet:
    """The controller and the agents, on fixed ports so restarts come back at the same addresses."""

    def __init__(self, root: Path, nodes: int, job_seconds: dict[str, float]) -> None:
        self.root = root
        self.state = root / "controller"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        py = sys.executable
        self.controller = Proc("controller", [
            py, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
            "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}", "--enroll-listen",
            f"127.0.0.1:{self.ports['enroll']}", "--http-listen", f"127.0.0.1:{self.ports['http']}",
            "--heartbeat-interval", "1", "--missed-heartbeats", "5", "--http-insecure"],  # loopback; bare httpx
            self.logs / "controller.log",
            # a restarted controller takes the rollout's lease over after 5 s, not the default TTL
            {"FLEET_ROLLOUT_LEASE_TTL": "5"})
        self.agents: dict[str, Proc] = {}
        sim = {"FLEET_SIM_JOB_SECONDS": json.dumps(job_seconds)}
        for i in range(nodes):
            profile = PROFILES[i % len(PROFILES)]
            host = f"chaos-{profile}-{i + 1:02d}"
            self.agents[host] = Proc(host, [
                py, "-m", "fleetctl.agent.main", "run", "--controller", f"127.0.0.1:{self.ports['grpc']}",
                "--enroll-address", f"127.0.0.1:{self.ports['enroll']}", "--ca", str(self.state / "ca" / "ca.pem"),
                "--state-dir", str(root / "agents" / host), "--simulate", profile, "--hostname", host,
                "--executor", "simulated", "--server-name", "127.0.0.1"], self.logs / f"{host}.log", dict(sim))

    @property
    def token(self) -> str:
        return (self.state / "admin.token").read_text().strip()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5) -> Any:
        with httpx.Client(base_url=self.url, timeout=timeout,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            resp = c.request(method, f"/api/v1{path}", json=body)
        resp.raise_for_status()
        return resp.json()

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until ``/api/v1/health`` answers 200 (the controller serves again)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            proc = self.controller.popen
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"the controller exited; see {self.controller.log}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"the controller did not come up in {timeout:.0f} s; see {self.controller.log}")

    def up(self) -> None:
        self.controller.start()
        self.wait_ready()
        for host, agent in self.agents.items():
            # the one-time enrollment token: in the environment, never on a command line; a restarted agent
            # has its identity in its state dir and needs none
            token = self.api("POST", "/tokens", {"ttl_seconds": 600, "hostname": host})["token"]
            agent.env["FLEET_AGENT_TOKEN"] = token
            agent.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                online = [n for n in self.api("GET", "/nodes")["nodes"] if n["status"] == "online"]
                if len(online) == len(self.agents):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"not every agent came online; see {self.logs}")

    def fleetctl(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "fleetctl.controller.cli", *args,
                              "--state-dir", str(self.state), "--json"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"fleetctl {' '.join(args)} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout)

    def down(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.controller.stop()


class StatsPoller(threading.Thread):
    """Polls ``/api/v1/stats?reset_lag=true`` every second: the longest loop stall and GC pause of every
    controller incarnation, each sample window at most a second long (a kill loses only its last window)."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.stop = threading.Event()
        self.max_lag_ms = 0.0
        self.max_lag_steady_ms = 0.0  # leaving out each incarnation's first window (start-up: imports, gc.freeze)
        self.max_gc_ms = 0.0
        self.samples = 0
        self._seen_start = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                starts = self.fleet.controller.starts
                st = self.fleet.api("GET", "/stats?reset_lag=true", timeout=3)
                lag = float(st.get("loop_lag", {}).get("max_ms", 0.0))
                self.max_lag_ms = max(self.max_lag_ms, lag)
                if starts == self._seen_start:
                    self.max_lag_steady_ms = max(self.max_lag_steady_ms, lag)
                self._seen_start = starts
                gcs = [float(v.get("max_ms", 0.0)) for k, v in st.get("gc", {}).items() if k.startswith("gen")]
                self.max_gc_ms = max([self.max_gc_ms, *gcs])
                self.samples += 1


def rollout_state(fleet: Fleet, rid: str) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, OSError):
        st: dict[str, Any] = fleet.api("GET", f"/rollouts/{rid}")
        return st
    return None


def resume(fleet: Fleet, rid: str, events: list[str], t0: float) -> None:
    try:
        fleet.fleetctl("rollout", "resume", rid, "--retry-failed", "--actor", "chaos")
        events.append(f"{time.monotonic() - t0:7.1f}s resume --retry-failed")
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:  # the controller may be down right now
        events.append(f"{time.monotonic() - t0:7.1f}s resume failed: {str(exc)[:200]}")


def chaos(fleet: Fleet, rid: str, args: argparse.Namespace, rng: random.Random,
          events: list[str], t0: float) -> Counter[str]:
    kills: Counter[str] = Counter()
    hosts = sorted(fleet.agents)
    end = time.monotonic() + args.duration
    while sum(kills.values()) < args.kills and time.monotonic() < end:
        time.sleep(rng.uniform(args.min_interval, args.max_interval))
        st = rollout_state(fleet, rid)
        if st is not None and st["status"] == "paused":
            resume(fleet, rid, events, t0)
        elif st is not None and not st["active"]:
            events.append(f"{time.monotonic() - t0:7.1f}s rollout ended ({st['status']}): no more kills")
            break
        down = rng.uniform(0.1, args.max_down)
        if rng.random() < args.controller_share:
            fleet.controller.kill9()
            kills["controller"] += 1
            time.sleep(down)
            fleet.controller.start()
            took = fleet.wait_ready()
            events.append(f"{time.monotonic() - t0:7.1f}s kill -9 controller, down {down:.1f} s, serving "
                          f"{took:.1f} s after restart")
        else:
            host = rng.choice(hosts)
            fleet.agents[host].kill9()
            kills["agent"] += 1
            time.sleep(down)
            fleet.agents[host].start()
            events.append(f"{time.monotonic() - t0:7.1f}s kill -9 agent {host}, down {down:.1f} s")
    return kills


def settle(fleet: Fleet, rid: str, args: argparse.Namespace, events: list[str], t0: float) -> dict[str, Any] | None:
    """No more kills: wait for the rollout to end, resuming it (retrying failed nodes) when it pauses or ends
    with failed nodes, at most ``--resumes`` times."""
    resumes = 0
    deadline = time.monotonic() + args.settle
    st = None
    while time.monotonic() < deadline:
        st = rollout_state(fleet, rid)
        if st is not None and (st["status"] == "paused" or (
                not st["active"] and any(n["state"] == "failed" for n in st["nodes"]))):
            if resumes >= args.resumes:
                break
            resumes += 1
            resume(fleet, rid, events, t0)
        elif st is not None and not st["active"]:
            break
        time.sleep(1.0)
    return st


def read_db(db: Path, rid: str) -> dict[str, Any]:
    """The figures, from the controller's database (read-only; after the processes stopped)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        nodes = con.execute("SELECT hostname, state, step, job_id, attempt, build_key, cause FROM rollout_nodes "
                            "WHERE rollout_id = ?", (rid,)).fetchall()
        jobs = [dict(r) for r in con.execute("SELECT id, node, kind, status, vars, error FROM jobs").fetchall()]
        for j in jobs:
            j["vars"] = json.loads(j["vars"] or "{}")
        jobs = [j for j in jobs if j["vars"].get("rollout_id") == rid]
        by_id = {j["id"]: j for j in jobs}
        building = {r["build_key"] for r in con.execute("SELECT build_key FROM builds WHERE status = 'building'")}
        verified = {r["job_id"] for r in con.execute("SELECT job_id FROM verifications WHERE job_id IS NOT NULL")}
        status = con.execute("SELECT status, reason FROM rollouts WHERE id = ?", (rid,)).fetchone()
    finally:
        con.close()
    ok = [j for j in jobs if j["status"] == "successful"]
    per_step = Counter((j["node"], j["kind"], j["vars"].get("attempt")) for j in ok)
    per_build = Counter(j["vars"].get("build_key") for j in ok if j["kind"] == "build-from-source")
    lost = [n["hostname"] for n in nodes if n["state"] not in TERMINAL]
    stuck = []
    for n in nodes:
        live = n["job_id"] in by_id and by_id[n["job_id"]]["status"] in LIVE_JOB
        if (n["state"] in STEP_STATES and not live) or (n["state"] == "waiting" and n["build_key"] not in building):
            stuck.append(f"{n['hostname']} ({n['state']}, job {n['job_id']})")
    verify_ok = [j["id"] for j in ok if j["kind"] == "verify"]
    return {
        "rollout_status": status["status"] if status else None,
        "rollout_reason": status["reason"] if status else None,
        "nodes": len(nodes),
        "states": dict(Counter(n["state"] for n in nodes)),
        "lost": lost,
        "duplicated_steps": [f"{h} {k} attempt {a} ×{c}" for (h, k, a), c in per_step.items() if c > 1],
        "duplicated_builds": [f"{k} ×{c}" for k, c in per_build.items() if c > 1],
        "stuck": stuck,
        "failed_nodes": {n["hostname"]: (n["cause"] or "")[:200] for n in nodes if n["state"] == "failed"},
        "jobs": dict(Counter(f"{j['kind']}:{j['status']}" for j in jobs)),
        "interrupted_jobs": sum(1 for j in jobs if (j["error"] or "").startswith("interrupted")),
        "builds_succeeded": sum(per_build.values()),
        "builds_started": sum(1 for j in jobs if j["kind"] == "build-from-source"),
        "build_keys": len(per_build),
        "job_ids": [j["id"] for j in jobs],
        "verification_records": {"kept": sum(1 for j in verify_ok if j in verified), "expected": len(verify_ok)},
    }


JOB_STARTED = re.compile(r"job (\S+) \((\S+)\) started")  # agent/client.py, one line per execution


def read_agent_logs(logs: Path, job_ids: set[str]) -> dict[str, Any]:
    """What the database cannot tell: a job *executed* twice (started again by an agent after a controller
    restart re-sent it: one job row, two runs on the node) and the build uploads that were retried."""
    started: Counter[str] = Counter()
    retries = 0
    for log in logs.glob("chaos-*.log"):
        text = log.read_text(errors="replace")
        started.update(m.group(1) for m in JOB_STARTED.finditer(text) if m.group(1) in job_ids)
        retries += len(re.findall(r"uploading \S+: .*; retrying in", text))
    return {"reexecuted_jobs": [f"{j} ×{c}" for j, c in started.items() if c > 1], "upload_retries": retries,
            "job_runs_logged": sum(started.values())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="chaos-kill9-"))
    job_seconds = {"build-from-source": args.build_seconds, "*": args.step_seconds}
    fleet = Fleet(root, args.nodes, job_seconds)
    poller = StatsPoller(fleet)
    events: list[str] = []
    t0 = time.monotonic()
    try:
        fleet.up()
        poller.start()
        out = fleet.fleetctl("rollout", "flash-attn", "--detach", "--canary", "0", "--batch", args.batch,
                             "--actor", "chaos")
        rid = str(out["id"])
        events.append(f"{time.monotonic() - t0:7.1f}s rollout {rid} started on {len(out['nodes'])} nodes")
        kills = chaos(fleet, rid, args, rng, events, t0)
        chaos_s = time.monotonic() - t0
        final = settle(fleet, rid, args, events, t0)
        poller.stop.set()
        poller.join(timeout=5)
        wall = time.monotonic() - t0
    finally:
        poller.stop.set()
        fleet.down()
    figures = read_db(fleet.state / "controller.db", rid)
    figures.update(read_agent_logs(fleet.logs, set(figures.pop("job_ids"))))
    result = {
        "seed": args.seed, "nodes": args.nodes, "profiles": [PROFILES[i % len(PROFILES)] for i in range(args.nodes)],
        "job_seconds": job_seconds, "kills": {"controller": kills["controller"], "agent": kills["agent"],
                                              "total": sum(kills.values())},
        "resumes": sum(1 for e in events if e.endswith("resume --retry-failed")),
        "chaos_s": round(chaos_s, 1), "wall_s": round(wall, 1), "rollout": rid,
        "final_api_status": final["status"] if final else None,
        "max_loop_stall_ms": poller.max_lag_ms, "max_loop_stall_after_start_ms": poller.max_lag_steady_ms,
        "max_gc_pause_ms": poller.max_gc_ms, "stats_samples": poller.samples,
        **figures, "events": events, "state_dir": str(root),
        "machine": {"kernel": platform.release(), "nproc": os.cpu_count(),
                    "load_at_end": os.getloadavg()[0]},
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if not args.keep and not bad(result):
        shutil.rmtree(root, ignore_errors=True)  # a bad run keeps its logs and database for the post-mortem
        result["state_dir"] = None
    return result


def bad(r: dict[str, Any]) -> bool:
    return bool(r["lost"] or r["duplicated_steps"] or r["duplicated_builds"] or r["stuck"] or r["reexecuted_jobs"]
                or r["rollout_status"] not in ("succeeded", "partial"))


def print_table(r: dict[str, Any]) -> None:
    vr = r["verification_records"]
    for line in r["events"]:
        print(line)
    rows = [
        ("seed", r["seed"]),
        ("nodes", f"{r['nodes']} ({', '.join(sorted(set(r['profiles'])))})"),
        ("kills", f"{r['kills']['total']} (controller {r['kills']['controller']}, agent {r['kills']['agent']})"),
        ("chaos / wall", f"{r['chaos_s']} s / {r['wall_s']} s"),
        ("rollout", f"{r['rollout']}: {r['rollout_status']} ({r['states']}), {r['resumes']} resume(s)"),
        ("lost", len(r["lost"])),
        ("duplicated steps", len(r["duplicated_steps"])),
        ("duplicated builds", len(r["duplicated_builds"])),
        ("stuck", len(r["stuck"])),
        ("jobs run twice", f"{len(r['reexecuted_jobs'])} (of {r['job_runs_logged']} job runs in the agents' logs)"),
        ("upload retries", r["upload_retries"]),
        ("builds", f"{r['builds_succeeded']} succeeded for {r['build_keys']} keys ({r['builds_started']} started)"),
        ("interrupted jobs", r["interrupted_jobs"]),
        ("verification records", f"{vr['kept']} kept of {vr['expected']}"),
        ("longest loop stall", f"{r['max_loop_stall_ms']:.1f} ms; {r['max_loop_stall_after_start_ms']:.1f} ms leaving "
                               f"out each start's first second (longest GC pause {r['max_gc_pause_ms']:.1f} ms, "
                               f"{r['stats_samples']} /stats samples)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for key in ("lost", "duplicated_steps", "duplicated_builds", "stuck", "reexecuted_jobs"):
        for item in r[key]:
            print(f"  {key}: {item}")
    for host, cause in r["failed_nodes"].items():
        print(f"  failed: {host}: {cause}")
    if r["state_dir"]:
        print(f"state and logs kept in {r['state_dir']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chaos_kill9", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=1, help="seeds the kill times, victims and down times")
    p.add_argument("--kills", type=int, default=20, help="at most this many kills")
    p.add_argument("--duration", type=float, default=120, help="seconds of chaos at most (it ends with the rollout)")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--controller-share", type=float, default=0.4, help="the share of kills aimed at the controller")
    p.add_argument("--min-interval", type=float, default=1.0, help="seconds between kills, at least")
    p.add_argument("--max-interval", type=float, default=5.0, help="seconds between kills, at most")
    p.add_argument("--max-down", type=float, default=2.0, help="seconds a killed process stays down, at most")
    p.add_argument("--build-seconds", type=float, default=8.0, help="a simulated build's duration")
    p.add_argument("--step-seconds", type=float, default=1.5, help="any other simulated job's duration")
    p.add_argument("--batch", default="2,50%", help="rollout batch sizes (no canary batch)")
    p.add_argument("--settle", type=float, default=180, help="seconds without kills for the rollout to end")
    p.add_argument("--resumes", type=int, default=5, help="resume --retry-failed at most this often while settling")
    p.add_argument("--keep", action="store_true", help="keep the state dir and logs")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write the result as JSON to FILE")
    args = p.parse_args(argv)
    result = run(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 1 if bad(result) else 0


if __name__ == "__main__":
    sys.exit(main())
