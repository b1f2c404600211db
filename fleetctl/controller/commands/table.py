"""Plain-text tables for read commands (``--json`` prints the raw objects instead).

Every cell is ``terminal_safe``: node-reported text (GPU names, apt errors, hostnames) reaches these tables, and
an escape sequence or a newline in it must not rewrite the operator's terminal or the table's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleetctl.fleet.text import terminal_safe


def render(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[("-" if v is None else terminal_safe(v)) for v in row] for row in rows]
    headers = [terminal_safe(h) for h in headers]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
