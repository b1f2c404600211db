"""Verification results in the store, fleet baselines, schedules and drift (issue 6, controller side).

* ``models``: tables ``verifications``, ``verify_schedules``, ``verify_schedule_runs``, ``node_verify_state``;
* ``store``: record a result (judged against the fleet baselines), query results, degraded state;
* ``schedules``: cron parsing, the atomic claim of a due run, the scheduler loop;
* ``service``: the controller-side wiring (job finished → record; facts changed → drift re-verification);
* ``api``: HTTP routes under ``/api/v1/verify`` and ``/api/v1/schedules``.

See docs/verification.md (Storage, Schedules, Drift, Degraded).
"""
