"""Run the verification benchmark in the node's target Python and return a typed result.

``bench.py`` runs as a subprocess of the *target* interpreter (the one with torch and
flash_attn), in its own session so that on timeout the whole process group — the
bench supervisor and its GPU worker — is killed: SIGTERM first (the supervisor then
writes what it has measured so far), SIGKILL after a grace period.  Whatever
happens, ``run_verification`` returns a ``VerificationResult``: a timeout, a crash or
unreadable output become results with status ``timeout``/``error`` and a reason, so
the agent always has something to report.  The verdict is the judge's
(``fleet.verification.judge``, re-derived from the entries), never bench.py's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.verification import (
    EXPECTS,
    STATUS_ERROR,
    STATUS_TIMEOUT,
    VerificationResult,
    VerificationSchemaError,
    failure_result,
    judge,
    parse_result,
)

BENCH_PATH = Path(__file__).with_name("bench.py")
DEFAULT_TIMEOUT_S = {"quick": 150.0, "full": 1080.0}  # bench gets 85 %: its own full default is 900 s
KILL_GRACE_S = 8.0
STDERR_TAIL = 8000


@dataclass(frozen=True)
class VerifyRequest:
    python: str  # the node's target interpreter
    mode: str = "quick"
    model_path: str | None = None
    device: str = "cuda:0"
    expect: str = "flash_attn"  # fa3 / fa4 for nodes planned those; "sdpa" for nodes planned without FlashAttention
    timeout_s: float | None = None  # outside timeout; default per mode
    timeout_per_shape_s: float | None = None
    bench_path: Path = BENCH_PATH
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    workdir: Path | None = None  # where the result file goes (default: a temporary directory)
    skip_e2e: bool = False
    inject: tuple[str, ...] = field(default=())  # bench.py fault injection (tests, demos)
    kill_grace_s: float = KILL_GRACE_S  # SIGTERM → SIGKILL delay on timeout

    def __post_init__(self) -> None:
        if self.mode not in DEFAULT_TIMEOUT_S:
            raise UsageError(f"unknown verification mode {self.mode!r}", hint="use quick or full")
        if self.expect not in EXPECTS:
            raise UsageError(f"unknown expectation {self.expect!r}", hint="use one of " + ", ".join(sorted(EXPECTS)))
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UsageError("the verification timeout must be positive")

    @property
    def total_timeout(self) -> float:
        return float(self.timeout_s if self.timeout_s is not None else DEFAULT_TIMEOUT_S[self.mode])

    def command(self, out: Path) -> list[str]:
        total = self.total_timeout
        # leave the bench time to notice its own deadline and write a partial result
        inner = max(1.0, total - min(20.0, total * 0.15))
        cmd = [self.python, str(self.bench_path), "--mode", self.mode, "--out", str(out), "--device", self.device,
               "--expect", self.expect, "--timeout", f"{inner:g}"]
        if self.timeout_per_shape_s is not None:
            cmd += ["--timeout-per-shape", f"{self.timeout_per_shape_s:g}"]
        if self.model_path:
            cmd += ["--model", self.model_path]
        if self.skip_e2e:
            cmd.append("--skip-e2e")
        for spec in self.inject:
            cmd += ["--inject", spec]
        return [*cmd, *self.extra_args]


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - STDERR_TAIL))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group, then SIGKILL it after the grace period."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # children may outlive the leader: always sweep the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _read_result(out: Path) -> tuple[VerificationResult | None, str | None]:
    """(result, problem): the parsed result file, or why there is none."""
    try:
        text = out.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "the benchmark wrote no result file"
    except OSError as exc:
        return None, f"could not read the result file: {exc}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"the result file is not JSON: {exc}"
    try:
        return parse_result(obj), None
    except VerificationSchemaError as exc:
        return None, f"the result file is not a valid verification result: {exc}"


def run_verification(req: VerifyRequest) -> VerificationResult:
    """Run bench.py under ``req.python``; always returns a result (never raises for bench failures)."""
    started = datetime.now(UTC)
    host = socket.gethostname()
    with contextlib.ExitStack() as stack:
        workdir = req.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-verify-")))
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / f"verify-{req.mode}-{os.getpid()}-{time.monotonic_ns()}.json"
        err_path = workdir / (out.stem + ".stderr")
        env = dict(os.environ if req.env is None else req.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(req.command(out), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                        env=env, cwd=str(workdir), start_new_session=True)
            except OSError as exc:
                return failure_result(STATUS_ERROR, f"could not start the target python {req.python!r}: {exc}",
                                      mode=req.mode, started_at=started, finished_at=datetime.now(UTC),
                                      expect=req.expect, hostname=host)
            timed_out = False
            try:
                proc.wait(timeout=req.total_timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc, req.kill_grace_s)
            finally:
                if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing behind
                    _kill_group(proc, req.kill_grace_s)
        finished = datetime.now(UTC)
        tail = _tail(err_path)
        result, problem = _read_result(out)
        if timed_out:
            reason = (f"verification did not finish within {req.total_timeout:g} s; its process group was killed "
                      "(GPU contexts are released with the processes)")
            return failure_result(STATUS_TIMEOUT, reason, mode=req.mode, started_at=started, finished_at=finished,
                                  expect=req.expect, hostname=host, log_tail=tail, partial=result)
        if result is None:
            rc = proc.returncode
            how = f"signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
            return failure_result(STATUS_ERROR, f"{problem} (bench {how})", mode=req.mode, started_at=started,
                                  finished_at=finished, expect=req.expect, hostname=host, log_tail=tail)
        # bench.py's own status (it runs on the node's Python, without fleet's code) is replaced by the one
        # verdict: fleet.verification.judge re-derives it from the entries
        return result.with_verdict(judge(result))

