"""Per-upstream health: a circuit breaker and a latency average, fed with outcomes.

Each upstream has a breaker. CLOSED: used. After `failures_to_open` consecutive failures it
OPENs: skipped for a backoff (base * 2^(times opened in a row), capped, with jitter so that
many clients do not retry in step). When the backoff ends it is HALF_OPEN: one trial (a probe
or a real connection) may go; success closes it, failure opens it again for a longer backoff.
A trial that never reports back is forgotten after `trial_timeout` so the next one may go.

Outcomes come from the active probe and from real traffic (handshake success with its latency,
or a failure before the tunnel was up). Time and randomness are passed in: no clock, no I/O,
no threads (the caller serialises access).

Must not import PySide6, asyncio, socket or the relay engine.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Breaker", "BreakerPolicy", "BreakerState", "Health", "HealthChange"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures_to_open: int = 3
    base_backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: float = 0.2  # backoff * (1 +- jitter)
    trial_timeout: float = 30.0
    ewma_alpha: float = 0.3  # weight of the newest latency sample


@dataclass(frozen=True, slots=True)
class HealthChange:
    """An upstream went down (its breaker opened) or came back (closed): for the event stream
    (dashboard, tray). `reason` is the failure's words, or "" when it came back."""

    upstream: str
    up: bool
    reason: str = ""


class Breaker:
    """One upstream's breaker and latency average (seconds, None until the first sample)."""

    __slots__ = ("failures", "latency", "open_until", "opened", "state", "trial_since")

    def __init__(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self.opened = 0  # times opened without a success in between
        self.open_until = 0.0
        self.trial_since: float | None = None
        self.latency: float | None = None

    def available(self, now: float, policy: BreakerPolicy) -> bool:
        """Whether a connection may use it now (does not take the half-open trial)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now >= self.open_until
        return self.trial_since is None or now - self.trial_since >= policy.trial_timeout

    def take(self, now: float, policy: BreakerPolicy) -> bool:
        """Claim it for one connection: True when it may be used; an open breaker whose
        backoff ended becomes HALF_OPEN and this connection is its one trial."""
        if not self.available(now, policy):
            return False
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.HALF_OPEN
            self.trial_since = now
        return True


class Health:
    """The breakers of all upstreams, created on first mention (ad-hoc PAC upstreams too).

    `version` changes whenever a breaker changes state, so a caller can cache what it derived
    from the states; `all_closed` is the fast path's test.
    """

    def __init__(
        self, policy: BreakerPolicy | None = None, random: Callable[[], float] | None = None
    ) -> None:
        self.policy = policy or BreakerPolicy()
        # A fixed 0.5 means no jitter; the relay passes random.random.
        self._random = random or (lambda: 0.5)
        self._breakers: dict[str, Breaker] = {}
        self._not_closed = 0
        self.version = 0

    @property
    def all_closed(self) -> bool:
        return self._not_closed == 0

    def breaker(self, name: str) -> Breaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = Breaker()
        return b

    def state(self, name: str) -> BreakerState:
        b = self._breakers.get(name)
        return BreakerState.CLOSED if b is None else b.state

    def latency(self, name: str) -> float | None:
        b = self._breakers.get(name)
        return None if b is None else b.latency

    def available(self, name: str, now: float) -> bool:
        b = self._breakers.get(name)
        return b is None or b.available(now, self.policy)

    def take(self, name: str, now: float) -> bool:
        b = self._breakers.get(name)
        if b is None:
            return True
        before = b.state
        taken = b.take(now, self.policy)
        if b.state is not before:
            self.version += 1
        return taken

    def success(self, name: str, now: float, latency: float | None = None) -> HealthChange | None:
        """A handshake or probe through `name` worked (`latency`: seconds it took)."""
        b = self.breaker(name)
        if latency is not None and latency >= 0:
            a = self.policy.ewma_alpha
            b.latency = latency if b.latency is None else a * latency + (1 - a) * b.latency
        b.failures = 0
        b.opened = 0
        b.trial_since = None
        if b.state is BreakerState.CLOSED:
            return None
        b.state = BreakerState.CLOSED
        self._not_closed -= 1
        self.version += 1
        return HealthChange(name, up=True)

    def failure(self, name: str, now: float, reason: str = "") -> HealthChange | None:
        """A dial, handshake or probe through `name` failed before a tunnel was up."""
        b = self.breaker(name)
        b.failures += 1
        if b.state is BreakerState.CLOSED:
            if b.failures < self.policy.failures_to_open:
                return None
            self._not_closed += 1
            self._open(b, now)
            return HealthChange(name, up=False, reason=reason)
        # A failed trial (or a late failure while open): back off longer.
        self._open(b, now)
        return None

    def _open(self, b: Breaker, now: float) -> None:
        p = self.policy
        backoff = min(p.max_backoff, p.base_backoff * 2.0**b.opened)
        backoff *= 1.0 + p.jitter * (2.0 * self._random() - 1.0)
        b.state = BreakerState.OPEN
        b.open_until = now + backoff
        b.opened += 1
        b.trial_since = None
        self.version += 1

    def forget(self, keep: set[str]) -> None:
        """Drop the breakers of upstreams no longer configured (after a reload)."""
        for name in [n for n in self._breakers if n not in keep]:
            if self._breakers.pop(name).state is not BreakerState.CLOSED:
                self._not_closed -= 1
        self.version += 1
