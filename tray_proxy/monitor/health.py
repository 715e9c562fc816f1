"""Health and statistics as a pure reducer over engine events (ARCHITECTURE, "Lifecycle,
health and history"): per-upstream handshake latency p50/p95 over 1 min and 1 h, successes
and failures by class, probe results, traffic rates, failures of the last hour in words.

No I/O, no Qt, no clock reads: every input carries its time, and `snapshot(now)` is told
what time it is. Tested like the sans-IO protocols.

Must not import PySide6, asyncio or socket.

CONTRACT (shared by the controller, the dashboard and the tests; the types below are fixed,
the reducer's implementation is free):
- HealthReducer.apply(events)              engine events (with their `at` times)
- HealthReducer.apply_rows(closed_rows)    closed ConnectionRows (with `words`), for the
                                           failures-in-words list
- HealthReducer.apply_traffic(at, up, down)  total bytes moved so far (monotonic counters
                                           incl. open tunnels), sampled about once a second
- HealthReducer.apply_probe(result)        a ProbeRecord ("Test now", periodic probes)
- HealthReducer.snapshot(now) -> HealthSnapshot
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class UpstreamState(enum.Enum):
    UNKNOWN = "unknown"  # no tunnel or probe yet
    UP = "up"  # the last tunnel or probe worked
    DOWN = "down"  # DOWN_AFTER_FAILURES connects/handshakes failed in a row
    AUTH_FAILED = "auth-failed"  # the proxy rejected the credentials


@dataclass(frozen=True, slots=True)
class LatencyPoint:
    at: float  # time.time() at the end of the bucket
    p50: float  # seconds
    p95: float  # seconds
    count: int  # handshakes in the bucket


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """One probe of an upstream (a real CONNECT through it)."""

    upstream: str
    at: float
    ok: bool
    latency: float | None  # seconds, when it answered
    words: str  # the result in words, e.g. "tunnel opened in 12 ms" / "407: password refused"


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    name: str
    state: UpstreamState = UpstreamState.UNKNOWN
    last_success: float | None = None
    last_failure: float | None = None
    last_failure_words: str = ""
    last_probe: ProbeRecord | None = None
    p50_1m: float | None = None  # handshake latency, seconds, over the last minute
    p95_1m: float | None = None
    p50_1h: float | None = None  # ... over the last hour
    p95_1h: float | None = None
    successes: int = 0  # tunnels opened through it since the app started
    failures: Mapping[str, int] = field(default_factory=dict)  # CloseReason.value -> count
    series: tuple[LatencyPoint, ...] = ()  # latency over time, oldest first (bounded)


@dataclass(frozen=True, slots=True)
class TrafficPoint:
    at: float
    up: float  # bytes per second, client -> upstream
    down: float  # bytes per second
    new_connections: float  # connections accepted per second


@dataclass(frozen=True, slots=True)
class FailureEntry:
    """A failure in words; the same words in a row are counted, not repeated."""

    at: float  # the latest occurrence
    words: str
    count: int = 1
    upstream: str | None = None
    reason: str = ""  # CloseReason.value

    @property
    def display(self) -> str:
        return self.words if self.count == 1 else f"{self.words} ({self.count} times)"


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    upstreams: tuple[UpstreamHealth, ...] = ()
    traffic: tuple[TrafficPoint, ...] = ()  # oldest first, about the last 5 minutes
    failures: tuple[FailureEntry, ...] = ()  # the last hour, newest last (bounded)
    open_connections: int = 0
    total_connections: int = 0

    @property
    def rate_now(self) -> TrafficPoint | None:
        return self.traffic[-1] if self.traffic else None
