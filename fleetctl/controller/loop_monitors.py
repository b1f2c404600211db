"""How well the controller's event loop keeps up: its wake-up lag and the garbage collector's pauses.

Both are the process's own health, reported by ``/api/v1/stats``; ``ControllerContext`` holds one of each,
the composition root (controller/app.py) runs ``LoopLag.run`` and installs the ``GcMonitor``, and
housekeeping (controller/server.py) lets the monitor re-freeze after a registration burst.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class LoopLag:
    """Measures how late the event loop wakes up (a stalled loop delays every RPC)."""

    def __init__(self, period: float = 0.05, keep: int = 4000) -> None:
        self.period = period
        self.samples: list[float] = []
        self.keep = keep

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.samples.append(max(0.0, loop.time() - t - self.period))
            if len(self.samples) > self.keep:
                del self.samples[: self.keep // 2]

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        xs = sorted(self.samples)
        return {"p50_ms": round(xs[len(xs) // 2] * 1000, 2), "p99_ms": round(xs[int(len(xs) * 0.99)] * 1000, 2),
                "max_ms": round(xs[-1] * 1000, 2)}

    def reset(self) -> None:
        self.samples.clear()


GC_GEN0_THRESHOLD = 10_000  # CPython's default is 700
GC_FREEZE_GROWTH = 64  # nodes registered since the last freeze that make a quiet tick freeze again


class GcMonitor:
    """Times the interpreter's garbage collections (``gc.callbacks``), per generation; optionally tunes them.

    A full (generation 2) collection traverses every tracked object in the process: the imported
    libraries, SQLAlchemy's metadata, ten thousand agents' identities and nodes — a pause of
    ~100 ms or more during which no RPC is served. ``tune()`` (``fleet-controller serve``; not for
    controllers embedded in a test process) collects once, moves every object alive after start-up
    into the permanent generation (``gc.freeze()``) so that later collections skip them, and raises
    the generation-0 threshold so that the short-lived objects of in-flight RPCs are not promoted
    every 700 allocations. ``after_tick(nodes)`` (housekeeping) freezes again once a registration
    burst is over. Frozen objects are still freed by reference counting; only reference cycles
    among them are never collected (bounded: one freeze per burst).
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._stats: list[list[float]] = [[0, 0.0, 0.0] for _ in range(3)]  # count, total s, max s
        self.freezes = 0
        self.tuned = False
        self._frozen_nodes = 0
        self._last_nodes = 0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        st = self._stats[min(2, info.get("generation", 2))]
        st[0] += 1
        st[1] += took
        st[2] = max(st[2], took)

    def freeze(self) -> None:
        gc.freeze()
        self.freezes += 1

    def tune(self, nodes: int = 0) -> None:
        gc.collect()
        self.freeze()
        _, t1, t2 = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, t1, t2)
        self.tuned = True
        self._frozen_nodes = self._last_nodes = nodes

    def after_tick(self, nodes: int) -> bool:
        """Freeze again when the node count grew by GC_FREEZE_GROWTH and held still for one tick."""
        if not self.tuned:
            return False
        growing, self._last_nodes = nodes != self._last_nodes, nodes
        if growing or nodes - self._frozen_nodes < GC_FREEZE_GROWTH:
            return False
        gc.collect(1)  # young cycles of the burst are garbage; do not freeze them
        self.freeze()
        self._frozen_nodes = nodes
        log.info("gc: froze %d objects after %d nodes registered", gc.get_freeze_count(), nodes)
        return True

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"gen{g}": {"n": int(n), "total_ms": round(tot * 1000, 1), "max_ms": round(mx * 1000, 2)}
                               for g, (n, tot, mx) in enumerate(self._stats)}
        out["frozen"] = gc.get_freeze_count()
        out["freezes"] = self.freezes
        out["threshold"] = list(gc.get_threshold())
        return out

    def reset(self) -> None:
        self._stats = [[0, 0.0, 0.0] for _ in range(3)]
