"""What the rollout page shows beyond ``sources.rollout_detail``: the rollout's options in words and
its builds.

``detail`` is the page's snapshot (embedded in the page, served as JSON and pushed over Server-Sent
Events): ``sources.rollout_detail`` plus ``builds``, the same builds ``fleetctl rollout status``
lists (``controller.rollout.service.rollout_json``: the builds of the rollout nodes' build keys),
with when each was created and finished and how long it took.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.rollout.models import RolloutNode
from fleetctl.controller.rollout.service import rollout_builds as builds_of
from fleetctl.controller.web import sources

VERIFY_MODES = {"full": "full verification", "quick": "quick verification"}


def duration_text(seconds: float | None) -> str:
    """A span of time for people: ``45 s``, ``15 min``, ``23 min 37 s``, ``90 min``, ``2 h 30 min``."""
    if seconds is None or seconds < 0:
        return ""
    secs = round(seconds)
    if secs < 60:
        return f"{secs} s"
    mins, s = divmod(secs, 60)
    if mins < 100:
        return f"{mins} min" + (f" {s} s" if s else "")
    h, m = divmod(mins, 60)  # seconds don't matter past 100 min
    return f"{h} h" + (f" {m} min" if m else "")


def _bytes_text(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return ", ".join(_value_text(v) for v in value)
    return str(value)


def _empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, Mapping | list | tuple | set) and not value)


def _canary_text(options: Mapping[str, Any]) -> str:
    count = options.get("canary")
    if options.get("canary_batch") is False or count == 0:
        return "no canary"
    if count is None or count == "":
        return "canaries: one per GPU model and variant"
    try:
        n = int(count)
    except (TypeError, ValueError):
        return f"canary {_value_text(count)}"
    return f"{n} canary" if n == 1 else f"{n} canaries"


def _batch_text(value: Any) -> str:
    sizes = [x.strip() for x in str(value).split(",") if x.strip()]
    if len(sizes) == 1:
        return f"batch size {sizes[0]}"
    return "batch sizes " + ", ".join(sizes)


def _timeouts_text(value: Any) -> str:
    if not isinstance(value, Mapping):
        return f"step timeouts {_value_text(value)}"
    parts = []
    for step, secs in value.items():
        try:
            parts.append(f"{step} {duration_text(float(secs))}")
        except (TypeError, ValueError):
            parts.append(f"{step} {_value_text(secs)}")
    return "step timeouts: " + ", ".join(parts)


def _min_free_text(value: Any) -> str:
    try:
        return f"min free artifact space {_bytes_text(int(value))}"
    except (TypeError, ValueError):
        return f"min free bytes {_value_text(value)}"


_KNOWN: dict[str, Callable[[Any], str]] = {
    "batch": _batch_text,
    "max_failures": lambda v: f"max failures {_value_text(v)}",
    "max_parallel": lambda v: f"max parallel {_value_text(v)}",
    "step_timeouts": _timeouts_text,
    "min_free_bytes": _min_free_text,
    "verify_mode": lambda v: VERIFY_MODES.get(str(v), f"verify mode {_value_text(v)}"),
}


def describe_options(options: Mapping[str, Any] | None) -> list[str]:
    """A rollout's options (``Rollout.options``, as ``controller.rollout.service`` stores them) in words,
    in their stored order: ``batch size 1``, ``no canary``, ``max failures 1``, ``step timeouts:
    build-from-source 90 min, verify 25 min``, ``full verification``… A key this function does not know
    still shows, as its name (underscores → spaces) and its value; empty values are left out."""
    out: list[str] = []
    for key, value in (options or {}).items():
        if key == "canary_batch" and "canary" in (options or {}):
            continue  # said with ``canary``
        if key == "canary":
            out.append(_canary_text(options or {}))
            continue
        if _empty(value):
            continue
        if key == "canary_batch":
            out.append("canary batch" if value else "no canary")
        elif key in _KNOWN:
            out.append(_KNOWN[key](value))
        else:
            out.append(f"{str(key).replace('_', ' ')} {_value_text(value)}")
    return out


def _naive_utc(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def rollout_builds(session: Session, rollout_id: str) -> list[dict[str, Any]]:
    """The builds of the rollout nodes' build keys (those ``fleetctl rollout status`` lists), in the order
    the rollout scheduled their nodes; ``duration_s``/``duration`` (created → finished) once one finished,
    ``reused`` when an earlier rollout built it."""
    builds = builds_of(session, list(session.scalars(
        select(RolloutNode.build_key).where(RolloutNode.rollout_id == rollout_id)
        .order_by(RolloutNode.batch, RolloutNode.hostname))))
    out = []
    for b in builds:
        secs = None
        if b.finished_at is not None and b.created_at is not None:
            secs = (_naive_utc(b.finished_at) - _naive_utc(b.created_at)).total_seconds()
        out.append({"build_key": b.build_key, "status": b.status, "builder": b.builder,
                    "rollout_id": b.rollout_id, "reused": bool(b.rollout_id) and b.rollout_id != rollout_id,
                    "artifact_sha256": b.artifact_sha256, "artifact_filename": b.artifact_filename,
                    "sha256_short": (b.artifact_sha256 or "")[:12], "job_id": b.job_id, "error": b.error,
                    "attempts": b.attempts, "created_at": b.created_at, "finished_at": b.finished_at,
                    "duration_s": secs, "duration": duration_text(secs)})
    return out


def rollout_detail(session: Session, rollout_id: str) -> dict[str, Any] | None:
    """The rollout page's snapshot: ``sources.rollout_detail`` plus ``builds`` (see ``rollout_builds``)."""
    detail = sources.rollout_detail(session, rollout_id)
    if detail is not None:
        detail["builds"] = rollout_builds(session, rollout_id)
    return detail
