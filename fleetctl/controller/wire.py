"""Protobuf (fleet.v1) ↔ controller core types. The only controller module that reads or builds messages."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fleetctl.controller.ca import IssuedCert
from fleetctl.controller.enrollment import EnrollResult
from fleetctl.controller.jobs import JobEventRecord
from fleetctl.fleet.errors import FactsError, InputError
from fleetctl.fleet.facts import MAX_FACTS_BYTES, NodeFacts, parse_node
from fleetctl.fleet.jobs import FINISHED, JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb

MAX_JSON_FIELD_CHARS = 64 * 1024
# deeper nesting than any fact, event or result has (a few levels): refused, not stored
MAX_JSON_DEPTH = 64


def _json_object(text: str, what: str, *, limit: int = MAX_JSON_FIELD_CHARS) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > limit:
        raise InputError(f"{what} is {len(text)} characters, more than the limit of {limit}",
                         hint="send less data")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}", hint="send a JSON object") from exc
    except RecursionError as exc:  # "[[[[…" a few thousand deep: the parser's recursion gives out first
        raise InputError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                         hint="send a flatter JSON object") from exc
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {type(value).__name__}", hint="send a JSON object")
    if _depth_over(value, MAX_JSON_DEPTH):
        # parsed, but storing or re-encoding it (the JSON columns, the API) would recurse as deep again
        raise InputError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                         hint="send a flatter JSON object")
    return value


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def facts_to_dict(msg: pb.NodeFacts) -> dict[str, Any]:
    """The §3.1 object a NodeFacts message carries (no validation; ``facts_from_proto`` validates)."""
    obj: dict[str, Any] = {}
    extra = _json_object(msg.extra_json, "facts extra_json", limit=MAX_FACTS_BYTES)
    obj.update(extra)  # unknown fields: kept in extra, ignored by the contract
    obj["hostname"] = msg.hostname
    obj["os"] = None if not msg.HasField("os") else {
        "id": msg.os.id, "version_id": msg.os.version_id, "arch": msg.os.arch, "kernel": msg.os.kernel,
        **{key: _optional(msg.os, key) for key in ("glibc", "family", "msvc", "l4t", "jetpack")}}
    obj["driver"] = None if not msg.HasField("driver") else {
        "version": msg.driver.version, "cuda_max": msg.driver.cuda_max}
    obj["gpus"] = [{"index": g.index, "name": g.name, "compute_capability": g.compute_capability,
                    "memory_mib": g.memory_mib, "uuid": g.uuid, "vendor": _optional(g, "vendor"),
                    "arch": _optional(g, "arch")} for g in msg.gpus]
    obj["toolkit"] = None if not msg.HasField("toolkit") else {"nvcc": msg.toolkit.nvcc, "path": msg.toolkit.path}
    obj["python"] = None if not msg.HasField("python") else {
        "version": msg.python.version, "executable": msg.python.executable,
        **{key: _optional(msg.python, key) for key in ("abi", "env_path", "env_fs")}}
    obj["torch"] = None if not msg.HasField("torch") else {
        "version": msg.torch.version, "cuda": msg.torch.cuda if msg.torch.HasField("cuda") else None,
        "cxx11abi": msg.torch.cxx11abi, "arch_list": list(msg.torch.arch_list), "hip": _optional(msg.torch, "hip")}
    obj["flash_attn"] = None if not msg.HasField("flash_attn") else {
        "version": msg.flash_attn.version, "variant": msg.flash_attn.variant,
        "beside": [{"version": b.version, "variant": b.variant} for b in msg.flash_attn.beside]}
    obj["resources"] = None if not msg.HasField("resources") else {
        "cpu_cores": msg.resources.cpu_cores, "memory_mib": msg.resources.memory_mib}
    obj["apt"] = None if not msg.HasField("apt") else {"errors": list(msg.apt.errors)}
    obj["rocm"] = None if not msg.HasField("rocm") else {"version": msg.rocm.version, "smi": msg.rocm.smi}
    return obj


def _optional(msg: Any, key: str) -> str | None:
    """An ``optional string`` field: None when the agent left it unset (older agents never set the additions)."""
    return getattr(msg, key) if msg.HasField(key) else None


def facts_from_proto(msg: pb.NodeFacts) -> tuple[NodeFacts, bool]:
    """Validated facts and the ``simulated`` flag; ``FactsError``/``InputError`` on bad input."""
    size = msg.ByteSize()
    if size > MAX_FACTS_BYTES:
        raise FactsError(f"facts are {size} bytes, more than the limit of {MAX_FACTS_BYTES}",
                         node=msg.hostname[:253] or None, hint="trim apt errors or extra diagnostics")
    return parse_node(facts_to_dict(msg)), msg.simulated


MAX_AGENT_VERSION_CHARS = 64


def agent_version_from_proto(msg: pb.ReportFactsRequest) -> str | None:
    """The reporting agent's version; None from an agent older than the field (it sends nothing)."""
    version = msg.agent_version
    if len(version) > MAX_AGENT_VERSION_CHARS or not version.isprintable():
        raise InputError(f"agent version {version[:MAX_AGENT_VERSION_CHARS]!r}… is not a version string",
                         hint=f"report at most {MAX_AGENT_VERSION_CHARS} printable characters, e.g. 0.1.0")
    return version or None


