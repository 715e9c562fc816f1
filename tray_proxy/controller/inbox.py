"""Engine events from the relay's thread to the controller's loop, in bursts.

The relay runs on its own loop in its own thread; its observer must be quick and never
block on the UI. Events are queued and handed over with one `call_soon_threadsafe` per
burst, not one per event, because each callback costs more on qasync than on plain asyncio
(shared/BENCHMARKS.md). Each event is tagged with the generation of the relay that sent it,
so the late events of a relay that was stopped can be told apart.

Must not import PySide6 or qasync.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable

from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    Event,
    TunnelEstablished,
)

__all__ = ["EngineInbox"]


# Events are handed over this long after the first of a burst, on a timer, not at once.
# At once is a new connection's opening moments: its CONNECT has just left and the proxy is
# answering. The hand-over's work there (the monitor's, and the attribution request that wakes
# its worker) was in the way of the relay and the proxy on a 2-core machine: in `tray-proxy
# run`, whose relay shares the controller's loop, the history cost about 7 % added p50; in the
# app, whose relay has a thread of its own, the UI thread took the GIL from the relay there
# (docs/benchmarks.md). 1-2 ms later (uvloop's timers are whole milliseconds) the connection
# has mostly been served.
HANDOVER_DELAY = 0.002
# A connection's own events: the many, the ones the delay is for.
_CONNECTION_EVENTS = frozenset(
    {ConnectionOpened, ConnectionRouted, TunnelEstablished, ConnectionClosed}
)


class EngineInbox:
    """`post(generation, event)` on any thread; `drain(batch)` runs on `loop`, per burst.

    `delay` > 0: a burst is handed over that long after its first event (HANDOVER_DELAY), on
    a timer of the loop it is posted from: the controller's own (a relay on that loop), or
    the relay thread's (then the hand-over crosses to `loop` when the timer fires). Posted
    from a thread with no running loop, it crosses at once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        drain: Callable[[list[tuple[int, Event]]], None],
        *,
        delay: float = 0.0,
    ) -> None:
        self._loop = loop
        self._drain = drain
        self._delay = delay
        self._queue: collections.deque[tuple[int, Event]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        # Made on the loop's thread. A relay on that same loop (headless run) posts from it:
        # then call_soon does, without call_soon_threadsafe's write to the loop's self-pipe.
        self._loop_thread = threading.get_ident()

    def post(self, generation: int, event: Event) -> None:
        """Called on the relay thread: must be quick and never block on the UI."""
        self._queue.append((generation, event))
        here = threading.get_ident() == self._loop_thread
        # From the relay's thread, anything but a connection's own events crosses at once,
        # with what waits before it: EngineStopped is the relay thread's last word (its loop
        # ends, and a timer on it with it), and the rest is rare and news.
        urgent = self._delay > 0.0 and not here and type(event) not in _CONNECTION_EVENTS
        with self._lock:
            if self._scheduled and not urgent:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the app loop is closed: nobody listens
            if here:
                if self._delay > 0.0:
                    self._loop.call_later(self._delay, self._run)
                else:
                    self._loop.call_soon(self._run)
                return
            if self._delay > 0.0 and not urgent:
                try:
                    relay_loop = asyncio.get_running_loop()  # the relay thread's, once a burst
                except RuntimeError:
                    pass
                else:
                    relay_loop.call_later(self._delay, self._cross)
                    return
            self._loop.call_soon_threadsafe(self._run)

    def _cross(self) -> None:
        """On the posting thread's loop, when the delay is over: over to `loop`."""
        with contextlib.suppress(RuntimeError):  # the app loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._run)

    def flush(self) -> None:
        """Hand over what is queued now (on the loop; before the owner stops listening)."""
        self._run()

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
        batch: list[tuple[int, Event]] = []
        queue = self._queue
        while queue:
            batch.append(queue.popleft())
        if batch:
            self._drain(batch)
