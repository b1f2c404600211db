"""Simulation profiles: realistic node facts for machines without a GPU (docs/profiles.md).

Each ``agent/profiles/NAME.json`` is a DESIGN §3.1 node object; its ``hostname`` is the
default one (``sim-NAME``) and a caller usually gives each simulated node its own. Loaded
facts carry ``extra["simulated"] = True`` and ``extra["profile"] = NAME``.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from fleetctl.fleet.errors import FactsError, NotFoundError
from fleetctl.fleet.facts import NodeFacts, parse_node

__all__ = ["list_profiles", "load_profile"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    root = resources.files(__name__)
    return sorted(entry.name[:-5] for entry in root.iterdir() if entry.name.endswith(".json"))


def load_profile(name: str, hostname: str | None = None) -> NodeFacts:
    """The facts of profile ``name`` (hostname ``sim-NAME`` unless ``hostname`` is given)."""
    available = list_profiles()
    if not _NAME_RE.match(name) or name not in available:
        raise NotFoundError(f"no simulation profile {name!r}",
                            hint=f"available profiles: {', '.join(available)}")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FactsError(f"profile {name}: not valid JSON ({exc})", hint="fix the profile file") from exc
    if not isinstance(data, dict):
        raise FactsError(f"profile {name}: expected a JSON object", hint="fix the profile file")
    data = dict(data)
    data["hostname"] = hostname or data.get("hostname") or f"sim-{name}"
    facts = parse_node(data)
    extra = {**facts.extra, "simulated": True, "profile": name}
    extra.setdefault("probe_errors", [])
    return NodeFacts(**{**{f: getattr(facts, f) for f in facts.__dataclass_fields__}, "extra": extra})
