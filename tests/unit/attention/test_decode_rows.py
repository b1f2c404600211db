"""The recommendation reading bench.py's GQA/decode rows and its e2e phases (issue 16): the real H100 result with
synthetic rows added (same GPU, torch and driver), so the node's own evidence is what is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleetctl.controller.attention import NodeContext, builtin_prior, evidence_from_result, profile, recommend
from fleetctl.fleet.verification import parse_result

FIX = Path(__file__).resolve().parents[2] / "fixtures"
H100 = "NVIDIA H100 80GB HBM3"
CTX = NodeContext("h100-1", H100, "2.11.0+cu130", "580.159.04")


def _decode(impl: str, gbps: float, paged: bool = False, err: float = 2e-3, cache: int = 16384) -> dict[str, Any]:
    return {"impl": impl, "dtype": "bfloat16", "headdim": 128, "batch": 8, "heads": 32, "heads_k": 8, "seqlen_q": 1,
            "cache_len": cache, "paged": paged, "page_size": 256 if paged else None, "status": "ok",
            "latency_us": 536870912 / gbps / 1e3, "kv_gb_per_s": gbps, "fwd_rel_err": err, "threshold_fwd": 2e-2}


def _gqa(impl: str, status: str = "ok") -> dict[str, Any]:
    return {"impl": impl, "dtype": "bfloat16", "headdim": 128, "seqlen": 4096, "batch": 4, "heads": 32,
            "heads_k": 1, "causal": True, "direction": "fwd", "status": status, "tflops": 300.0, "fwd_rel_err":
            0.5 if status == "fail" else 2e-3, "reason": "fwd relative error 0.5 > 0.02" if status == "fail" else None}


def _e2e(impl: str, decode: float) -> dict[str, Any]:
    return {"impl": impl, "status": "ok", "model": "qwen2-1.5b dimensions (random weights)", "random_weights": True,
            "batch": 8, "prompt_len": 4096, "new_tokens": 32, "dtype": "bfloat16", "tokens_per_s": decode,
            "decode_tokens_per_s": decode, "prefill_tokens_per_s": 90000.0, "ttft_ms": 400.0}


def _evidence(**rows: Any) -> Any:
    obj = json.loads((FIX / "h100" / "verify_full_fa2.json").read_text())
    obj.update(rows)
    return evidence_from_result(parse_result(obj), "node", origin="h100-1")


def test_decode_kernel_ranks_dense_rows_by_kv_bandwidth_and_ignores_paged_ones() -> None:
    ev = _evidence(decode=[_decode("flash_attn", 2900.0), _decode("flash_attn", 3900.0, paged=True),
                           _decode("sdpa_cudnn", 3100.0), _decode("sdpa_flash", 2000.0),
                           _decode("sdpa_cudnn", 2500.0, cache=4096)])
    rec = recommend(CTX, [ev], profile("decode-kernel"))
    assert rec.choice is not None and rec.choice.impl == "sdpa_cudnn" and rec.unit == "GB/s KV read"
    values = {c.impl: c.value for c in rec.ranked()}
    assert values == {"sdpa_cudnn": 3100.0, "fa2": 2900.0, "sdpa_flash": 2000.0}  # kv16384 only: shared by all


def test_a_wrong_decode_output_excludes_the_implementation_everywhere() -> None:
    ev = _evidence(decode=[_decode("flash_attn", 3900.0, err=0.3), _decode("sdpa_cudnn", 3100.0)])
    rec = recommend(CTX, [ev], profile("decode-kernel"))
    assert rec.choice is not None and rec.choice.impl == "sdpa_cudnn"
    prefill = recommend(CTX, [ev], profile("prefill"))
    fa2 = next(c for c in prefill.candidates if c.impl == "fa2")
    assert fa2.excluded is not None and "decode flash_attn dense kv16384" in fa2.excluded


def test_a_failed_gqa_row_excludes_it_like_a_failed_correctness_case() -> None:
    ev = _evidence(gqa=[_gqa("sdpa_cudnn", "fail"), _gqa("flash_attn")])
    rec = recommend(CTX, [ev], profile("prefill"))
    cudnn = next(c for c in rec.candidates if c.impl == "sdpa_cudnn")
    assert cudnn.excluded is not None and "gqa sdpa_cudnn h32/k1" in cudnn.excluded
    assert rec.choice is not None and rec.choice.impl != "sdpa_cudnn"


def test_decode_uses_the_nodes_own_e2e_phases_over_the_prior() -> None:
    ev = _evidence(e2e=[_e2e("eager", 700.0), _e2e("sdpa", 760.0), _e2e("flash_attention_2", 460.0)])
    rec = recommend(CTX, [ev, *builtin_prior()], profile("decode"))
    assert rec.choice is not None and rec.choice.impl == "sdpa"
    assert rec.choice.source is not None and rec.choice.source.kind == "node"
    assert {c.impl: c.value for c in rec.ranked()} == {"sdpa": 760.0, "eager": 700.0, "flash_attention_2": 460.0}


def test_without_decode_rows_the_kernel_workload_says_how_to_get_them() -> None:
    rec = recommend(CTX, [_evidence()], profile("decode-kernel"))
    assert rec.choice is None and "run `fleetctl verify h100-1`" in rec.notes[0]


def test_fa3_and_fa4_e2e_rows_are_named_with_their_settings() -> None:
    ev = _evidence(e2e=[_e2e("sdpa", 700.0), _e2e("flash_attention_4", 800.0), _e2e("flash_attention_3", 650.0)])
    rec = recommend(CTX, [ev], profile("decode"))
    assert rec.choice is not None and rec.choice.impl == "flash_attention_4"
    assert rec.choice.setting.transformers == "flash_attention_4"



def test_every_workload_has_one_profile_and_every_cli_offers_it() -> None:
    """One list of workloads (resolver/model.py): each has its measurement profile, and the three commands that
    take --workload accept each one (decode-kernel was missing from them)."""
    import argparse

    from fleetctl.controller import attention
    from fleetctl.controller.commands import attention as attention_cmd
    from fleetctl.controller.commands import plan as plan_cmd
    from fleetctl.controller.commands import rollout as rollout_cmd
    from fleetctl.controller.resolver.model import WORKLOADS

    assert set(attention.PROFILES) == set(WORKLOADS) and "decode-kernel" in WORKLOADS
    for register, argv in ((attention_cmd.register, ["attention", "report"]),
                           (rollout_cmd.register, ["rollout", "flash-attn"]),
                           (plan_cmd.register, ["plan", "--facts", "f.json"])):
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="cmd"))
        for w in WORKLOADS:
            assert parser.parse_args([*argv, "--workload", w]).workload == w
