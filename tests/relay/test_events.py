"""The typed events and the EventBus that carries them."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    EngineStopped,
    EventBus,
    ListenerError,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import CloseReason

SAMPLES = [
    EngineStopped(),
    ConnectionOpened(1, ("127.0.0.1", 5000), ("93.184.216.34", 443)),
    ConnectionRouted(1, "example.com", "corp"),
    TunnelEstablished(1, "corp", 0.002),
    ConnectionClosed(1, CloseReason.DONE, "", 10, 20, 0.5),
    UpstreamFailed("corp", CloseReason.UPSTREAM_AUTH_FAILED, "proxy answered 407"),
    ListenerError("accept failed: Too many open files"),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_events_are_frozen_slotted_values(event):
    assert dataclasses.is_dataclass(event)
    assert not hasattr(event, "__dict__")
    fields = dataclasses.fields(event)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, fields[0].name, None)
    assert event == dataclasses.replace(event)
    hash(event)


def test_bus_delivers_in_order_to_every_observer():
    bus = EventBus()
    seen_a, seen_b = [], []
    bus.subscribe(seen_a.append)
    bus.subscribe(seen_b.append)
    for event in SAMPLES:
        bus.publish(event)
    assert seen_a == SAMPLES and seen_b == SAMPLES


def test_unsubscribe_stops_delivery_and_is_idempotent():
    bus = EventBus()
    seen = []
    unsubscribe = bus.subscribe(seen.append)
    bus.publish(EngineStopped())
    unsubscribe()
    unsubscribe()
    bus.publish(EngineStopped())
    assert seen == [EngineStopped()]


def test_observed_follows_subscriptions():
    """The engine builds per-connection events only while `observed` is true."""
    bus = EventBus()
    assert bus.observed is False
    first = bus.subscribe(lambda event: None)
    second = bus.subscribe(lambda event: None)
    assert bus.observed is True
    first()
    assert bus.observed is True  # one observer is left
    second()
    assert bus.observed is False
    second()  # idempotent: stays false
    assert bus.observed is False


def test_failing_observer_is_logged_and_does_not_stop_the_others(caplog):
    bus = EventBus()
    seen = []

    def broken(event):
        raise RuntimeError("observer bug")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="tray_proxy.relay.events"):
        bus.publish(ListenerError("x"))
    assert seen == [ListenerError("x")]
    assert "ListenerError" in caplog.text and "observer bug" in caplog.text


def test_observer_added_during_publish_sees_only_later_events():
    bus = EventBus()
    late = []

    def subscribe_another(event):
        bus.subscribe(late.append)

    unsubscribe = bus.subscribe(subscribe_another)
    bus.publish(EngineStopped())
    assert late == []
    unsubscribe()
    bus.publish(ListenerError("y"))
    assert late == [ListenerError("y")]
