#!/usr/bin/env python3
"""Write controller/data/attention_prior.json: the attention recommendation's built-in prior.

Real measurements only, each with its fixture file, machine and date (controller/attention.py reads it when
neither the node nor the fleet measured an implementation).  Re-run after adding a real-GPU fixture:

    .venv/bin/python scripts/attention_prior.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetctl.controller.attention import PRIOR_PATH, evidence_from_e2e, evidence_from_result  # noqa: E402
from fleetctl.fleet.verification import parse_result  # noqa: E402

# (fixture, machine): the real runs behind the prior (docs/benchmarks.md has their tables)
SOURCES = (
    ("tests/fixtures/h100/verify_full_fa2.json",
     "NVIDIA H100 80GB HBM3, driver 580.159.04, lent through the device tool; flash-attn 2.8.3.post1"),
    ("tests/fixtures/h200_fa4/verify_full_fa4.json",
     "NVIDIA H200 (SXM, 143771 MiB), driver 580.159.04, lent through the device tool; flash-attn-4 4.0.0b36"),
)
# agent/verify/e2e_gen.py outputs (decode tokens/s by attn_implementation): (file, machine, driver)
E2E_SOURCES = (
    ("tests/fixtures/h200_attention/e2e_h200.json",
     "NVIDIA H200, driver 580.159.04, lent through the device tool; qwen2-1.5b dims, batch 8, prompt 4096",
     "580.159.04"),
)


def main() -> int:
    evidence = []
    for rel, machine in SOURCES:
        result = parse_result(json.loads((ROOT / rel).read_text(encoding="utf-8")))
        evidence.append(evidence_from_result(result, "prior", origin=rel, machine=machine).to_json())
    for rel, machine, driver in E2E_SOURCES:
        obj = json.loads((ROOT / rel).read_text(encoding="utf-8"))
        evidence.append(evidence_from_e2e(obj, "prior", rel, machine, driver).to_json())
    out = {"about": "real measurements (fixtures) behind the attention recommendation's prior; "
                    "written by scripts/attention_prior.py", "evidence": evidence}
    PRIOR_PATH.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {PRIOR_PATH.relative_to(ROOT)}: {len(evidence)} results, "
          f"{sum(len(e['measurements']) for e in evidence)} measurements")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
