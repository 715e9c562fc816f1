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
import math
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    CredentialsAccepted,
    CredentialsRejected,
    Event,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import CloseReason


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
    # ProbeOutcome.value ("ok", "auth-failed", "forbidden", "timeout", ...), when known: the
    # reducer moves the upstream's state by it ("" : by `ok` alone).
    outcome: str = ""


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


# -- the reducer ----------------------------------------------------------------------------

DOWN_AFTER_FAILURES = 3  # connect/handshake failures in a row that mark an upstream DOWN
BUCKET_SECONDS = 10.0  # latency is kept per bucket of this length...
HOUR_BUCKETS = 360  # ...for an hour
MINUTE_BUCKETS = 6  # the "last minute" is the current bucket and the five before it
SAMPLES_PER_BUCKET = 256  # exact samples kept per bucket; past it, a uniform sample of them
# Past EXACT_HOUR samples in the hour (or once a bucket had to sample), the hour's
# percentiles come from a histogram of 2 % wide bins instead: a snapshot stays well under a
# millisecond or two at any rate.
EXACT_HOUR = 20_000
_BIN_FLOOR = 1e-5  # seconds; bin 0 holds everything up to it
_BIN_RATIO = 1.02
_LOG_RATIO = math.log(_BIN_RATIO)
_BIN_CEILING = 100.0  # seconds; the last bin holds everything from it on
BINS = 2 + int(math.log(_BIN_CEILING / _BIN_FLOOR) / _LOG_RATIO)
TRAFFIC_SECONDS = 300.0  # traffic points kept (about one a second)
FAILURE_SECONDS = 3600.0  # failures in words kept for an hour...
MAX_FAILURE_ENTRIES = 200  # ...at most this many different sentences

# The upstream could not be reached or did not speak: these, in a row, mean DOWN. A refusal
# (403, 502) is the proxy answering; a reset mid-tunnel says nothing about the next dial.
_UNREACHABLE = frozenset(
    {
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
        CloseReason.UPSTREAM_RESET,
    }
)
# Ends counted against the upstream a connection went through (failures by class).
_UPSTREAM_FAILURES = frozenset(
    {
        *_UNREACHABLE,
        CloseReason.UPSTREAM_REFUSED,
        CloseReason.UPSTREAM_AUTH_FAILED,
        CloseReason.CONFIG_ERROR,
        CloseReason.LOOP,
    }
)
_PROBE_DOWN = frozenset({"timeout", "refused", "unreachable", "protocol-error"})


def _bin(value: float) -> int:
    if value <= _BIN_FLOOR:
        return 0
    if value >= _BIN_CEILING:
        return BINS - 1
    return min(BINS - 1, 1 + int(math.log(value / _BIN_FLOOR) / _LOG_RATIO))


def _bin_value(index: int) -> float:
    """The middle of bin `index` (geometrically), in seconds."""
    return _BIN_FLOOR if index == 0 else _BIN_FLOOR * _BIN_RATIO ** (index - 0.5)


