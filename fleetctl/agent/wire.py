"""Agent core types ↔ protobuf (fleet.v1). The only agent module that reads or builds messages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import NodeFacts
from fleetctl.fleet.jobs import FINISHED, JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb
from fleetctl.fleet.version import package_version


def _jsonable(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def report_facts_request(facts: NodeFacts) -> pb.ReportFactsRequest:
    """What the agent reports on (re)connecting and when asked: its facts and its own version."""
    return pb.ReportFactsRequest(facts=facts_to_proto(facts), agent_version=package_version())


def facts_to_proto(facts: NodeFacts, *, simulated: bool | None = None) -> pb.NodeFacts:
    """A NodeFacts message; ``simulated`` defaults to ``facts.extra["simulated"]``."""
    o = facts.os
    msg = pb.NodeFacts(
        hostname=facts.hostname,
        os=pb.OsFacts(id=o.id, version_id=o.version_id, arch=o.arch, kernel=o.kernel, glibc=o.glibc,
                      family=o.family, msvc=o.msvc, l4t=o.l4t, jetpack=o.jetpack),
        gpus=[pb.GpuFacts(index=g.index, name=g.name, compute_capability=g.compute_capability,
                          memory_mib=g.memory_mib, uuid=g.uuid, vendor=g.vendor, arch=g.arch) for g in facts.gpus],
        python=pb.PythonFacts(version=facts.python.version, executable=facts.python.executable,
                              abi=facts.python.abi, env_path=facts.python.env_path, env_fs=facts.python.env_fs),
        resources=pb.ResourceFacts(cpu_cores=facts.resources.cpu_cores, memory_mib=facts.resources.memory_mib),
        extra_json=_jsonable(dict(facts.extra)) if facts.extra else "",
        simulated=bool(facts.extra.get("simulated")) if simulated is None else simulated,
    )
    if facts.driver is not None:
        msg.driver.CopyFrom(pb.DriverFacts(version=facts.driver.version, cuda_max=facts.driver.cuda_max))
    if facts.toolkit is not None:
        msg.toolkit.CopyFrom(pb.ToolkitFacts(nvcc=facts.toolkit.nvcc, path=facts.toolkit.path))
    if facts.torch is not None:
        t = facts.torch
        msg.torch.CopyFrom(pb.TorchFacts(version=t.version, cuda=t.cuda, cxx11abi=t.cxx11abi,
                                         arch_list=list(t.arch_list), hip=t.hip))
    if facts.flash_attn is not None:
        fa = facts.flash_attn
        msg.flash_attn.CopyFrom(pb.FlashAttnFacts(version=fa.version, variant=fa.variant, beside=[
            pb.FlashAttnFacts(version=b.version, variant=b.variant) for b in fa.beside]))
    if facts.apt is not None:
        msg.apt.CopyFrom(pb.AptFacts(errors=list(facts.apt.errors)))
    if facts.rocm is not None:
        msg.rocm.CopyFrom(pb.RocmFacts(version=facts.rocm.version, smi=facts.rocm.smi))
    return msg


def job_from_proto(msg: pb.Job) -> JobSpec:
    try:
        variables = json.loads(msg.vars_json) if msg.vars_json else {}
    except ValueError as exc:
        raise InputError(f"job {msg.job_id}: vars_json is not JSON: {exc}", hint="controller bug") from exc
    if not isinstance(variables, dict):
        raise InputError(f"job {msg.job_id}: vars_json is not an object", hint="controller bug")
    return JobSpec(job_id=msg.job_id, kind=msg.kind, vars=variables,
                   timeout_s=float(msg.timeout_seconds or 3600))


def jobs_request(held_job_ids: Iterable[str]) -> pb.JobsRequest:
    """Open the Jobs stream saying which jobs this agent process still holds (running or unreported)."""
    return pb.JobsRequest(held_job_ids=sorted(held_job_ids), reports_held_jobs=True)


def event_to_proto(job_id: str, counter: int, event: Mapping[str, Any]) -> pb.JobEvent:
    """An ansible-runner style event dict (``event``, ``event_data``, ...) as a JobEvent."""
    name = str(event.get("event") or "fleet_event")[:64]
    data = event.get("event_data")
    if not isinstance(data, Mapping):
        data = {k: v for k, v in event.items() if k not in ("event", "counter", "uuid")}
    created = event.get("created_unix")
    return pb.JobEvent(job_id=job_id, counter=counter, event=name, data_json=_jsonable(dict(data)),
                       created_unix=float(created) if isinstance(created, int | float) else time.time())


def result_to_proto(job_id: str, outcome: JobOutcome) -> pb.JobResult:
    # the controller takes a finished status only: "could not start" (ERROR) is a failure to it
    status = outcome.status if outcome.status in FINISHED else JobStatus.FAILED
    rc = outcome.rc if outcome.rc is not None else -1  # every agent runner sets one; -1 as for "could not start"
    return pb.JobResult(job_id=job_id, status=status, rc=rc, result_json=_jsonable(outcome.result),
                        error=outcome.error or "")
