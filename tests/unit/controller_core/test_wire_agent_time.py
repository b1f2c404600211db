"""An agent's event timestamps are its own clock: kept when plausible, replaced by the controller's when not (the
≥ 10,000-input fuzzer found `created_unix = 3.5e16` turning ReportJobEvents into gRPC UNKNOWN)."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetctl.controller.wire import event_from_proto
from fleetctl.fleet.v1 import fleet_pb2 as pb


@pytest.mark.parametrize("unix", [3.497677882154928e16, float("nan"), float("inf"), -5.0, 0.0, 1e3,
                                  dt.datetime(2999, 1, 1, tzinfo=dt.UTC).timestamp()])
def test_implausible_agent_times_become_the_controllers_now(unix: float) -> None:
    before = dt.datetime.now(dt.UTC)
    rec = event_from_proto(pb.JobEvent(job_id="j1", event="runner_on_ok", created_unix=unix, data_json="{}"))
    assert before <= rec.created <= dt.datetime.now(dt.UTC)


def test_a_plausible_agent_time_is_kept() -> None:
    when = dt.datetime(2026, 12, 2, 17, 0, tzinfo=dt.UTC)
    rec = event_from_proto(pb.JobEvent(job_id="j1", event="runner_on_ok", created_unix=when.timestamp(),
                                       data_json="{}"))
    assert rec.created == when
