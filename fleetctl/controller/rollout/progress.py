"""Live progress of a rollout in the terminal, from status snapshots (``GET /rollouts/{id}?since=N``).

On a TTY: event lines scroll above a footer that is redrawn in place (a progress bar per batch, the
current step of each running node). Not a TTY (CI logs, pipes): only plain event lines, one per
transition, plus a line per rollout status change — nothing is redrawn.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, TextIO

from fleetctl.controller.rollout.core import State

BAR_WIDTH = 24


def _time(iso: str | None) -> str:
    if not iso:
        return "--:--:--"
    try:
        return dt.datetime.fromisoformat(iso).strftime("%H:%M:%S")
    except ValueError:
        return iso[:8]


def _bar(done: int, failed: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return "[" + "#" * d + "x" * f + "." * (width - d - f) + "]"


def event_lines(status: Mapping[str, Any], transitions: list[Mapping[str, Any]]) -> list[str]:
    """One line per transition; failures get their diagnosis on the next line."""
    nodes = {n["hostname"]: n for n in status.get("nodes", [])}
    out: list[str] = []
    for t in transitions:
        n = nodes.get(t["hostname"], {})
        tag = "canary" if n.get("canary") else ("-" if n.get("batch", 0) < 0 else f"batch {n.get('batch', '?')}")
        line = f"{_time(t.get('at'))} [{tag}] {t['hostname']}: {t['from'] or 'new'} -> {t['to']}"
        if t.get("cause"):
            line += f"  ({t['cause']})"
        if t["to"] == State.FAILED:
            line = line.replace(f"{t['hostname']}:", f"{t['hostname']}: FAILED", 1)
        out.append(line)
        if t["to"] == State.FAILED:
            diag = n.get("diagnosis") or {}
            for d in (diag.get("diagnoses") or [])[:1]:
                if isinstance(d, Mapping):
                    out.append(f"    diagnosis: {d.get('cause', '')} — fix: {d.get('remedy', '')}")
    return out


def footer_lines(status: Mapping[str, Any]) -> list[str]:
    target = status.get("target") or f"flash-attn {status['version']}"
    lines = [f"rollout {status['id']}  {target}  {status['status'].upper()}"
             + (f"  ({status['reason']})" if status.get("reason") else "")]
    budget = status.get("budget") or {}
    for b in status.get("batch_progress", []):
        label = "canary " if b["batch"] == 0 and (status.get("options") or {}).get("canary_batch") else \
            f"batch {b['batch']}"
        lines.append(f"  {label:<8} {_bar(b['done'] + b['skipped'], b['failed'], b['total'])} "
                     f"{b['done']}/{b['total']} done, {b['failed']} failed, {b['active']} to go")
    running = [n for n in status.get("nodes", []) if n.get("in_step")]
    for n in running[:12]:
        lines.append(f"  > {n['hostname']:<20} {n['state']:<12} {n.get('step') or ''} "
                     f"(since {_time(n.get('step_started_at'))})")
    if len(running) > 12:
        lines.append(f"  > … and {len(running) - 12} more nodes in a step")
    if budget:
        lines.append(f"  failures {budget.get('failed', 0)} (budget --max-failures {budget.get('max_failures')} "
                     f"= {budget.get('allowed')})")
    if status.get("waiting"):  # the maintenance policy holds new nodes: window, bake time, max-unavailable
        lines.append(f"  {status['waiting']}")
    approval = status.get("approval") or {}
    if approval.get("approved_by"):
        lines.append(f"  canary batch approved by {approval['approved_by']} at {_time(approval.get('approved_at'))}")
    return lines


class ProgressView:
    """Feeds status snapshots to a stream; ``tty`` decides redraw vs. plain lines."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self._footer = 0
        self._status: str | None = None
        self._batch: int | None = None

    def update(self, status: Mapping[str, Any]) -> None:
        events = event_lines(status, list(status.get("transitions", [])))
        if status.get("status") != self._status:
            events.append(f"{_time(status.get('updated_at'))} rollout {status['id']} is {status['status']}"
                          + (f": {status['reason']}" if status.get("reason") else ""))
            self._status = status.get("status")
        if not self.tty and status.get("current_batch") != self._batch and status.get("active"):
            self._batch = status.get("current_batch")
            bp = next((b for b in status.get("batch_progress", []) if b["batch"] == self._batch), None)
            if bp is not None:
                events.append(f"batch {self._batch}/{len(status.get('batch_progress', [])) - 1}: "
                              f"{bp['total']} node(s)")
        if self.tty:
            if self._footer:
                self.stream.write(f"\x1b[{self._footer}F\x1b[J")
            for line in events:
                self.stream.write(line + "\n")
            foot = footer_lines(status)
            for line in foot:
                self.stream.write(line + "\n")
            self._footer = len(foot)
        else:
            for line in events:
                self.stream.write(line + "\n")
        self.stream.flush()

    def summary(self, status: Mapping[str, Any]) -> None:
        if not self.tty:
            for line in footer_lines(status):
                self.stream.write(line + "\n")
        failed = [n for n in status.get("nodes", []) if n["state"] == State.FAILED]
        if failed:
            self.stream.write(f"{len(failed)} node(s) failed:\n")
            for n in failed:
                self.stream.write(f"  {n['hostname']}: {n['cause']}\n")
                for d in ((n.get("diagnosis") or {}).get("diagnoses") or [])[:1]:
                    self.stream.write(f"    diagnosis: {d.get('cause', '')}\n    fix: {d.get('remedy', '')}\n")
        self.stream.flush()
