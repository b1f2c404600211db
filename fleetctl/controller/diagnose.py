"""Match install/build/import/runtime output against known FlashAttention error signatures.

The signatures (``controller/data/flash_attn_error_signatures.json``) are data: each has its regex, a cause, a
remedy, what it means for the plan (``action``, a stable string a rollout can switch on, and ``plan_change`` in
words) and the upstream source it was taken from. ``Diagnosis.pattern``/``span`` say which text matched which
regex, for ``fleetctl diagnose --explain``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

# Lines that appear in failed logs without being the cause; reported after real findings.
RED_HERRINGS = frozenset({"http_404_red_herring", "git_missing_old_setup", "network_blocked_wheel_download",
                          "no_prebuilt_wheel_fallback"})

@dataclass(frozen=True)
class Signature:
    id: str
    stage: str
    pattern: re.Pattern[str]
    cause: str
    remedy: str
    source: str
    confidence: str
    action: str
    plan_change: str


@dataclass(frozen=True)
class Diagnosis:
    id: str
    stage: str
    cause: str
    remedy: str
    action: str
    plan_change: str
    line: int  # 1-based line of the first match
    excerpt: str
    source: str
    confidence: str
    red_herring: bool
    pattern: str = ""  # the signature's regex
    match: str = ""  # exactly what it matched
    span: tuple[int, int] = (0, 0)  # character offsets of the match in the log

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "cause": self.cause, "remedy": self.remedy,
                "action": self.action, "plan_change": self.plan_change, "line": self.line, "excerpt": self.excerpt,
                "source": self.source, "confidence": self.confidence, "red_herring": self.red_herring,
                "pattern": self.pattern, "match": self.match, "span": list(self.span)}


@lru_cache(maxsize=1)
def signatures() -> tuple[Signature, ...]:
    data = resources.files("fleetctl.controller.data")
    raw = json.loads(data.joinpath("flash_attn_error_signatures.json").read_text())
    return tuple(Signature(id=s["id"], stage=s["stage"], pattern=re.compile(s["pattern"], re.MULTILINE),
                           cause=s["cause"], remedy=s["remedy"], source=s["source"], confidence=s["confidence"],
                           action=s["action"], plan_change=s["plan_change"])
                 for s in raw)


def diagnose(text: str) -> list[Diagnosis]:
    """Every signature found in ``text``: real causes first (in order of appearance), red herrings last."""
    found: list[Diagnosis] = []
    for sig in signatures():
        match = sig.pattern.search(text)
        if match is None:
            continue
        line = text.count("\n", 0, match.start()) + 1
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        excerpt = text[start:end if end != -1 else len(text)].strip()[:300]
        found.append(Diagnosis(id=sig.id, stage=sig.stage, cause=sig.cause, remedy=sig.remedy, action=sig.action,
                               plan_change=sig.plan_change, line=line, excerpt=excerpt, source=sig.source,
                               confidence=sig.confidence, red_herring=sig.id in RED_HERRINGS,
                               pattern=sig.pattern.pattern, match=match.group(0)[:300],
                               span=(match.start(), match.end())))
    return sorted(found, key=lambda d: (d.red_herring, d.line))
