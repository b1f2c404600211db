"""Polling for a condition in async tests of the rollout engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(cond: Callable[[], object], timeout: float = 20.0, step: float = 0.05) -> None:
    """Return once ``cond()`` is true; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(step)
