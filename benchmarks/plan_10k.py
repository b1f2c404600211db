"""Plan 10,000 nodes and print the time (goal: < 1 s). Results go to docs/benchmarks.md.

Two fleets: a typical one (10,000 nodes cloned from 12 machine images, hostnames differ) and
a worst case where every node's facts differ (distinct core counts), so no resolution is shared.
Facts parsing is timed separately; the catalog is loaded once, as ``fleetctl plan`` does.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve_fleet
from fleetctl.fleet.facts import parse_fleet

N = 10_000
EXAMPLE = Path(__file__).parents[1] / "tests" / "fixtures" / "node_facts_example.json"


def images() -> list[dict[str, Any]]:
    base = json.loads(EXAMPLE.read_text())["nodes"]
    variants: list[dict[str, Any]] = []
    for node in base:
        for python in ("3.10.12", "3.11.9", "3.12.3", "3.13.1"):
            clone = copy.deepcopy(node)
            clone["python"]["version"] = python
            variants.append(clone)
    return variants


def fleet(distinct: bool) -> dict[str, Any]:
    source = images()
    nodes = []
    for i in range(N):
        node = copy.deepcopy(source[i % len(source)])
        node["hostname"] = f"node-{i:05d}"
        if distinct:
            node["resources"]["cpu_cores"] = 8 + i
        nodes.append(node)
    return {"nodes": nodes}


def measure(label: str, obj: dict[str, Any]) -> None:
    catalog = builtin_catalog()
    t0 = time.perf_counter()
    entries = parse_fleet(obj)
    t1 = time.perf_counter()
    decisions = resolve_fleet(entries, catalog, Policy())
    t2 = time.perf_counter()
    payload = json.dumps({"nodes": [d.to_json() for d in decisions]})
    t3 = time.perf_counter()
    print(f"{label:<28} parse {t1 - t0:6.3f} s   resolve {t2 - t1:6.3f} s   to JSON {t3 - t2:6.3f} s   "
          f"({len(payload) / 1e6:.1f} MB)")


def main() -> None:
    t = time.perf_counter()
    builtin_catalog()
    print(f"built-in catalog load        {time.perf_counter() - t:6.3f} s")
    measure("10k nodes, 12 images", fleet(distinct=False))
    measure("10k nodes, all distinct", fleet(distinct=True))


if __name__ == "__main__":
    main()
