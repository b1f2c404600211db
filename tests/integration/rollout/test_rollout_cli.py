"""`fleetctl rollout …` end to end: a real controller (gRPC mTLS + HTTP + engine + SQLite), real agents
over sockets with a simulated executor (tests/integration/rollout/simrunner.py), and fleetctl run as
a separate process talking to the HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.app import RunningController
from tests.integration.fleet_support import SimAgents, wait_for
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(300)  # generous: fleetctl runs as a process, on a shared 2-core machine

NODES = [("h100-1", "h100"), ("h100-2", "h100"), ("a100-1", "a100"), ("a100-2", "a100"), ("l40s-1", "l40s"),
         ("l40s-2", "l40s"), ("l40s-3", "l40s"), ("t4-1", "t4"), ("v100-1", "v100")]


async def fleetctl(rc: RunningController, *args: str, timeout: float = 90) -> tuple[int, str, str]:
    env = {**os.environ, "USER": "tester", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetctl.controller.cli", *args, "--state-dir", str(rc.ctx.settings.state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_fleet(fleet: SimAgents, script: Script, tmp: Path, nodes: list[tuple[str, str]]) -> None:
    for host, profile in nodes:
        runner = SimRunner.for_profile(host, profile, script, tmp / "work" / host)
        sim = await fleet.start(host, profile, runner=runner, facts=runner.current_facts)
        runner.agent = sim.agent


def kinds(script: Script, kind: str) -> list[str]:
    return sorted(h for h, k, _ in script.ran if k == kind)


async def test_canary_batches_budget_stop_resume_rollback(db_url: str, controller: RunningController,
                                                          fleet: SimAgents, tmp_path: Path) -> None:
    """On SQLite and on PostgreSQL (``db_url``)."""
    script = Script()
    script.fail[("a100-2", "install-wheel")] = (
        "ImportError: /venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
        "undefined symbol: _ZN3c104cuda9SetDeviceEi")
    await start_fleet(fleet, script, tmp_path, NODES)

    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--dry-run", "--nodes",
                                  "gpu=H100,gpu=A100,gpu=L40S,gpu=V100")
    assert rc == 0, err
    assert "dry run: nothing changed" in out and "build once: " in out
    assert controller.ctx.jobs.list_jobs() == []

    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes",
                                  "gpu=H100,gpu=A100,gpu=L40S,gpu=V100", "--batch", "1,2,100%",
                                  "--max-failures", "0")
    assert rc == 10, out + err  # paused
    assert "[canary]" in out and "a100-2: FAILED" in out
    assert "diagnosis:" in out  # the undefined-symbol failure is diagnosed
    assert "paused: failure budget exceeded: 1 failed" in out
    assert "\x1b[" not in out  # not a TTY: plain lines only
    rid = out.split()[1]

    rc, out, err = await fleetctl(controller, "rollout", "status", rid, "--json")
    st = json.loads(out)
    assert st["status"] == "paused"
    untouched = [n for n in st["nodes"] if n["batch"] > st["current_batch"]]
    assert untouched and all(n["state"] == "planned" for n in untouched)

    script.fail.clear()
    rc, out, err = await fleetctl(controller, "rollout", "resume", rid, "--retry-failed")
    assert rc == 0, out + err
    rc, out, err = await fleetctl(controller, "rollout", "status", rid, "--json")
    st = json.loads(out)
    assert st["status"] == "succeeded"
    states = {n["hostname"]: n["state"] for n in st["nodes"]}
    assert states.pop("v100-1") == "skipped" and set(states.values()) == {"done"}
    # build once, install many: one build for the three L40S nodes, then each of them (the builder too) installs it
    assert len(kinds(script, "build-from-source")) == 1
    assert sorted(h for h in kinds(script, "install-wheel") if h.startswith("l40s")) == ["l40s-1", "l40s-2", "l40s-3"]
    [build] = st["builds"]
    assert build["status"] == "succeeded" and build["artifact_sha256"]
    assert controller.ctx.artifacts.get(build["artifact_sha256"]).kind == "wheel"
    # `fleetctl node` says what the rollout did to that node
    rc, out, err = await fleetctl(controller, "node", "l40s-1")
    assert rc == 0, out + err
    assert f"{rid}  flash-attn {st['version']}  fa2-source: done  (rollout succeeded)" in out, out
    rc, out, err = await fleetctl(controller, "node", "a100-2", "--json")
    (mine,) = json.loads(out)["rollouts"]
    assert (mine["rollout_id"], mine["state"], mine["attempt"]) == (rid, "done", 2), mine

    rc, out, err = await fleetctl(controller, "rollout", "rollback", rid)
    assert rc == 0, out + err
    rc, out, err = await fleetctl(controller, "rollout", "status", rid, "--json")
    st = json.loads(out)
    assert st["status"] == "rolled-back"
    assert sorted(kinds(script, "rollback")) == sorted(h for h, s in states.items())

    rc, out, err = await fleetctl(controller, "rollout", "audit", rid, "--json")
    audit = [(a["actor"], a["action"], a["detail"].get("on_behalf_of")) for a in json.loads(out)["audit"]]
    # fleetctl used the admin token: the actor is "admin"; $USER is only the name it claimed (issue 13)
    assert audit == [("admin", "rollout.start", "tester"), ("engine", "rollout.pause", None),
                     ("admin", "rollout.resume", "tester"), ("engine", "rollout.finish", None),
                     ("admin", "rollout.rollback", "tester"), ("engine", "rollout.finish", None)]
    rc, out, _ = await fleetctl(controller, "rollout", "list")
    assert rc == 0 and rid in out and "rolled-back" in out


async def test_bad_inputs_and_overlap(controller: RunningController, fleet: SimAgents, tmp_path: Path) -> None:
    script = Script(default_delay=0.1)
    script.delays["install-wheel"] = 30  # keeps the first rollout busy
    await start_fleet(fleet, script, tmp_path, NODES[:3])

    rc, _, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "rack=7")
    assert rc == 2 and "unknown selector key 'rack'" in err
    rc, _, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "gpu=B200")
    assert rc == 2 and "matches no node" in err and "h100-1" in err
    rc, _, err = await fleetctl(controller, "rollout", "flash-attn", "--version", "2.99.1")
    assert rc == 4 and "not in the catalog" in err and "2.8.3" in err
    rc, _, err = await fleetctl(controller, "rollout", "flash-attn", "--batch", "0")
    assert rc == 2 and "bad batch size" in err

    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "h100-*", "--detach")
    assert rc == 0, err
    rid = out.split()[1]
    rc, _, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "gpu=H100,gpu=A100")
    assert rc == 5 and f"already in active rollout {rid}" in err and "hint:" in err
    await wait_for(lambda: any(k == "install-wheel" for _, k, _ in script.ran), timeout=20)
    rc, out, err = await fleetctl(controller, "rollout", "abort", rid)
    assert rc == 0 and "aborting" in out
    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "a100-1", "--detach", "--json")
    assert rc == 0 and json.loads(out)["id"]


def _node_states(st: dict[str, Any]) -> dict[str, str]:
    return {n["hostname"]: n["state"] for n in st["nodes"]}


async def test_failed_rollback_exits_nonzero_with_the_nodes_error(controller: RunningController, fleet: SimAgents,
                                                                  tmp_path: Path) -> None:
    """A rollback whose job fails ends ``rollback-failed``, never ``rolled-back``: `rollout rollback` and
    `rollout status` exit 13 and show the node's error; rolling back again after the fix retries that node."""
    script = Script()
    await start_fleet(fleet, script, tmp_path, [("h100-1", "h100"), ("h100-2", "h100")])
    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "gpu=H100", "--canary", "0",
                                  "--batch", "100%")
    assert rc == 0, out + err
    rid = out.split()[1]
    error = ("cannot restore flash-attn 2.6.3: it was not installed by fleetctl, so the node keeps no wheel of it, "
             "and the controller sent none")
    script.fail[("h100-2", "rollback")] = error
    rc, out, err = await fleetctl(controller, "rollout", "rollback", rid)
    assert rc == 13, out + err
    assert "rollback-failed" in out and "h100-2" in out and "cannot restore flash-attn 2.6.3" in out, out
    rc, out, err = await fleetctl(controller, "rollout", "status", rid)
    assert rc == 13, out + err
    assert "ROLLBACK-FAILED" in out and "cannot restore flash-attn 2.6.3" in out, out
    rc, out, err = await fleetctl(controller, "rollout", "status", rid, "--json")
    st = json.loads(out)
    assert st["status"] == "rollback-failed"
    assert {n["hostname"]: n["state"] for n in st["nodes"]} == {"h100-1": "rolled-back", "h100-2": "failed"}

    script.fail.clear()
    rc, out, err = await fleetctl(controller, "rollout", "rollback", rid)
    assert rc == 0, out + err
    assert kinds(script, "rollback") == ["h100-1", "h100-2", "h100-2"]
