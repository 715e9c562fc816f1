"""The real RelayEngine in-process, on its own asyncio loop in a thread inside a lab namespace.

`EngineInLab` owns the thread: it joins the namespace (setns) before it makes the loop, so
every socket made on the loop, and every thread or process started from it, lives there.
A lab test subclasses it and writes `_main` (build the engine and whatever observes it,
start it, `await self.serve()`, stop it in `finally`) and what it records.

Must not be imported by tray_proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

from tests.lab.netns import join_namespace


class EngineInLab:
    """A thread in network namespace `ns_name` running `_main()` on a fresh asyncio loop.

    Entering starts it and waits (bounded) until `_main` calls `serve()`; a failure before
    that (`error`) fails the test. Leaving makes `serve()` return and joins the thread.
    """

    def __init__(self, ns_name: str) -> None:
        self.ns_name = ns_name
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="engine-in-lab", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self.ready.wait(30) or self.error is not None:
            self.__exit__()
            raise AssertionError(f"the engine did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the engine thread did not stop"

    def _run(self) -> None:
        try:
            join_namespace(self.ns_name)
            asyncio.run(self._on_loop())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _on_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._main()

    async def _main(self) -> None:
        """Build and start the engine, `await self.serve()`, stop it in `finally`."""
        raise NotImplementedError

    async def serve(self) -> None:
        """Say the engine is ready, then wait until the test leaves the `with` block."""
        assert self._stop is not None
        self.ready.set()
        await self._stop.wait()
