"""Fuzzer over the controller's inputs: every gRPC method of fleet.v1.AgentService and every HTTP API route.

A real controller (SQLite, its own event loop in a background thread) with one enrolled agent; hypothesis
generates messages from the protobuf descriptors (every field, nested ones to a bounded depth: extreme and
negative integers, out-of-range timestamps, huge, unicode, control-character and NUL strings, deep and
huge JSON in the ``*_json`` fields, many repeated entries) and sends them over the agent's real mTLS
channel (Enroll over the enrollment port), and it sends HTTP requests to every route of the API with
fuzzed path parameters, query strings and JSON bodies, with and without the admin token.

A failure is: a gRPC ``INTERNAL``/``UNKNOWN`` status, an HTTP 5xx, a log record with a traceback at ERROR
or above, or a log line (as ``fleet.text.SafeLogFormatter`` writes it in production) over 4 KB. A clear
refusal (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``UNAUTHENTICATED``, 4xx ...) is the expected answer.

On demand (≥ 10,000 inputs; figures go to docs/reliability.md by hand)::

    .venv/bin/python benchmarks/fuzz_inputs.py --inputs 10000

CI runs a few hundred through tests/integration/fleet/test_fuzz_inputs.py (``FLEET_FUZZ_INPUTS`` raises it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import platform
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
import httpx  # noqa: E402

# descriptors are typed Any below: protobuf's stubs tell its Python and upb descriptor classes apart
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402
from google.protobuf.message import Message  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fleetctl.fleet.text import SafeLogFormatter  # noqa: E402
from fleetctl.fleet.v1 import fleet_pb2 as pb  # noqa: E402

T = TypeVar("T")
MAX_LOG_LINE = 4096
CLIENT_LOGGERS = ("httpx", "httpcore", "hypothesis")
BAD_GRPC = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
RPCS = ("Enroll", "ReportFacts", "Heartbeat", "Jobs", "ReportJobEvents", "CompleteJob", "FetchArtifact",
        "UploadArtifact", "QueryUpload")
# routes that stream until the client leaves (dashboard event streams): probed with a short read timeout
STREAMING_HINTS = ("events", "stream", "watch")

# ---- value strategies ------------------------------------------------------------------------------------

INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63), 253402300800, -62135596801,
             10**12, 10**15]
UINT_EDGES = [0, 1, 2**32 - 1, 2**63, 2**64 - 1]
FLOAT_EDGES = [0.0, -0.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 5e-324, 1e19]
NASTY_TEXT = ["", " ", "\n", "\x00", "\x1b[31mred\x1b[0m", "a\nb\r\nc", "{{ lookup('pipe', 'id') }}",
              "../../../etc/passwd", "/", "%00", "\u202e", "\ud7ff", "é" * 3, "9999-12-31T23:59:59",
              "0000-00-00T00:00:00", "-1", "NaN", "1e999999", "null", "true", "[]", "{}"]


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def json_text() -> st.SearchStrategy[str]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
    docs = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                        max_leaves=12)
    return st.one_of(
        docs.map(json.dumps),
        st.integers(min_value=10, max_value=200_000).map(deep_json),
        st.integers(min_value=10, max_value=100_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
        st.sampled_from(['{"started_at": 1e300}', '{"at": "99999-01-01T00:00:00"}', '{"ts": -1e20}',
                         '{"x": NaN}', '{"x": Infinity}', "[1e999999]", '"' + "x" * 70_000 + '"']),
        st.text(max_size=80),
    )


def text_value(name: str) -> st.SearchStrategy[str]:
    base = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=60),
                     st.integers(min_value=200, max_value=300_000).map(lambda n: "A" * n),
                     st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=40))
    return st.one_of(json_text(), base) if name.endswith("_json") else base


def bytes_value() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), st.integers(min_value=0, max_value=300_000).map(lambda n: b"\0" * n),
                     st.sampled_from([b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                      b"\xff" * 64]))


def scalar(f: Any) -> st.SearchStrategy[Any]:
    t = f.type
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT_EDGES), st.integers(min_value=-(2**63), max_value=2**63 - 1))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(min_value=-(2**31), max_value=2**31 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from(UINT_EDGES) | st.integers(min_value=0, max_value=2**64 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(min_value=0, max_value=2**32 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from(FLOAT_EDGES) | st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return text_value(f.name)
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes_value()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values] + [999, -1])
    raise AssertionError(f"unhandled field type {t}")


def message(desc: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message of ``desc``: any subset of its fields set, nested to depth 3."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                key, val = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                if val.type == FieldDescriptor.TYPE_MESSAGE:
                    continue
                parts[f.name] = st.dictionaries(scalar(key), scalar(val), max_size=5)
                continue
            if depth >= 3:
                continue
            inner = message(f.message_type, depth + 1)
            is_repeated = _repeated(f)
            parts[f.name] = st.lists(inner, max_size=4) if is_repeated else inner
        elif _repeated(f):
            parts[f.name] = st.one_of(st.lists(scalar(f), max_size=5),
                                      st.integers(min_value=100, max_value=5000).map(_many(_default(f))))
        else:
            parts[f.name] = scalar(f)
    names = sorted(parts)
    return st.sets(st.sampled_from(names) if names else st.nothing(), max_size=len(names)).flatmap(
        lambda chosen: st.fixed_dictionaries({n: parts[n] for n in sorted(chosen)}))


def _many(item: Any) -> Any:
    return lambda n: [item] * n


def _repeated(f: Any) -> bool:
    return bool(f.is_repeated)


def _default(f: Any) -> Any:
    return {FieldDescriptor.TYPE_STRING: "x", FieldDescriptor.TYPE_BYTES: b"x",
            FieldDescriptor.TYPE_BOOL: True}.get(f.type, 1)


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    """A message of ``cls`` with ``values`` (out-of-range values the Python runtime refuses are clamped: the
    wire can carry them, and a raw-bytes case sends those)."""
    msg = cls()
    _fill(msg, values)
    return msg


def _fill(msg: Message, values: dict[str, Any]) -> None:
    desc: Any = msg.DESCRIPTOR
    for name, value in values.items():
        f = desc.fields_by_name[name]
        target = getattr(msg, name)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    with contextlib.suppress(TypeError, ValueError):
                        target[k] = v
            elif _repeated(f):
                for item in value:
                    _fill(target.add(), item)
            else:
                _fill(target, value)
                if not value:
                    target.SetInParent()
        elif _repeated(f):
            for v in value:
                with contextlib.suppress(TypeError, ValueError):
                    target.append(v)
        else:
            with contextlib.suppress(TypeError, ValueError):
                setattr(msg, name, value)


# ---- the controller under test ----------------------------------------------------------------------------


@dataclass
class Findings:
    inputs: int = 0
    grpc_inputs: int = 0
    http_inputs: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    longest_log_line: int = 0

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


class LogWatch(logging.Handler):
    """Every record formatted as production formats it: too-long lines and tracebacks are findings."""

    def __init__(self, findings: Findings) -> None:
        super().__init__(level=logging.DEBUG)
        self.findings = findings
        self.fmt = SafeLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in CLIENT_LOGGERS:  # the fuzzer's own side
            return
        line = self.fmt.format(record)
        first = line.split("\n", 1)[0]
        self.findings.longest_log_line = max(self.findings.longest_log_line, len(first.encode()))
        if len(first.encode()) > MAX_LOG_LINE:
            self.findings.failures.append(f"log line of {len(first.encode())} bytes: {first[:200]!r}")
        if record.exc_info and record.levelno >= logging.ERROR:
            self.findings.failures.append(f"traceback logged: {first[:300]!r}\n{line[-1500:]}")


class Target:
    """A real controller on its own loop in a background thread, one enrolled agent, an HTTP client."""

    def __init__(self, state_dir: Path, findings: Findings) -> None:
        self.findings = findings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-controller", daemon=True)
        self.thread.start()
        self.watch = LogWatch(findings)
        logging.getLogger().addHandler(self.watch)
        logging.getLogger().setLevel(logging.INFO)
        self.rc: Any = None
        self.run(self._start(state_dir))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, state_dir: Path) -> None:
        from fleetctl.agent.wire import facts_to_proto
        from fleetctl.controller.app import start_controller
        from fleetctl.controller.ratelimit import Rate
        from tests.integration.fleet_support import controller_settings, enroll_creds, profile_facts

        lots = Rate(burst=1e9, per_second=1e9)  # the fuzzer is one source: it must reach Enroll's checks
        self.rc = await start_controller(controller_settings(state_dir, enroll_per_source=lots, enroll_overall=lots))
        self.creds = await enroll_creds(self.rc, "fuzz-node")
        self.channel = grpc.aio.secure_channel(
            self.rc.ctx.grpc_address, grpc.ssl_channel_credentials(
                root_certificates=self.creds.ca_pem, private_key=self.creds.key_pem,
                certificate_chain=self.creds.cert_pem), options=_options())
        self.enroll_channel = grpc.aio.secure_channel(
            self.rc.ctx.enroll_address, grpc.ssl_channel_credentials(root_certificates=self.creds.ca_pem),
            options=_options())
        from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc

        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self.enroll_stub = pb_grpc.AgentServiceStub(self.enroll_channel)
        await self.stub.ReportFacts(pb.ReportFactsRequest(facts=facts_to_proto(profile_facts("a100", "fuzz-node"))),
                                    timeout=10)
        self.http = httpx.Client(base_url=self.rc.ctx.http_url, timeout=10)
        self.token = self.rc.ctx.admin_token

    def close(self) -> None:
        async def stop() -> None:
            await self.channel.close(None)
            await self.enroll_channel.close(None)
            await self.rc.stop(grace=0.1)

        self.http.close()
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        logging.getLogger().removeHandler(self.watch)

    # ---- gRPC ----

    def grpc_call(self, rpc: str, values: list[dict[str, Any]]) -> None:
        self.findings.inputs += 1
        self.findings.grpc_inputs += 1
        try:
            code = self.run(self._grpc(rpc, values), timeout=60)
        except TimeoutError:
            self.findings.failures.append(f"{rpc}: no answer within 60 s")
            return
        self.findings.count(f"grpc {code.name}")
        if code in BAD_GRPC:
            self.findings.failures.append(f"{rpc}: {code.name}: {self._details[:500]} (input {str(values)[:300]})")

    _details = ""

    async def _grpc(self, rpc: str, values: list[dict[str, Any]]) -> grpc.StatusCode:
        in_cls, stub = _REQUEST[rpc], (self.enroll_stub if rpc == "Enroll" else self.stub)
        msgs = [build(in_cls, v) for v in values]
        method = getattr(stub, rpc)
        try:
            if rpc in ("ReportJobEvents", "UploadArtifact"):
                await method(iter(msgs), timeout=10)
            elif rpc in ("Jobs", "FetchArtifact"):
                call = method(msgs[0], timeout=1.0 if rpc == "Jobs" else 10)
                n = 0
                async for _ in call:
                    n += 1
                    if n > 64:
                        call.cancel()
                        break
            else:
                await method(msgs[0], timeout=10)
        except grpc.aio.AioRpcError as exc:
            self._details = exc.details() or ""
            return exc.code()
        return grpc.StatusCode.OK

    # ---- HTTP ----

    def http_call(self, method: str, path: str, params: dict[str, str], body: Any, authed: bool,
                  raw: bytes | None) -> None:
        self.findings.inputs += 1
        self.findings.http_inputs += 1
        headers = {"Authorization": f"Bearer {self.token}"} if authed else {}
        streaming = any(h in path for h in STREAMING_HINTS)
        try:
            if raw is not None:
                headers["Content-Type"] = "application/json"
                r = self.http.request(method, path, params=params, content=raw, headers=headers,
                                      timeout=2 if streaming else 20)
            else:
                r = self.http.request(method, path, params=params, json=body, headers=headers,
                                      timeout=2 if streaming else 20)
        except httpx.ReadTimeout:
            if not streaming:
                self.findings.failures.append(f"{method} {path}: no answer within 20 s")
            self.findings.count("http timeout (stream)")
            return
        except httpx.InvalidURL:
            self.findings.count("http client refused the URL")
            return
        except httpx.HTTPError as exc:
            self.findings.failures.append(f"{method} {path}: {exc.__class__.__name__}: {exc}")
            return
        self.findings.count(f"http {r.status_code}")
        if r.status_code >= 500 and not (r.status_code == 503 and path.endswith(("/health", "/ready"))):
            self.findings.failures.append(f"{method} {path} params={str(params)[:200]} body={str(body)[:200]}: "
                                          f"{r.status_code} {r.text[:300]}")

    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every API route, from the app's own schema (FastAPI's included routers
        are not plain ``APIRoute``s in ``app.routes``), plus the schema route itself."""
        schema = self.rc.app.openapi()
        out = {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops
               if m.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE")}
        out.add(("GET", "/api/v1/openapi.json"))
        return sorted(out)


def _options() -> list[tuple[str, Any]]:
    from fleetctl.agent.client import channel_options

    return list(channel_options())


_REQUEST: dict[str, type[Message]] = {}


def _load_requests() -> None:
    service = pb.DESCRIPTOR.services_by_name["AgentService"]
    for m in service.methods:
        _REQUEST[m.name] = getattr(pb, m.input_type.name)


_load_requests()

# ---- hypothesis drivers --------------------------------------------------------------------------------------


def grpc_inputs() -> st.SearchStrategy[tuple[str, list[dict[str, Any]]]]:
    def for_rpc(rpc: str) -> st.SearchStrategy[tuple[str, list[dict[str, Any]]]]:
        desc = _REQUEST[rpc].DESCRIPTOR
        many = rpc in ("ReportJobEvents", "UploadArtifact")
        return st.tuples(st.just(rpc), st.lists(message(desc), min_size=1, max_size=4 if many else 1))

    return st.sampled_from(RPCS).flatmap(for_rpc)


PATH_PARAM = st.one_of(st.sampled_from(["fuzz-node", "x", "0", "-1", "9" * 40, "%2e%2e", "..", "a" * 5000,
                                        "\x1b", "r-20260101-000000-abcd", "sha256:" + "0" * 64]),
                       st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s and "?" not in s
                                                                and "#" not in s))


