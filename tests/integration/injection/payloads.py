"""Injection payloads for node-reported text (issue 13, "Facts are data, never code").

Every payload that could run something names its own marker file (``MARKERS/<field>-<kind>``): if Ansible,
a shell or Python ever evaluates it, the file appears and the test says which field and which payload did it.
``INJ`` ~ ``ECTED`` payloads are harmless probes of templating itself: their rendered form, ``INJECTED``, must
never appear anywhere in a job's events or outcome (the payload text itself does not contain that word).
"""

from __future__ import annotations

from pathlib import Path

RENDERED = "INJECTED"

#: payload kinds; ``{m}`` is replaced by the marker path
TEMPLATES: dict[str, str] = {
    "lookup": "{{ lookup('pipe', 'touch {m}') }}",
    "lookup-nospace": "{{lookup('pipe','touch${IFS}{m}')}}",
    "statement": "{% set _x = lookup('pipe', 'touch {m}') %}{{ 'INJ' ~ 'ECTED' }}",
    "comment": "{# hidden #}{{ 'INJ' ~ 'ECTED' }}{# {m} #}",
    "expression": "{{ 'INJ' ~ 'ECTED' }}",
    "raw-block": "{% raw %}x{% endraw %}{{ 'INJ' ~ 'ECTED' }}",
    "newline": "/usr/bin/python3\n{{ lookup('pipe', 'touch {m}') }}",
    "subshell": "$(touch {m})",
    "backticks": "`touch {m}`",
    "semicolon": "/usr/bin/python3; touch {m}",
    "long": "{{ lookup('pipe', 'touch {m}') }}" + "A" * 100_000,
    "unicode": "/opt/\u028benv/bin/pyth\u00f6n\u202e{{ lookup('pipe', 'touch {m}') }}\U0001f600",
    "control": "\x1b[31mred\x1b[0m\r\x07\x08\t{{ lookup('pipe', 'touch {m}') }}\x7f",
}


def payload(kind: str, markers: Path, field: str) -> str:
    return TEMPLATES[kind].replace("{m}", str(markers / f"{field}-{kind}"))


def fired(markers: Path) -> list[str]:
    """Marker files that exist: each one is a payload that ran."""
    return sorted(p.name for p in markers.iterdir()) if markers.is_dir() else []
