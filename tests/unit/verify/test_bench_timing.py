"""bench.py's timer warms a shape up before it measures it (the first-shape outlier of the 2026-11-25 H100 run)."""

from __future__ import annotations

import argparse
import time

from fleetctl.agent.verify.bench import WorkerCtx, _time_calls


def test_timed_calls_come_after_a_warm_up_and_the_median_ignores_a_slow_start() -> None:
    calls: list[float] = []

    def fn() -> None:  # the first four calls are slow, as on a GPU still ramping up
        calls.append(time.perf_counter())
        time.sleep(0.02 if len(calls) <= 4 else 0.001)

    ctx = WorkerCtx(args=argparse.Namespace(), torch=None, device="cpu", is_cuda=False)
    ms, reps = _time_calls(ctx, fn, target_s=0.2, min_reps=5, max_reps=50)
    warm_up = len(calls) - 1 - reps  # calls = the estimate, the warm-up, the timed ones
    assert 8 <= reps <= 10  # the estimate (one slow call, ~20 ms) gives 0.2 s / 20 ms
    assert 3 <= warm_up <= 5  # half the target time: every slow call is spent before the timed ones
    assert ms < 5, f"the slow start leaked into the median: {ms:.1f} ms"
