"""Fuzzed gRPC and HTTP inputs against a real controller (benchmarks/fuzz_inputs.py): no INTERNAL/UNKNOWN
status, no HTTP 5xx, no traceback logged, no log line over 4 KB. A few hundred inputs here (same ones every
run); ``FLEET_FUZZ_INPUTS=10000`` or ``benchmarks/fuzz_inputs.py --inputs 10000`` for the on-demand run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.fuzz_inputs import Findings, Target, run_fuzz

pytestmark = pytest.mark.timeout(600)


def test_fuzzed_grpc_and_http_inputs_are_refused_cleanly(tmp_path: Path) -> None:
    findings = Findings()
    target = Target(tmp_path / "controller", findings)
    try:
        run_fuzz(target, int(os.environ.get("FLEET_FUZZ_INPUTS", "300")))
    finally:
        target.close()
    assert findings.grpc_inputs and findings.http_inputs
    assert not findings.failures, "\n".join(findings.failures[:10])
