"""In-memory token buckets: per source address and global, for the unauthenticated doors.

Enrollment (gRPC ``Enroll``) and the dashboard login (``POST /login``) are reachable without credentials;
each attempt costs the controller work (a database lookup, an audit row, a 16 MiB scrypt). A
``RateLimits`` pairs a bucket per source address (one client cannot take everything) with a global one
(many addresses cannot either)::

    limits = RateLimits(per_source=Rate(burst=20, per_second=2), overall=Rate(burst=200, per_second=50))
    wait = limits.take("10.0.0.7")       # 0.0: go ahead; > 0: refuse, retry after that many seconds

Buckets live in memory, per controller process (a restart refills them), are thread-safe, and are bounded:
beyond ``max_sources`` addresses the full (idle) buckets are dropped first. The limits are documented in
docs/security.md ("Abuse limits").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetctl.fleet.errors import FleetError


@dataclass(frozen=True)
class Rate:
    burst: float  # tokens a bucket holds when full: attempts allowed at once
    per_second: float  # refill rate: attempts allowed per second in the long run


class TokenBucket:
    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = rate.burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.rate.burst, self.tokens + (now - self.at) * self.rate.per_second)
        self.at = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0.0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate.per_second

    def take(self) -> None:
        self.tokens -= 1

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.rate.burst


class RateLimits:
    """A bucket per source plus a global one; ``take(source)`` spends from both or from neither."""

    def __init__(self, per_source: Rate, overall: Rate, *, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_source, self.overall = per_source, overall
        self._clock = clock
        self._max_sources = max_sources
        self._global = TokenBucket(overall, clock())
        self._sources: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def take(self, source: str) -> float:
        """0.0 when the attempt may go ahead (a token taken from both buckets); else the seconds to wait."""
        with self._lock:
            now = self._clock()
            bucket = self._sources.get(source)
            if bucket is None:
                if len(self._sources) >= self._max_sources:
                    self._prune(now)
                bucket = self._sources[source] = TokenBucket(self.per_source, now)
            wait = max(bucket.wait(now), self._global.wait(now))
            if wait > 0:
                self.refused += 1
                return wait
            bucket.take()
            self._global.take()
            return 0.0

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._sources.items() if b.full(now)]:
            del self._sources[key]
        if len(self._sources) >= self._max_sources:  # all busy: forget the oldest half (bounded memory first)
            for key in list(self._sources)[: self._max_sources // 2]:
                del self._sources[key]


def source_address(peer: str) -> str:
    """The client address of a gRPC peer (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``), port dropped:
    a client opens a new port per connection, so the port must not make it a new source."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer


# Enrollment: an agent enrolls once in its life; a site bringing up racks enrolls many at once (they retry
# with backoff when refused: UNAVAILABLE). Login: a person types a password a few times a minute.
ENROLL_PER_SOURCE = Rate(burst=20, per_second=1.0)
ENROLL_OVERALL = Rate(burst=200, per_second=50.0)
LOGIN_PER_SOURCE = Rate(burst=10, per_second=0.2)
LOGIN_OVERALL = Rate(burst=20, per_second=4.0)  # each login is ~50 ms of scrypt on one core


class RateLimited(FleetError):
    """Too many attempts from this source (or overall): try again later (gRPC UNAVAILABLE, HTTP 429)."""

    code = "rate-limited"