def percentile(ordered: list[float] | array[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty sorted sequence (p in 0..1)."""
    rank = max(1, math.ceil(p * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _Bucket:
    """Handshake latencies of one BUCKET_SECONDS slice: up to SAMPLES_PER_BUCKET exact
    samples, and beyond that a uniform reservoir sample of them (bounded memory at any
    rate). `count` is every handshake seen."""

    __slots__ = ("index", "samples", "count", "ordered", "_summary", "bins")

    def __init__(self, index: int) -> None:
        self.index = index
        self.samples: array[float] = array("d")
        self.bins: array[int] = array("I", bytes(4 * BINS))  # handshakes per latency bin
        self.count = 0
        self.ordered = True
        self._summary: tuple[int, float, float] | None = None  # (count, p50, p95) cached

    def add(self, value: float, draw: int) -> None:
        self.count += 1
        self._summary = None
        if len(self.samples) < SAMPLES_PER_BUCKET:
            if self.samples and value < self.samples[-1]:
                self.ordered = False
            self.samples.append(value)
            return
        # Reservoir sampling (Algorithm R) with the reducer's deterministic draw.
        slot = draw % self.count
        if slot < SAMPLES_PER_BUCKET:
            self.samples[slot] = value
            self.ordered = False

    def sorted_samples(self) -> array[float]:
        if not self.ordered:
            self.samples = array("d", sorted(self.samples))
            self.ordered = True
        return self.samples

    def summary(self) -> tuple[float, float]:
        cached = self._summary
        if cached is None or cached[0] != self.count:
            ordered = self.sorted_samples()
            cached = (self.count, percentile(ordered, 0.5), percentile(ordered, 0.95))
            self._summary = cached
        return cached[1], cached[2]


class _UpstreamStats:
    __slots__ = (
        "name",
        "state",
        "last_success",
        "last_failure",
        "last_failure_words",
        "last_probe",
        "successes",
        "failures",
        "in_a_row",
        "buckets",
        "hour_bins",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = UpstreamState.UNKNOWN
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.last_failure_words = ""
        self.last_probe: ProbeRecord | None = None
        self.successes = 0
        self.failures: dict[str, int] = {}
        self.in_a_row = 0  # connect/handshake failures since the last success
        self.buckets: dict[int, _Bucket] = {}  # bucket index -> bucket (at most ~an hour)
        self.hour_bins: array[int] = array("Q", bytes(8 * BINS))  # sum of the buckets' bins

    def succeeded(self, at: float) -> None:
        self.successes += 1
        self.in_a_row = 0
        self.state = UpstreamState.UP
        if self.last_success is None or at > self.last_success:
            self.last_success = at

    def failed(self, reason: CloseReason, at: float, detail: str) -> None:
        key = reason.value
        self.failures[key] = self.failures.get(key, 0) + 1
        if self.last_failure is None or at >= self.last_failure:
            self.last_failure = at
            if detail:
                self.last_failure_words = detail
        if reason is CloseReason.UPSTREAM_AUTH_FAILED:
            self.state = UpstreamState.AUTH_FAILED
        elif reason in _UNREACHABLE:
            self.in_a_row += 1
            if self.in_a_row >= DOWN_AFTER_FAILURES and self.state is not UpstreamState.AUTH_FAILED:
                self.state = UpstreamState.DOWN

    def add_latency(self, at: float, seconds: float, draw: int) -> None:
        if not math.isfinite(at):
            return
        index = math.floor(at / BUCKET_SECONDS)
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = _Bucket(index)
            if len(self.buckets) > HOUR_BUCKETS + MINUTE_BUCKETS:
                self.prune(max(self.buckets))
        bucket.add(seconds, draw)
        b = _bin(seconds)
        bucket.bins[b] += 1
        self.hour_bins[b] += 1

    def prune(self, newest: int) -> None:
        """Forget buckets older than an hour before bucket `newest` (and any from a clock
        that jumped ahead of it)."""
        oldest = newest - HOUR_BUCKETS + 1
        for index in [i for i in self.buckets if i < oldest or i > newest + 1]:
            gone = self.buckets.pop(index).bins
            hour = self.hour_bins
            for b, n in enumerate(gone):
                if n:
                    hour[b] -= n

    def latency(self, now: float) -> tuple[float | None, ...]:
        """p50, p95 over the last minute, then over the last hour."""
        newest = math.floor(now / BUCKET_SECONDS)
        minute: list[_Bucket] = []
        hour: list[_Bucket] = []
        for index, bucket in self.buckets.items():
            if newest - HOUR_BUCKETS < index <= newest and bucket.samples:
                hour.append(bucket)
                if index > newest - MINUTE_BUCKETS:
                    minute.append(bucket)
        if sum(len(b.samples) for b in hour) <= EXACT_HOUR and all(
            b.count == len(b.samples) for b in hour
        ):
            return (*_merged_percentiles(minute), *_merged_percentiles(hour))
        return (*_merged_percentiles(minute), *_binned_percentiles(self.hour_bins))

    def series(self, now: float) -> tuple[LatencyPoint, ...]:
        newest = math.floor(now / BUCKET_SECONDS)
        points = []
        for index in sorted(self.buckets):
            if newest - HOUR_BUCKETS < index <= newest:
                bucket = self.buckets[index]
                if bucket.samples:
                    p50, p95 = bucket.summary()
                    end = min(now, (index + 1) * BUCKET_SECONDS)
                    points.append(LatencyPoint(end, p50, p95, bucket.count))
        return tuple(points)

    def snapshot(self, now: float) -> UpstreamHealth:
        p50_1m, p95_1m, p50_1h, p95_1h = self.latency(now)
        return UpstreamHealth(
            name=self.name,
            state=self.state,
            last_success=self.last_success,
            last_failure=self.last_failure,
            last_failure_words=self.last_failure_words,
            last_probe=self.last_probe,
            p50_1m=p50_1m,
            p95_1m=p95_1m,
            p50_1h=p50_1h,
            p95_1h=p95_1h,
            successes=self.successes,
            failures=dict(self.failures),
            series=self.series(now),
        )


def _merged_percentiles(
    buckets: list[_Bucket],
) -> tuple[float | None, float | None]:
    if not buckets:
        return None, None
    if all(b.count == len(b.samples) for b in buckets):
        merged: list[float] = []
        for bucket in buckets:
            merged.extend(bucket.sorted_samples())
        merged.sort()  # sorted runs: timsort merges them, it does not sort from scratch
        return percentile(merged, 0.5), percentile(merged, 0.95)
    # Some bucket kept a sample of its handshakes: each sample stands for count/len of them.
    weighted = sorted(
        (value, bucket.count / len(bucket.samples))
        for bucket in buckets
        for value in bucket.samples
    )
    total = sum(weight for _, weight in weighted)
    return _weighted(weighted, total * 0.5), _weighted(weighted, total * 0.95)


def _binned_percentiles(bins: array[int]) -> tuple[float | None, float | None]:
    total = sum(bins)
    if not total:
        return None, None
    out: list[float] = []
    for p in (0.5, 0.95):
        rank = max(1, math.ceil(p * total))
        seen = 0
        for index, n in enumerate(bins):
            seen += n
            if seen >= rank:
                out.append(_bin_value(index))
                break
    return out[0], out[1]


def _weighted(pairs: list[tuple[float, float]], rank: float) -> float:
    seen = 0.0
    for value, weight in pairs:
        seen += weight
        if seen >= rank - 1e-9:
            return value
    return pairs[-1][0]


class HealthReducer:
    """Health and statistics from engine events. Pure: time comes with every input.

    Memory is bounded whatever the rate: per upstream HOUR_BUCKETS buckets of at most
    SAMPLES_PER_BUCKET latencies (under 1 MB), TRAFFIC_SECONDS of traffic points, at most
    MAX_FAILURE_ENTRIES sentences, and one small entry per open connection.
    """

    def __init__(self, upstreams: Iterable[str] = ()) -> None:
        self._upstreams: dict[str, _UpstreamStats] = {}
        self._configured: tuple[str, ...] = ()
        self.set_upstreams(upstreams)
        # Open connections: id -> the upstream it was routed through (None: not yet).
        self._open: dict[int, str | None] = {}
        self._counted: set[int] = set()  # open ids whose failure an UpstreamFailed counted
        self._total = 0
        self._traffic: deque[TrafficPoint] = deque()
        self._last_sample: tuple[float, int, int, int] | None = None  # at, up, down, opened
        self._failures: OrderedDict[tuple[str, str | None], FailureEntry] = OrderedDict()
        self._draw = 0x2545F491  # xorshift state for the latency reservoirs: deterministic

    def set_upstreams(self, names: Iterable[str]) -> None:
        """The configured upstreams, in the settings' order: shown first, even before any
        event about them."""
        self._configured = tuple(dict.fromkeys(names))
        for name in self._configured:
            self._stats(name)

    def _stats(self, name: str) -> _UpstreamStats:
        stats = self._upstreams.get(name)
        if stats is None:
            stats = self._upstreams[name] = _UpstreamStats(name)
        return stats

    def _next_draw(self) -> int:
        x = self._draw
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self._draw = x
        return x

    def apply(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, ConnectionOpened):
                self._total += 1
                self._open[event.conn_id] = None
            elif isinstance(event, ConnectionRouted):
                if event.conn_id in self._open:
                    self._open[event.conn_id] = event.upstream
            elif isinstance(event, TunnelEstablished):
                if event.conn_id in self._open and event.upstream is not None:
                    self._open[event.conn_id] = event.upstream
                if event.upstream is not None:
                    stats = self._stats(event.upstream)
                    stats.succeeded(event.at)
                    latency = event.handshake_latency
                    if latency >= 0 and math.isfinite(latency):
                        stats.add_latency(event.at, latency, self._next_draw())
            elif isinstance(event, ConnectionClosed):
                upstream = self._open.pop(event.conn_id, None)
                if event.conn_id in self._counted:
                    self._counted.discard(event.conn_id)
                elif upstream is not None and event.reason in _UPSTREAM_FAILURES:
                    # A failure no UpstreamFailed told of (e.g. reset mid-tunnel).
                    self._upstreams_failed(upstream, event.reason, event.at, "", tunnel=True)
            elif isinstance(event, UpstreamFailed):
                self._upstreams_failed(event.upstream, event.reason, event.at, event.detail)
                if event.conn_id is not None and event.conn_id in self._open:
                    self._counted.add(event.conn_id)
            elif isinstance(event, CredentialsRejected):
                self._stats(event.upstream).state = UpstreamState.AUTH_FAILED
            elif isinstance(event, CredentialsAccepted):
                # The proxy took the login again (re-verified, or entered anew): it works.
                stats = self._stats(event.upstream)
                if stats.state is UpstreamState.AUTH_FAILED:
                    stats.state = UpstreamState.UP

    def _upstreams_failed(
        self, name: str, reason: CloseReason, at: float, detail: str, *, tunnel: bool = False
    ) -> None:
        if name == "?":
            return  # the engine's name for "no upstream chosen yet": nothing to count against
        stats = self._stats(name)
        if tunnel:
            # Mid-tunnel: count it, but it says nothing about whether the next dial works.
            key = reason.value
            stats.failures[key] = stats.failures.get(key, 0) + 1
            if stats.last_failure is None or at >= stats.last_failure:
                stats.last_failure = at
            return
        stats.failed(reason, at, detail)

    def apply_rows(self, closed_rows: Iterable[ConnectionRow]) -> None:
        """Closed rows with their words: failures join the failures-in-words list (the same
        sentence again is counted, not repeated) and become their upstream's last words."""
        failures = self._failures
        for row in closed_rows:
            if not row.failed or not row.words:
                continue
            at = row.ended if row.ended is not None else row.started
            reason = row.close_reason.value if row.close_reason is not None else ""
            key = (row.words, row.upstream)
            entry = failures.pop(key, None)
            if entry is not None and at - entry.at < FAILURE_SECONDS:
                entry = FailureEntry(
                    max(at, entry.at), row.words, entry.count + 1, row.upstream, reason
                )
            else:
                entry = FailureEntry(at, row.words, 1, row.upstream, reason)
            failures[key] = entry
            while len(failures) > MAX_FAILURE_ENTRIES:
                failures.popitem(last=False)
            if row.upstream is not None and row.close_reason in _UPSTREAM_FAILURES:
                stats = self._stats(row.upstream)
                if stats.last_failure is None or at >= stats.last_failure:
                    stats.last_failure = at
                stats.last_failure_words = row.words

    def apply_traffic(self, at: float, up: int, down: int) -> None:
        """Total bytes moved so far (up, down; monotonic, open tunnels included)."""
        last = self._last_sample
        self._last_sample = (at, up, down, self._total)
        if last is None:
            return
        then, up0, down0, opened0 = last
        elapsed = at - then
        if elapsed <= 0:
            self._last_sample = (then, up0, down0, opened0)  # keep the older base
            return
        self._traffic.append(
            TrafficPoint(
                at,
                max(0, up - up0) / elapsed,
                max(0, down - down0) / elapsed,
                max(0, self._total - opened0) / elapsed,
            )
        )
        while self._traffic and (
            self._traffic[0].at < at - TRAFFIC_SECONDS or len(self._traffic) > TRAFFIC_SECONDS * 4
        ):
            self._traffic.popleft()

    def apply_probe(self, result: ProbeRecord) -> None:
        stats = self._stats(result.upstream)
        if stats.last_probe is not None and stats.last_probe.at > result.at:
            return  # an older probe's late answer
        stats.last_probe = result
        if result.ok:
            stats.in_a_row = 0
            stats.state = UpstreamState.UP
            if stats.last_success is None or result.at > stats.last_success:
                stats.last_success = result.at
        elif result.outcome == "auth-failed":
            stats.state = UpstreamState.AUTH_FAILED
        elif result.outcome in _PROBE_DOWN or not result.outcome:
            # Asked on purpose and not reachable: no need to wait for three failures.
            stats.state = UpstreamState.DOWN

    def snapshot(self, now: float) -> HealthSnapshot:
        for stats in self._upstreams.values():
            stats.prune(math.floor(now / BUCKET_SECONDS))
        order = [*self._configured, *(n for n in self._upstreams if n not in self._configured)]
        since = now - FAILURE_SECONDS
        for key in [k for k, e in self._failures.items() if e.at < since]:
            del self._failures[key]
        failures = sorted(self._failures.values(), key=lambda e: e.at)
        return HealthSnapshot(
            upstreams=tuple(self._upstreams[name].snapshot(now) for name in order),
            traffic=tuple(p for p in self._traffic if p.at >= now - TRAFFIC_SECONDS),
            failures=tuple(failures),
            open_connections=len(self._open),
            total_connections=self._total,
        )
