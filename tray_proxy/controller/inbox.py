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

from tray_proxy.relay.events import Event

__all__ = ["EngineInbox"]


# Headless `tray-proxy run`: events posted on the loop's own thread (the relay shares it) are
# handed over this long after the first of a burst, on a timer, not at the loop's next turn.
# The next turn is a new connection's opening moments: its CONNECT has just left and the
# proxy is answering, and on a 2-core machine the hand-over's work there (the monitor's, and
# the attribution request that wakes its worker) was in the way of the relay and the proxy:
# the history cost about 7 % added p50 (docs/benchmarks.md). 1-2 ms later (uvloop's timers
# are whole milliseconds) the connection has mostly been served.
HEADLESS_DELAY = 0.002


class EngineInbox:
    """`post(generation, event)` on any thread; `drain(batch)` runs on `loop`, per burst.

    `delay` > 0: what is posted on the loop's own thread is handed over that long after the
    burst's first event (HEADLESS_DELAY); from another thread, at the loop's next turn."""

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
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the app loop is closed: nobody listens
            if threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self._run)
            elif self._delay > 0.0:
                self._loop.call_later(self._delay, self._run)
            else:
                self._loop.call_soon(self._run)

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
