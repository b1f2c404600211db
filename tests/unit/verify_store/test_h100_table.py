"""benchmarks/h100_table.py renders docs/benchmarks.md's H100 tables from the committed fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import h100_table


def test_renders_the_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    assert h100_table.main([]) == 0
    out = capsys.readouterr().out
    assert "duration **49.5 s**" in out and "flash-attn 2.8.3.post1" in out
    assert "| bfloat16 | 128 | 8192 | no |" in out
    assert "| flash_attention_2 | 461.5 |" in out and "| sdpa | 126.9 |" in out and "| eager | 717.7 |" in out
    assert "| sdpa_math | 25 |" in out


def test_docs_carry_the_rendered_speed_table() -> None:
    docs = (Path(h100_table.__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    import json

    from fleetctl.fleet.verification import parse_result

    rows = h100_table.speed_table(parse_result(json.loads(h100_table.FIXTURE.read_text())))
    assert all(row in docs for row in rows), "re-run `python -m benchmarks.h100_table` and paste its output"
