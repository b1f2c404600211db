"""The resolver: per node, how to get FlashAttention onto it (DESIGN §3.2). Pure, no I/O.

Public API::

    from fleetctl.controller.resolver import Policy, resolve, resolve_fleet
    decision = resolve(facts, catalog, Policy(version="2.8.3"))
    decision.to_json()  # the §3.2 object plus "build"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fleetctl.controller.resolver import rules
from fleetctl.controller.resolver.core import resolve
from fleetctl.controller.resolver.model import (
    STEPS,
    VARIANTS,
    BuildParams,
    Decision,
    MeasuredImpl,
    Measurements,
    Policy,
    Rejected,
)
from fleetctl.fleet.errors import FactsError
from fleetctl.fleet.facts import NodeFacts

if TYPE_CHECKING:  # controller.catalog imports controller.resolver.rules
    from fleetctl.controller.catalog import Catalog

__all__ = ["STEPS", "VARIANTS", "BuildParams", "Decision", "MeasuredImpl", "Measurements", "Policy", "Rejected",
           "resolve", "resolve_fleet",
           "unreadable_node"]


def unreadable_node(error: FactsError, index: int) -> Decision:
    """The decision for a node whose facts did not parse: blocked, with the parse error as the reason."""
    hostname = error.node or f"#{index}"
    candidates = ["fa2-wheel", "fa2-source", f"fa1-source {rules.FA1_VERSION}", f"fa3-source {rules.FA3_VERSION}",
                  f"fa4 {rules.FA4_VERSION}", "sdpa"]
    return Decision(hostname=hostname, variant="blocked", flash_attn_version=None, artifact=None, toolkit=None,
                    steps=(), reasons=(f"facts could not be read: {error.message}",
                                       f"fix: {error.hint or 'correct the facts file (DESIGN §3.1)'}"),
                    rejected=tuple(Rejected(c, "the node's facts could not be read") for c in candidates))


def resolve_fleet(entries: Sequence[NodeFacts | FactsError], catalog: Catalog, policy: Policy,
                  measured: Mapping[str, Measurements] | None = None) -> list[Decision]:
    """Decide for every node, in input order. Nodes with identical facts (hostname aside) and the same
    measurements share one resolution: fleets are mostly copies of a few machine images. ``measured``
    (by hostname) feeds ``policy.prefer="fastest"``."""
    measured = measured or {}
    seen: dict[tuple[object, ...], Decision] = {}
    out: list[Decision] = []
    for index, facts in enumerate(entries):
        if isinstance(facts, FactsError):
            out.append(unreadable_node(facts, index))
            continue
        key = (facts.os, facts.driver, facts.gpus, facts.toolkit, facts.python, facts.torch, facts.flash_attn,
               facts.resources, facts.apt, facts.rocm, measured.get(facts.hostname))
        cached = seen.get(key)
        if cached is None:
            cached = seen[key] = resolve(facts, catalog, policy, measured.get(facts.hostname))
            out.append(cached)
        else:
            out.append(replace(cached, hostname=facts.hostname))
    return out
