"""Render the real-H100 verification (tests/fixtures/h100/verify_full_fa2.json) as the Markdown tables of
docs/benchmarks.md, so the numbers there are never copied by hand.

    .venv/bin/python -m benchmarks.h100_table [RESULT.json]

Prints: FA2 vs each SDPA backend (TFLOP/s and peak MiB) for every speed shape, per-implementation
medians, the largest correctness errors per implementation and dtype, the end-to-end rows and the run's
duration. Reads the result through ``fleet.verification.parse_result`` (the schema the controller stores).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from fleetctl.fleet.verification import SpeedEntry, VerificationResult, evaluate, parse_result

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "h100" / "verify_full_fa2.json"
IMPLS = ("flash_attn", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")


def _cell(e: SpeedEntry | None) -> str:
    if e is None:
        return "—"
    if e.status != "ok" or e.tflops is None:
        return e.status
    mem = f" ({e.peak_mem_mib:.0f})" if e.peak_mem_mib is not None else ""
    return f"{e.tflops:.0f}{mem}"


def speed_table(r: VerificationResult) -> list[str]:
    by = {(e.impl, e.dtype, e.headdim, e.seqlen, e.causal): e for e in r.speed if e.direction == "fwd"}
    shapes = sorted({(e.dtype, e.headdim, e.seqlen, e.causal) for e in r.speed},
                    key=lambda s: (s[0], s[1], s[3], s[2]))
    lines = ["| dtype | hd | seqlen | causal | " + " | ".join(IMPLS) + " | FA2 / SDPA flash | FA2 / cuDNN |",
             "| --- | ---: | ---: | --- | " + " | ".join("---:" for _ in IMPLS) + " | ---: | ---: |"]

    def ratio(a: SpeedEntry | None, b: SpeedEntry | None) -> str:
        return f"{a.tflops / b.tflops:.2f}×" if a is not None and b is not None and a.tflops and b.tflops else "—"

    for dtype, hd, seqlen, causal in shapes:
        cells = [_cell(by.get((impl, dtype, hd, seqlen, causal))) for impl in IMPLS]
        fa = by.get(("flash_attn", dtype, hd, seqlen, causal))
        lines.append(f"| {dtype} | {hd} | {seqlen} | {'yes' if causal else 'no'} | " + " | ".join(cells)
                     + f" | {ratio(fa, by.get(('sdpa_flash', dtype, hd, seqlen, causal)))}"
                     + f" | {ratio(fa, by.get(('sdpa_cudnn', dtype, hd, seqlen, causal)))} |")
    return lines


def median_table(r: VerificationResult) -> list[str]:
    lines = ["| implementation | shapes measured | median TFLOP/s | min–max TFLOP/s | max peak MiB |",
             "| --- | ---: | ---: | --- | ---: |"]
    for impl in IMPLS:
        ok = [e for e in r.ok_speed(impl) if e.tflops is not None]
        if not ok:
            continue
        t = [e.tflops for e in ok if e.tflops is not None]
        mem = [e.peak_mem_mib for e in ok if e.peak_mem_mib is not None]
        lines.append(f"| {impl} | {len(ok)} | {statistics.median(t):.0f} | {min(t):.0f}–{max(t):.0f} | "
                     f"{max(mem):.0f} |" if mem else f"| {impl} | {len(ok)} | {statistics.median(t):.0f} | "
                     f"{min(t):.0f}–{max(t):.0f} | — |")
    return lines


def correctness_table(r: VerificationResult) -> list[str]:
    lines = ["| implementation | dtype | cases | max fwd rel. error | max bwd rel. error (dq/dk/dv) "
             "| threshold fwd / bwd |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for c in r.correctness:
        if c.status != "ok" or c.fwd_rel_err is None or c.dtype is None:
            continue
        bwd = max(x for x in (c.dq_rel_err, c.dk_rel_err, c.dv_rel_err, 0.0) if x is not None)
        groups.setdefault((c.impl, c.dtype), []).append((c.fwd_rel_err, bwd))
    from fleetctl.fleet.verification import THRESHOLDS

    for (impl, dtype), errs in groups.items():
        th = THRESHOLDS[dtype]
        lines.append(f"| {impl} | {dtype} | {len(errs)} | {max(e[0] for e in errs):.2e} | "
                     f"{max(e[1] for e in errs):.2e} | {th['fwd']:g} / {th['bwd']:g} |")
    return lines


def e2e_table(r: VerificationResult) -> list[str]:
    lines = ["| attn_implementation | tokens/s | seconds | peak MiB above weights | model |",
             "| --- | ---: | ---: | ---: | --- |"]
    for e in r.e2e:
        tps = f"{e.tokens_per_s:.1f}" if e.tokens_per_s is not None else e.status
        secs = f"{e.seconds:.2f}" if e.seconds is not None else "—"
        mem = f"{e.peak_mem_mib:.0f}" if e.peak_mem_mib is not None else "—"
        model = e.model or "?"
        if e.random_weights and "random weights" not in model:
            model += " (random weights)"
        lines.append(f"| {e.impl} | {tps} | {secs} | {mem} | {model}, batch {e.batch}, prompt {e.prompt_len}, "
                     f"{e.new_tokens} new tokens |")
    return lines


def render(r: VerificationResult) -> str:
    d = r.device
    head = [f"Result: **{evaluate(r).status}**, mode {r.mode}, duration **{r.duration_s:.1f} s**; "
            f"{d.name} (cc {d.compute_capability}), driver {d.driver}, torch {d.torch} (CUDA {d.cuda}), "
            f"Python {d.python}, flash-attn {r.flash_attn.version}."]
    return "\n".join([*head, "", "Speed, forward, TFLOP/s (peak MiB above the inputs); 16k tokens, 16 heads:", "",
                      *speed_table(r), "", "Per implementation over the whole grid:", "", *median_table(r), "",
                      "Correctness against the float32 reference (largest error per implementation and dtype):",
                      "", *correctness_table(r), "", "End to end (batched greedy generation):", "",
                      *e2e_table(r)])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else FIXTURE
    print(render(parse_result(json.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
