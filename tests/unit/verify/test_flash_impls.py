"""bench.py's FlashAttention detection and per-implementation dispatch (FA2/FA1, FA3 ``flash_attn_interface``,
FA4 ``flash_attn.cute``), with stand-in packages on a fake sys.path (tests/unit/verify/fake_flash.py) and no
torch: each case runs bench's detection in a fresh interpreter so the stand-ins never meet another test's
imports.  With ``FLEET_TEST_TORCH_PYTHON`` (a python with CPU torch) the whole bench also runs on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.verify.runner import BENCH_PATH, VerifyRequest, run_verification
from fleetctl.fleet.verification import evaluate

from . import fake_flash

_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
found = bench.detect_flash()
out = {"found": {k: {f: v.info.get(f) for f in ("import_ok", "present", "impl", "implementation", "module", "dist",
                                               "version", "api", "error")} for k, v in found.items()}}
for expect in bench.EXPECTS:
    verified = bench.choose_verified(expect, found)
    out[expect] = {"verified": verified, "reported": list(bench.reported_impls(verified, found))}
out["calls"] = {k: repr(v.dense("q", "k", "v", causal=True)) for k, v in found.items() if v.ok}
print(json.dumps(out))
"""


def _detect(site: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(BENCH_PATH)], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_fa4_only_is_found_verified_and_called_through_flash_attn_cute(tmp_path: Path) -> None:
    doc = _detect(fake_flash.install(tmp_path, fa4=True))
    fa2, fa3, fa4 = doc["found"]["flash_attn"], doc["found"]["fa3"], doc["found"]["fa4"]
    # FA4's flash_attn is a namespace package without flash_attn_interface: FA2 is absent, not broken
    assert not fa2["import_ok"] and fa2["present"] is False
    assert "flash_attn.flash_attn_interface" in fa2["error"]
    assert not fa3["import_ok"] and fa3["present"] is False
    assert fa4 == {"import_ok": True, "present": True, "impl": "fa4", "implementation": "fa4",
                   "module": "flash_attn.cute", "dist": "flash-attn-4", "version": "4.0.0b36", "api": "fa4",
                   "error": None}
    assert doc["flash_attn"] == {"verified": "fa4", "reported": ["fa4"]}  # the generic expectation finds FA4
    assert doc["fa4"] == {"verified": "fa4", "reported": ["fa4"]}
    assert doc["fa3"] == {"verified": "fa3", "reported": ["fa3", "fa4"]}  # expected but missing: still reported
    assert doc["sdpa"] == {"verified": None, "reported": ["fa4"]}
    # FA4 returns (out, lse): the bench's entry point hands back out
    assert doc["calls"] == {"fa4": repr("fa4-out causal=True")}


def test_all_three_present_prefers_fa2_and_measures_each(tmp_path: Path) -> None:
    doc = _detect(fake_flash.install(tmp_path, fa2=True, fa3=True, fa4=True))
    assert [doc["found"][i]["implementation"] for i in ("flash_attn", "fa3", "fa4")] == ["fa2", "fa3", "fa4"]
    assert doc["found"]["fa3"]["dist"] == "flash-attn-3" and doc["found"]["fa3"]["version"] == "3.0.0b1"
    assert doc["flash_attn"] == {"verified": "flash_attn", "reported": ["flash_attn", "fa3", "fa4"]}
    assert doc["fa4"]["verified"] == "fa4" and doc["fa3"]["verified"] == "fa3"
    assert doc["calls"] == {"flash_attn": repr("fa2-out causal=True"), "fa3": repr("fa3-out causal=True"),
                            "fa4": repr("fa4-out causal=True")}


def test_nothing_installed_reports_flash_attn_missing_as_before(tmp_path: Path) -> None:
    doc = _detect(tmp_path)
    assert doc["flash_attn"] == {"verified": "flash_attn", "reported": ["flash_attn"]}
    assert doc["found"]["flash_attn"]["error"] == "ModuleNotFoundError: No module named 'flash_attn'"
    assert not any(doc["found"][i]["present"] for i in ("flash_attn", "fa3", "fa4"))


def test_broken_fa2_is_present_and_stays_the_verified_one(tmp_path: Path) -> None:
    """An FA2 that fails to import (undefined symbol after a torch upgrade) must fail the node, not be
    skipped in favour of an FA4 installed beside it."""
    doc = _detect(fake_flash.install(tmp_path, fa2_broken="undefined symbol: _ZN3c104cuda9SetDeviceEi", fa4=True))
    fa2 = doc["found"]["flash_attn"]
    assert fa2["present"] is True and not fa2["import_ok"] and "undefined symbol" in fa2["error"]
    assert doc["flash_attn"]["verified"] == "flash_attn"
    assert doc["found"]["fa4"]["present"] is True  # its dist is installed, even though flash_attn is broken


TORCH_PYTHON = os.environ.get("FLEET_TEST_TORCH_PYTHON")


@pytest.mark.skipif(not TORCH_PYTHON, reason="set FLEET_TEST_TORCH_PYTHON to a python with (CPU) torch")
def test_real_bench_on_cpu_with_fa4_only_passes_and_reports_fa4(tmp_path: Path) -> None:
    assert TORCH_PYTHON
    site = fake_flash.install(tmp_path / "site", fa4=True)
    result = run_verification(VerifyRequest(
        python=TORCH_PYTHON, mode="quick", device="cpu", timeout_s=240, workdir=tmp_path,
        extra_args=("--tokens", "256", "--seqlens", "128"), env={**os.environ, "PYTHONPATH": str(site)}))
    assert result.status == "pass", result.reasons
    assert result.verified_impl == "fa4" and result.flash_attn.module == "flash_attn.cute"
    assert {e.impl for e in result.correctness if e.status == "ok"} >= {"fa4", "sdpa_flash"}
    assert {(e.impl, e.direction) for e in result.speed if e.status == "ok"} >= {("fa4", "fwd"), ("fa4", "fwd_bwd")}
    assert not any(e.impl == "flash_attn" for e in result.speed)  # FA2 absent: no rows for it
    assert evaluate(result).passed


@pytest.mark.skipif(not TORCH_PYTHON, reason="set FLEET_TEST_TORCH_PYTHON to a python with (CPU) torch")
def test_real_bench_on_cpu_measures_every_implementation_present(tmp_path: Path) -> None:
    assert TORCH_PYTHON
    site = fake_flash.install(tmp_path / "site", fa2=True, fa3=True, fa4=True)
    result = run_verification(VerifyRequest(
        python=TORCH_PYTHON, mode="quick", device="cpu", timeout_s=240, workdir=tmp_path,
        extra_args=("--tokens", "256", "--seqlens", "128"), env={**os.environ, "PYTHONPATH": str(site)}))
    assert result.status == "pass", result.reasons
    assert result.verified_impl == "flash_attn" and result.flash_attn.label == "fa2"
    assert [f.label for f in result.implementations()] == ["fa2", "fa3", "fa4"]
    for impl in ("flash_attn", "fa3", "fa4"):
        assert any(e.impl == impl and e.status == "ok" for e in result.correctness), impl
        assert any(e.impl == impl and e.status == "ok" and e.direction == "fwd_bwd" for e in result.speed), impl
