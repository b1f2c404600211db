"""Load an issue-8 end-to-end fixture directory into a controller store.

Layout (written by ``scripts/device/e2e.sh collect`` as ``h100_e2e/`` inside its tarball; committed as
``tests/fixtures/h100_e2e/`` from the real H100 and ``tests/fixtures/h100_e2e_rehearsal/`` from the
rehearsal on a machine without a GPU):

- ``meta.json``            {simulated, rehearsal, hostname, machine, commit, collected_at}
- ``rollout_status.json``  ``fleetctl rollout status ID --json`` of rollout #1 (build from source)
- ``rollout2_status.json`` the same for rollout #2 (install of the built wheel), optional
- ``node.json``            ``fleetctl node HOST --json`` at the end
- ``facts.json``           the node's §3.1 facts at the end
- ``jobs/<id>.json``       ``fleetctl job ID --json`` for every job of the node
- ``verification.json``    rollout #1's verification result (fleet.verification schema);
  ``verification2.json`` rollout #2's, optional
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from fleetctl.controller.rollout.models import Build, Rollout, RolloutNode, RolloutTransition
from fleetctl.controller.store import Store
from fleetctl.controller.store.models import Job, JobEvent, Node

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_dirs() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("h100_e2e*") if (p / "rollout_status.json").is_file())


def read(d: Path, name: str) -> Any:
    return json.loads((d / name).read_text())


def _t(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def load_into(store: Store, d: Path) -> dict[str, Any]:
    """Insert the node, its jobs and events, the rollouts and their builds; returns what was loaded."""
    node, facts = read(d, "node.json"), read(d, "facts.json")
    jobs = [json.loads(p.read_text()) for p in sorted((d / "jobs").glob("*.json"))]
    rollouts = [read(d, n) for n in ("rollout_status.json", "rollout2_status.json") if (d / n).is_file()]
    now = dt.datetime.now(dt.UTC)
    with store.session() as s:
        s.add(Node(hostname=node["hostname"], status=node.get("status") or "online", facts=facts,
                   extra=node.get("extra") or {}, simulated=bool(node.get("simulated")),
                   registered_at=_t(node.get("registered_at")) or now,
                   facts_updated_at=_t(node.get("facts_updated_at")) or now,
                   last_seen=_t(node.get("last_seen")) or now, status_changed_at=now))
        for j in jobs:
            s.add(Job(id=j["id"], node=j["node"], kind=j["kind"], vars=j.get("vars") or {},
                      timeout_seconds=int(j.get("timeout_seconds") or 3600), status=j["status"],
                      created_at=_t(j["created_at"]), dispatched_at=_t(j.get("dispatched_at")),
                      started_at=_t(j.get("started_at")), finished_at=_t(j.get("finished_at")), rc=j.get("rc"),
                      result=j.get("result"), error=j.get("error")))
        s.flush()
        for j in jobs:
            for e in j.get("events") or []:
                s.add(JobEvent(job_id=j["id"], counter=e["counter"], event=e["event"], data=e.get("data") or {},
                               created=_t(e["created"])))
        for r in rollouts:
            s.add(Rollout(id=r["id"], version=r["version"], selector=r.get("selector") or "all",
                          options=r.get("options") or {}, status=r["status"], reason=r.get("reason") or "",
                          created_by=r.get("created_by") or "admin", created_at=_t(r["created_at"]),
                          updated_at=_t(r["updated_at"]), finished_at=_t(r.get("finished_at")),
                          current_batch=r.get("current_batch") or 0, batches=r.get("batches") or 1))
            s.flush()
            for n in r["nodes"]:
                plan = {"hostname": n["hostname"], "variant": n["variant"], "gpu": n.get("gpu") or "",
                        "version": r["version"], "steps": [], "build_key": n.get("build_key")}
                s.add(RolloutNode(rollout_id=r["id"], hostname=n["hostname"], batch=n["batch"],
                                  canary=bool(n.get("canary")), plan=plan, previous=None, build_key=n.get("build_key"),
                                  state=n["state"], step=n.get("step"), job_id=n.get("job_id"),
                                  attempt=n.get("attempt") or 1, cause=n.get("cause") or "",
                                  diagnosis=n.get("diagnosis"), result={}, updated_at=_t(n["updated_at"])))
            for t in r["transitions"]:
                s.add(RolloutTransition(rollout_id=r["id"], hostname=t["hostname"], from_state=t["from"],
                                        to_state=t["to"], at=_t(t["at"]), cause=t.get("cause") or "",
                                        job_id=t.get("job_id"), actor=t.get("actor") or "engine"))
            for b in r.get("builds") or []:
                if s.get(Build, b["build_key"]) is None:
                    s.add(Build(build_key=b["build_key"], status=b["status"], rollout_id=r["id"],
                                builder=b.get("builder"), params=b.get("params") or {},
                                artifact_sha256=b.get("artifact_sha256"),
                                artifact_filename=b.get("artifact_filename"), error=b.get("error"),
                                created_at=_t(r["created_at"]), finished_at=_t(r.get("finished_at")),
                                attempts=1))
    return {"node": node, "facts": facts, "jobs": jobs, "rollouts": rollouts}
