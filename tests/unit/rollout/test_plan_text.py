"""The dry-run text of `fleetctl rollout flash-attn`: what a build buys, said plainly."""

from __future__ import annotations

from typing import Any

import pytest

from fleetctl.controller.commands.rollout import _print_plan


def _plan(waiting: list[str], on_every_node: float, once: float) -> dict[str, Any]:
    nodes = [{"hostname": h, "gpu": "H100", "variant": "fa2-source" if h == "a" else "fa2-wheel",
              "version": "2.8.3.post1", "steps": ["build-from-source", "verify"], "canary": False, "batch": 0,
              "skip": None, "build_key": "k"} for h in ["a", *waiting]]
    return {"nodes": nodes, "version": "2.8.3.post1", "selector": "all", "batches": [[n["hostname"] for n in nodes]],
            "canaries": 0, "builds": [{"builder": "a", "waiting": waiting, "estimated_minutes": 23, "build_key": "k"}],
            "reused_builds": [], "build_minutes": {"once_per_key": once, "on_every_node": on_every_node},
            "options": {"max_failures": "10%", "max_parallel": 50}}


def test_a_lone_builder_is_not_said_to_build_for_zero_more_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    _print_plan(_plan([], 23.0, 23.0))
    out = capsys.readouterr().out
    assert "build once: a builds (~23 min), no other node waits for it — key k" in out
    assert "0 more node" not in out and "once per key vs" not in out  # nothing saved: no comparison


def test_a_shared_build_says_who_waits_and_what_it_saves(capsys: pytest.CaptureFixture[str]) -> None:
    _print_plan(_plan(["b", "c"], 69.0, 23.0))
    out = capsys.readouterr().out
    assert "build once: a builds (~23 min), then 2 more node(s) install its wheel — key k" in out
    assert "build time: 23.0 min once per key vs 69.0 min building on every node" in out
