"""The order in which to try a decision's upstreams, given their health.

"priority": the decision's order (which is already by priority), skipping upstreams whose
breaker is open; "latency": the available ones by their average handshake latency, fastest
first (those with no sample yet after them, in priority order). An upstream in its half-open
trial is offered to one connection only (`Health.take`).

Nothing available ("all down") is reported as an empty order; the router then goes DIRECT or
keeps the full list, as `when_unreachable` says.

Must not import PySide6, asyncio, socket or the relay engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from tray_proxy.routing.health import Health

__all__ = ["order_upstreams"]


def order_upstreams(
    candidates: Sequence[str], health: Health, policy: str, now: float
) -> tuple[str, ...]:
    """`candidates` (in priority order) as the order to try them now; empty when all are down.

    Claims the half-open trial of the upstreams it returns, so call it once per connection.
    """
    if health.all_closed and (policy == "priority" or len(candidates) < 2):
        return tuple(candidates)
    usable = [name for name in candidates if health.available(name, now)]
    if policy == "latency" and len(usable) > 1:
        rank = {name: i for i, name in enumerate(usable)}

        def key(name: str) -> tuple[bool, float, int]:
            latency = health.latency(name)
            return (latency is None, latency or 0.0, rank[name])

        usable.sort(key=key)
    return tuple(name for name in usable if health.take(name, now))
