"""The agent's reconnect backoff resets as soon as a session is established (issue 13): after a run of failed
attempts (a controller restarting) and a short session, the next reconnect waits the initial delay, not the
delay the failures had grown to (before: only a session longer than 30 s reset it)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.client import Agent, AgentConfig, Credentials
from fleetctl.fleet.errors import ControllerUnavailable
from tests.unit.agent.conftest import self_signed_pem


async def test_backoff_resets_after_an_established_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AgentConfig(controller="127.0.0.1:1", state_dir=tmp_path, facts=lambda: None,  # type: ignore[arg-type,return-value]
                      ca_file=tmp_path / "ca.pem", backoff_initial=0.02, backoff_max=0.64)
    agent = Agent(cfg)
    creds = Credentials("a" * 32, "node-1", b"", self_signed_pem(), b"")
    # a controller down for 6 attempts, then up for a short session, then restarting again
    script = ["down"] * 6 + ["up"] + ["down"]
    calls: list[float] = []
    stop = asyncio.Event()

    async def session(_creds: Any, _stop: asyncio.Event) -> None:
        calls.append(time.monotonic())
        step = script[len(calls) - 1] if len(calls) <= len(script) else "stop"
        if step == "stop":
            stop.set()
            return
        if step == "up":
            agent._session_up = True  # the first RPC was answered
            await asyncio.sleep(0.05)  # a short session: the controller goes away again
        raise ControllerUnavailable("controller gone", hint="")

    async def enrolled(_stop: asyncio.Event | None = None) -> Credentials:
        return creds

    monkeypatch.setattr(agent, "_session", session)
    monkeypatch.setattr(agent, "ensure_enrolled", enrolled)
    await asyncio.wait_for(agent.run(stop), 30)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    up_end = calls[6] + 0.05
    after_session = calls[7] - up_end
    print(f"\ngaps between attempts: {', '.join(f'{g:.2f}' for g in gaps)}; after the session: {after_session:.2f}s")
    assert gaps[5] > 0.3  # the failures had grown the delay towards the maximum...
    assert after_session < 0.1  # ...and an established session resets it at once (jitter ±20 %)
