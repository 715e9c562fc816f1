"""Circuit breakers and the order to try upstreams (tray_proxy/routing/health.py, select.py):
transcripts of outcomes over a clock the test owns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.routing.health import BreakerPolicy, BreakerState, Health, HealthChange
from tray_proxy.routing.select import order_upstreams

POLICY = BreakerPolicy(failures_to_open=3, base_backoff=1.0, max_backoff=8.0, jitter=0.0)


def test_opens_after_n_consecutive_failures_and_closes_on_success() -> None:
    h = Health(POLICY)
    assert h.all_closed and h.state("a") is BreakerState.CLOSED and h.latency("a") is None
    assert h.failure("a", 0.0) is None
    assert h.success("a", 0.1) is None  # a success in between resets the count
    assert h.failure("a", 0.2) is None
    assert h.failure("a", 0.3) is None
    assert h.failure("a", 0.4, "connection refused") == HealthChange(
        "a", False, "connection refused"
    )
    assert h.state("a") is BreakerState.OPEN and not h.all_closed
    assert not h.available("a", 1.3)
    assert h.available("a", 1.4)  # backoff 1 s
    assert h.take("a", 1.4)  # the one trial
    assert h.state("a") is BreakerState.HALF_OPEN
    assert not h.take("a", 1.5)  # no second trial while the first is out
    assert h.success("a", 1.6, latency=0.05) == HealthChange("a", True)
    assert h.all_closed and h.state("a") is BreakerState.CLOSED
    assert h.latency("a") == pytest.approx(0.05)


def test_failed_trials_back_off_exponentially_up_to_the_cap() -> None:
    h = Health(POLICY)
    now = 0.0
    for _ in range(3):
        h.failure("a", now)
    waits = []
    for _ in range(6):
        until = h.breaker("a").open_until
        waits.append(until - now)
        now = until
        assert h.take("a", now)
        assert h.failure("a", now) is None  # still down: no new event
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_late_failure_while_open_extends_the_backoff() -> None:
    h = Health(POLICY)
    for t in (0.0, 0.0, 0.0):
        h.failure("a", t)
    h.failure("a", 0.5)
    assert h.breaker("a").open_until == pytest.approx(2.5)


@given(st.floats(0.0, 1.0))
def test_jitter_stays_within_its_band(r: float) -> None:
    h = Health(BreakerPolicy(failures_to_open=1, base_backoff=10.0, jitter=0.2), random=lambda: r)
    h.failure("a", 100.0)
    assert 108.0 - 1e-9 <= h.breaker("a").open_until <= 112.0 + 1e-9


def test_a_trial_that_never_reports_is_forgotten() -> None:
    h = Health(BreakerPolicy(failures_to_open=1, base_backoff=1.0, jitter=0.0, trial_timeout=5))
    h.failure("a", 0.0)
    assert h.take("a", 1.0)
    assert not h.available("a", 5.9)
    assert h.available("a", 6.0) and h.take("a", 6.0)


def test_latency_is_an_ewma_and_ignores_bad_samples() -> None:
    h = Health(BreakerPolicy(ewma_alpha=0.5))
    h.success("a", 0.0, 0.100)
    h.success("a", 0.0, 0.200)
    h.success("a", 0.0, -1.0)
    h.success("a", 0.0, None)
    assert h.latency("a") == pytest.approx(0.150)


def test_forget_drops_removed_upstreams() -> None:
    h = Health(BreakerPolicy(failures_to_open=1))
    h.failure("gone", 0.0)
    h.success("kept", 0.0, 0.01)
    h.success("closed", 0.0)
    version = h.version
    h.forget({"kept"})
    assert h.all_closed and h.version > version
    assert h.latency("kept") is not None and h.latency("gone") is None


def _down(h: Health, name: str, now: float = 0.0) -> None:
    for _ in range(h.policy.failures_to_open):
        h.failure(name, now)


def test_priority_order_skips_open_breakers() -> None:
    h = Health(POLICY)
    assert order_upstreams(("a", "b", "c"), h, "priority", 0.0) == ("a", "b", "c")
    _down(h, "a")
    assert order_upstreams(("a", "b", "c"), h, "priority", 0.5) == ("b", "c")
    _down(h, "b")
    _down(h, "c")
    assert order_upstreams(("a", "b", "c"), h, "priority", 0.5) == ()  # all down
    # After the backoff each gets one trial; the connection that got it tries it first.
    assert order_upstreams(("a", "b", "c"), h, "priority", 1.0) == ("a", "b", "c")
    assert order_upstreams(("a", "b", "c"), h, "priority", 1.0) == ()


def test_latency_order_fastest_first_unknown_last() -> None:
    h = Health(POLICY)
    assert order_upstreams(("a",), h, "latency", 0.0) == ("a",)
    h.success("b", 0.0, 0.030)
    h.success("c", 0.0, 0.010)
    assert order_upstreams(("a", "b", "c", "d"), h, "latency", 0.0) == ("c", "b", "a", "d")
    _down(h, "c")
    assert order_upstreams(("a", "b", "c", "d"), h, "latency", 0.5) == ("b", "a", "d")
