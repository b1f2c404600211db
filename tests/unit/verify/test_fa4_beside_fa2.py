"""FA4 installed beside FA2, as the real H200 had it (tests/fixtures/h200_attention_fa2: ``flash-attn`` 2.8.3 and
``flash-attn-4`` 4.0.0b36 in one venv, ``import flash_attn`` FA2's and ``flash_attn.cute`` FA4's), in the facts
(``flash_attn.beside``), the simulated executor and the simulated verifier, which judges by ``expect`` as
bench.py does: FA4 expected → FA4 verified, FA2 beside it measured but not what passes or fails the node."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.profiles import load_profile
from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.agent.verify import bench
from fleetctl.agent.verify.simulated import SimFaults, simulate_for_facts
from fleetctl.fleet.errors import FactsError, InputError
from fleetctl.fleet.facts import FlashAttnFacts, installed_together, parse_node, with_installed
from fleetctl.fleet.jobs import JobOutcome, JobSpec
from fleetctl.fleet.verification import FLASH_IMPLS, verified_among

FA2 = FlashAttnFacts("2.8.3", "fa2")
FA4 = FlashAttnFacts("4.0.0b36", "fa4")


# --- facts ------------------------------------------------------------------------------------------------


def test_an_install_replaces_its_own_distribution_and_leaves_the_others() -> None:
    both = with_installed(FA2, FA4)
    assert both == FlashAttnFacts("2.8.3", "fa2", beside=(FA4,)) and both.installed == (FA2, FA4)
    assert with_installed(FA4, FA2) == both  # FA2 is the node's flash_attn whichever came first
    upgraded = with_installed(both, FlashAttnFacts("2.8.4", "fa2"))
    assert upgraded == FlashAttnFacts("2.8.4", "fa2", beside=(FA4,))
    assert with_installed(FlashAttnFacts("1.0.9", "fa1"), FA2) == FA2  # FA1 and FA2: one distribution, flash-attn
    assert with_installed(None, FA4) == FA4 and installed_together([]) is None
    three = installed_together([FA4, FlashAttnFacts("3.0.0b1", "fa3"), FA2])
    assert three is not None and [f.variant for f in three.installed] == ["fa2", "fa3", "fa4"]


def test_beside_is_an_optional_addition_of_the_facts_json() -> None:
    node = load_profile("h100-cu130", "n1").to_json()
    node["flash_attn"] = {"version": "2.8.3", "variant": "fa2"}
    assert parse_node(node).flash_attn == FA2 and parse_node(node).to_json()["flash_attn"] == node["flash_attn"]
    node["flash_attn"]["beside"] = [{"version": "4.0.0b36", "variant": "fa4"}]
    facts = parse_node(node)
    assert facts.flash_attn == with_installed(FA2, FA4) and facts.to_json()["flash_attn"] == node["flash_attn"]
    node["flash_attn"]["beside"] = [{"version": "four", "variant": "fa4"}]
    with pytest.raises(FactsError, match=r"flash_attn\.beside\[0\]\.version"):
        parse_node(node)


# --- the simulated verifier -----------------------------------------------------------------------------


def _facts(**faults: Any) -> Any:
    facts = load_profile("h100-cu130", "n1")
    extra = {**facts.extra, **({"verify_faults": faults} if faults else {})}
    return replace(facts, flash_attn=with_installed(FA2, FA4), extra=extra)


def _found(result: Any) -> dict[str, bool]:
    return {f.impl: f.import_ok for f in result.flash_attn_implementations}


def test_fa4_expected_beside_fa2_is_what_is_verified_and_fa2_is_measured_too() -> None:
    r = simulate_for_facts(_facts(), mode="quick", expect="fa4")
    assert r.passed and r.verified_impl == "fa4" and r.flash_attn.describe().startswith("fa4 4.0.0b36")
    assert _found(r) == {"flash_attn": True, "fa4": True}
    assert {e.impl for e in r.ok_speed()} >= {"flash_attn", "fa4"}
    # without an expect (a job from before the engine sent one) bench.py verifies FA2: the gap that was
    assert simulate_for_facts(_facts(), mode="quick").verified_impl == "flash_attn"


def test_a_broken_fa4_fails_an_fa4_verification_although_fa2_works() -> None:
    facts = _facts(import_error=True, import_error_of="fa4")
    r = simulate_for_facts(facts, mode="quick", expect="fa4")
    assert r.status == "fail" and _found(r) == {"flash_attn": True, "fa4": False}
    assert r.reasons[0] == "fa4 (flash_attn.cute) import failed: ModuleNotFoundError: No module named 'cutlass'"
    # verifying FA2 on the same node passes, FA4's failure a warning
    fa2 = simulate_for_facts(facts, mode="quick", expect="flash_attn")
    assert fa2.passed and any("fa4 (flash_attn.cute) import failed" in w for w in fa2.warnings)
    # a fault without import_error_of hits every FlashAttention, as before
    assert _found(simulate_for_facts(_facts(import_error=True), mode="quick", expect="fa4")) == {
        "flash_attn": False, "fa4": False}


def test_import_error_of_names_a_flash_attention() -> None:
    assert SimFaults.parse("import_error,import_error_of=fa4").import_error_of == "fa4"
    with pytest.raises(InputError, match="import_error_of must be one of flash_attn, fa3, fa4"):
        SimFaults.from_mapping({"import_error": True, "import_error_of": "fa5"})


@pytest.mark.parametrize("expect", ["flash_attn", "fa3", "fa4", "sdpa"])
def test_the_verified_implementation_is_picked_as_bench_py_picks_it(expect: str) -> None:
    for n in range(len(FLASH_IMPLS) + 1):
        for present in itertools.combinations(FLASH_IMPLS, n):
            found = {i: bench.FlashLoaded({"present": i in present}) for i in FLASH_IMPLS}
            assert verified_among(expect, present) == bench.choose_verified(expect, found), present


# --- the simulated executor ----------------------------------------------------------------------------


async def _run(runner: SimulatedJobRunner, kind: str, variables: dict[str, Any]) -> JobOutcome:
    return await runner.run(JobSpec(f"job-{kind}", kind, variables), lambda event: None)


async def test_the_simulated_node_installs_fa4_beside_fa2_verifies_it_and_rolls_it_back(tmp_path: Path) -> None:
    facts = load_profile("h100-cu130", "n1")
    facts = replace(facts, flash_attn=FA2, extra={**facts.extra, "job_seconds": {"*": 0}})
    runner = SimulatedJobRunner(lambda: facts, tmp_path)
    install = {"flash_attn_version": "4.0.0b36", "variant": "fa4", "dist_name": "flash-attn-4"}
    assert (await _run(runner, "install-wheel", install)).ok
    assert runner.current_facts().flash_attn == with_installed(FA2, FA4)
    # a restarted agent finds both (its work dir's record)
    assert SimulatedJobRunner(lambda: facts, tmp_path).current_facts().flash_attn == with_installed(FA2, FA4)
    verified = (await _run(runner, "verify", {"expect": "fa4"})).result["verification"]
    assert verified["passed"] is True and verified["flash_attn"]["impl"] == "fa4"
    rolled = await _run(runner, "rollback", {"dist_name": "flash-attn-4"})
    # rollback.yml acts on flash-attn-4 only: it had none before, so it is removed; FA2 stays
    assert rolled.result["rollback"] == {"action": "removed", "restored_version": None}
    assert runner.current_facts().flash_attn == FA2
