"""The terminal view: plain lines when not a TTY, a redrawn footer on a TTY."""

from __future__ import annotations

import io
from typing import Any

from fleetctl.controller.rollout.progress import ProgressView, footer_lines


def status(transitions: list[dict[str, Any]], state: str = "running") -> dict[str, Any]:
    return {
        "id": "r-1", "version": "2.8.3", "status": state, "reason": "", "updated_at": "2026-11-25T03:00:00+00:00",
        "current_batch": 0, "active": state == "running", "options": {"canary_batch": True},
        "budget": {"failed": 1, "max_failures": "10%", "allowed": 0},
        "batch_progress": [{"batch": 0, "total": 2, "done": 1, "failed": 1, "skipped": 0, "active": 0}],
        "nodes": [{"hostname": "a", "batch": 0, "canary": True, "state": "done", "in_step": False},
                  {"hostname": "b", "batch": 0, "canary": True, "state": "failed", "in_step": False, "cause": "x",
                   "diagnosis": {"diagnoses": [{"cause": "ABI mismatch", "remedy": "use the cxx11abi wheel"}]}},
                  {"hostname": "c", "batch": 1, "canary": False, "state": "install", "in_step": True,
                   "step": "install-wheel", "step_started_at": "2026-11-25T03:00:01+00:00"}],
        "transitions": transitions,
    }


T = [{"id": 1, "hostname": "a", "from": "verify", "to": "done", "at": "2026-11-25T03:00:02+00:00", "cause": "ok"},
     {"id": 2, "hostname": "b", "from": "install", "to": "failed", "at": "2026-11-25T03:00:03+00:00",
      "cause": "install-wheel failed: undefined symbol"}]


def test_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    view.update(status(T))
    view.update(status([], "paused"))
    text = out.getvalue()
    assert "\x1b[" not in text
    assert "03:00:02 [canary] a: verify -> done  (ok)" in text
    assert "b: FAILED install -> failed" in text and "diagnosis: ABI mismatch — fix: use the cxx11abi wheel" in text
    assert "rollout r-1 is paused" in text


def test_tty_redraws_the_footer() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    view.update(status(T))
    view.update(status([]))
    text = out.getvalue()
    assert text.count("\x1b[") == 2  # the second update moves up over the first footer (F) and clears it (J)
    foot = footer_lines(status([]))
    assert any("[############xxxxxxxxxxxx]" in line for line in foot)
    assert any(line.strip().startswith("> c") and "install-wheel" in line for line in foot)