def enroll_response(result: EnrollResult) -> pb.EnrollResponse:
    return pb.EnrollResponse(agent_id=result.agent_id, certificate_pem=result.certificate_pem,
                             ca_pem=result.ca_pem, hostname=result.hostname, pending_secret=result.pending_secret)


def renew_response(issued: IssuedCert, ca_pem: bytes) -> pb.RenewCertificateResponse:
    return pb.RenewCertificateResponse(certificate_pem=issued.pem, ca_pem=ca_pem)


def job_to_proto(spec: JobSpec) -> pb.Job:
    return pb.Job(job_id=spec.job_id, kind=spec.kind, vars_json=json.dumps(dict(spec.vars)),
                  timeout_seconds=round(spec.timeout_s))


def held_jobs_from_proto(msg: pb.JobsRequest) -> frozenset[str] | None:
    """The job ids the agent process still holds; None when the agent does not say (older agents)."""
    if not msg.reports_held_jobs:
        return None
    return frozenset(msg.held_job_ids)


_EARLIEST_AGENT_TIME = 946_684_800.0  # 2000-01-01: no agent event predates the project


def _agent_time(unix: float) -> dt.datetime:
    """When the agent says something happened — its own clock, kept only when plausible: unset, NaN, before 2000
    or more than a day ahead (a wrong clock, or a hostile value out of datetime's range) become the controller's
    now, so the event is kept rather than refused."""
    now = dt.datetime.now(dt.UTC)
    if not (_EARLIEST_AGENT_TIME < unix < now.timestamp() + 86_400):  # NaN fails every comparison
        return now
    return dt.datetime.fromtimestamp(unix, dt.UTC)


def event_from_proto(msg: pb.JobEvent) -> JobEventRecord:
    if not msg.job_id or not msg.event:
        raise InputError("job event without job_id or event name", hint="agents send both")
    return JobEventRecord(job_id=msg.job_id, counter=msg.counter, event=msg.event,
                          data=_json_object(msg.data_json, "job event data_json"),
                          created=_agent_time(msg.created_unix))


def outcome_from_proto(msg: pb.JobResult) -> JobOutcome:
    if not msg.job_id:
        raise InputError("job result without job_id", hint="agents send the job id")
    if msg.status not in FINISHED:
        raise InputError(f"job status {msg.status!r} is not a final status",
                         hint=f"use one of {', '.join(sorted(FINISHED))}")
    result = _json_object(msg.result_json, "job result_json", limit=MAX_FACTS_BYTES)
    return JobOutcome(job_id=msg.job_id, status=JobStatus(msg.status), rc=msg.rc, result=result,
                      error=msg.error or None)


def heartbeat_response(interval: float, facts_requested: bool) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(interval_seconds=max(1, round(interval)), facts_requested=facts_requested)
