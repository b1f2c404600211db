"""Rollout notifications: a JSON POST to webhooks when a rollout pauses, awaits approval, fails, completes or is
aborted (docs/rollout.md, "Notifications"; the payload is ``schema`` 1).

The one outside system here is an HTTP endpoint that may be slow, down or wrong, so nothing waits for it:
``submit`` (any thread; the rollout engine calls it from its database units) only queues, and ``run`` — the
controller's ``webhooks`` part, started by the composition root (controller/app.py) — delivers each
notification in its own task, retrying with exponential backoff. A delivery that still fails is logged and
counted (``fleet_rollout_notifications_total{outcome="failed"}`` on /metrics); the rollout never notices.
Notifications live in memory: one still queued when the controller stops is lost (the log says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from fleetctl.controller.rollout.core import redact_url
from fleetctl.controller.telemetry import REGISTRY

log = logging.getLogger(__name__)

NOTIFICATIONS = Counter("fleet_rollout_notifications", "Rollout webhook notifications by event and outcome "
                        "(delivered; failed: every attempt failed; dropped: the queue was full)",
                        ["event", "outcome"], registry=REGISTRY)
NOTIFICATION_RETRIES = Counter("fleet_rollout_notification_retries", "Webhook POSTs that failed and were retried",
                               registry=REGISTRY)

USER_AGENT = "fleetctl-controller (rollout notifications)"


@dataclass(frozen=True)
class Notification:
    url: str
    payload: Mapping[str, Any]


class WebhookSender:
    """Delivers notifications in the background; ``submit`` never blocks and never raises."""

    def __init__(self, base_url: Callable[[], str | None] = lambda: None, *, timeout: float = 5.0,
                 attempts: int = 5, backoff: float = 1.0, max_queue: int = 1000, max_in_flight: int = 32) -> None:
        self.base_url = base_url  # the controller's URL, known once its HTTP server listens
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_queue = max_queue
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pending: deque[Notification] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, urls: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Queue ``payload`` for each of ``urls`` (any thread). The controller's URL is added here."""
        base = self.base_url()
        full = {**payload, "controller_url": base,
                "rollout_url": f"{base}/rollouts/{payload.get('rollout_id')}" if base else None}
        with self._lock:
            for url in dict.fromkeys(urls):
                if len(self._pending) >= self.max_queue:
                    NOTIFICATIONS.labels(str(payload.get("event")), "dropped").inc()
                    log.error("webhook queue full (%d): dropped %s notification of %s for %s", self.max_queue,
                              payload.get("event"), payload.get("rollout_id"), redact_url(url))
                    continue
                self._pending.append(Notification(url, full))
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def run(self) -> None:
        """The controller's ``webhooks`` part: deliver what is queued until stopped."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
            for item in batch:
                task = asyncio.create_task(self._deliver(item), name=f"webhook-{item.payload.get('rollout_id')}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not batch:
                await self._wake.wait()
                self._wake.clear()

    async def stop(self) -> None:
        left = len(self._pending) + len(self._tasks)
        if left:
            log.warning("stopping with %d webhook notification(s) undelivered", left)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def _deliver(self, item: Notification) -> None:
        event = str(item.payload.get("event"))
        body = json.dumps(item.payload).encode()
        where = redact_url(item.url)  # the path of a webhook URL is often its secret
        error = ""
        for attempt in range(self.attempts):
            if attempt:
                NOTIFICATION_RETRIES.inc()
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            async with self._in_flight:
                error = await asyncio.to_thread(self._post, item.url, body)
            if not error:
                NOTIFICATIONS.labels(event, "delivered").inc()
                log.info("webhook %s: %s notification of %s delivered", where, event, item.payload.get("rollout_id"))
                return
            log.warning("webhook %s: %s notification of %s, attempt %d/%d failed: %s", where, event,
                        item.payload.get("rollout_id"), attempt + 1, self.attempts, error)
        NOTIFICATIONS.labels(event, "failed").inc()
        log.error("webhook %s: gave up on the %s notification of %s after %d attempts: %s", where, event,
                  item.payload.get("rollout_id"), self.attempts, error)

    def _post(self, url: str, body: bytes) -> str:
        """POST ``body``; "" on a 2xx answer, else what went wrong (blocking: run in a thread)."""
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return str(getattr(exc, "reason", exc))
