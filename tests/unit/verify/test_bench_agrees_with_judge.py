"""bench.py keeps a verdict of its own (it runs on the node's Python, without fleet's code), and the agent's
runner replaces it with ``fleet.verification.judge``'s. The two rules must not drift apart: on every real
verification result the project has recorded (tests/fixtures h100*, h200*: bench.py's output on the H100 and
H200 runs, raw and as the controller stored it), bench's rule and the judge give the same status."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.verify import bench
from fleetctl.fleet.verification import STATUS_NO_GPU, STATUS_NO_TORCH, STATUS_TIMEOUT, judge, parse_result

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _results(obj: Any) -> Iterator[Mapping[str, Any]]:
    """Every verification result in a fixture: the file itself, or nested (a job's result.verification)."""
    if isinstance(obj, Mapping):
        if "schema_version" in obj and "correctness" in obj:
            yield obj
            return
        for value in obj.values():
            yield from _results(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _results(value)


def _real_results() -> list[Any]:
    cases = []
    for path in sorted(FIXTURES.glob("h[12]00*/**/*.json")):
        for i, result in enumerate(_results(json.loads(path.read_text()))):
            if not result.get("simulated"):
                cases.append(pytest.param(result, id=f"{path.relative_to(FIXTURES)}#{i}"))
    return cases


REAL_RESULTS = _real_results()


def _worker_meta(result: Mapping[str, Any]) -> dict[str, Any]:
    """What bench's worker had reported when bench judged this run, as far as the result shows it: the
    no-torch/no-GPU precondition, nothing at all (the worker died before its first line), or a normal run."""
    if result["status"] in (STATUS_NO_TORCH, STATUS_NO_GPU):
        return {"status": result["status"], "reason": result["reasons"][0]}
    ran_nothing = not any(result.get(k) for k in ("correctness", "speed", "gqa", "decode", "e2e"))
    if ran_nothing and result["flash_attn"].get("error") == "not checked":
        return {}
    return {"status": "done"}


def test_every_real_fixture_is_covered() -> None:
    # the H100 runs (fa2: quick, full, faults, no flash-attn; the end-to-end runs) and the H200 fa4 runs
    assert len(REAL_RESULTS) >= 20
    statuses = {param.values[0]["status"] for param in REAL_RESULTS}
    assert {"pass", "fail", "error"} <= statuses


@pytest.mark.parametrize("result", REAL_RESULTS)
def test_bench_rule_and_the_judge_agree(result: Mapping[str, Any]) -> None:
    bench_status, bench_reasons, _ = bench.verdict(dict(result), _worker_meta(result),
                                                  result["status"] == STATUS_TIMEOUT)
    verdict = judge(parse_result(result))
    assert bench_status == verdict.status, (bench_reasons, verdict.reasons)
    assert bool(bench_reasons) == bool(verdict.reasons)