def json_body() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                     st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(NASTY_TEXT),
                     st.text(max_size=30))
    return st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), kids, max_size=5)),
                        max_leaves=20)


def fields_body(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), json_body(), max_size=len(keys))


RAW_BODIES = [deep_json(100_000).encode(), b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"\xff\xfe",
              b"{", b'{"ttl_seconds": 1e999}', b'{"ttl_seconds": 99999999999999999999999999}',
              b'"' + b"x" * 2_000_000 + b'"', b"[" + b"1," * 200_000 + b"1]", b"null", b"\x00"]
BODY_KEYS = ["actor", "nodes", "version", "hostname", "ttl_seconds", "retry_failed", "max_failures", "batch",
             "canary", "step_timeouts", "policy", "options", "cron", "name", "workload", "at", "since", "until",
             "limit", "kind", "filename", "sha256", "state", "status", "reason", "prefer", "fa4", "fa3"]


def run_fuzz(target: Target, inputs: int, seed: int | None = None) -> Findings:
    """``inputs`` examples, split between gRPC methods (60 %) and HTTP routes (40 %)."""
    routes = target.routes()
    n_grpc = max(1, inputs * 6 // 10)
    n_http = max(1, inputs - n_grpc)
    # no shrinking: a failure is reported with its input as found; derandomized unless a seed is given, so the
    # CI subset is the same inputs every run
    common: dict[str, Any] = {"deadline": None, "database": None, "derandomize": seed is None,
                              "suppress_health_check": list(HealthCheck),
                              "phases": [Phase.explicit, Phase.generate], "report_multiple_bugs": False}

    @settings(max_examples=n_grpc, **common)
    @given(grpc_inputs())
    def fuzz_grpc(case: tuple[str, list[dict[str, Any]]]) -> None:
        target.grpc_call(*case)

    @settings(max_examples=n_http, **common)
    @given(st.sampled_from(routes), st.data())
    def fuzz_http(route: tuple[str, str], data: st.DataObject) -> None:
        method, path = route
        for name in [p.split("}")[0].split(":")[0] for p in path.split("{")[1:]]:
            value = data.draw(PATH_PARAM)
            value = urllib.parse.quote(value, safe="")
            path = path.replace(f"{{{name}}}", value).replace(f"{{{name}:path}}", value)
        if not path.startswith("/api"):
            path = "/api/v1" + path
        params = data.draw(st.dictionaries(st.sampled_from(["limit", "offset", "since", "until", "state", "status",
                                                            "node", "hostname", "kind", "version", "q", "n",
                                                            "workload", "verbose", "json"]),
                                           st.one_of(st.sampled_from(["-1", "0", "1e9", "99999999999999999999",
                                                                      "true", "", "\x00", "a" * 3000]),
                                                     st.text(max_size=20)), max_size=3))
        authed = data.draw(st.integers(0, 9)) > 0  # mostly past the auth check, sometimes not
        raw = data.draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(RAW_BODIES)))
        body = None if method in ("GET", "DELETE") else data.draw(st.one_of(fields_body(BODY_KEYS), json_body()))
        target.http_call(method, path, params, body, authed, raw if method not in ("GET",) else None)

    if seed is not None:
        fuzz_grpc = hypothesis_seed(seed)(fuzz_grpc)
        fuzz_http = hypothesis_seed(seed + 1)(fuzz_http)
    fuzz_grpc()
    fuzz_http()
    return target.findings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=None, help="random run (default: hypothesis's derandomized run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    findings = Findings()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        target = Target(Path(tmp) / "controller", findings)
        try:
            run_fuzz(target, args.inputs, args.seed)
        finally:
            target.close()
    took = time.monotonic() - started
    print(f"inputs {findings.inputs} (gRPC {findings.grpc_inputs}, HTTP {findings.http_inputs}), "
          f"failures {len(findings.failures)}, longest log line {findings.longest_log_line} B, {took:.0f} s, "
          f"{platform.node()} {platform.processor() or platform.machine()} {dt.date.today().isoformat()}")
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(findings.statuses.items())))
    for f in findings.failures[:50]:
        print("FAIL", f)
    return 1 if findings.failures else 0


if __name__ == "__main__":
    sys.exit(main())
