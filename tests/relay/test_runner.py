"""EngineThread (relay/runner.py): the engine on its own loop in a thread, and the calls other
threads make into it (run, call_soon), against the proxy stubs on the test's own loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.relay.stubs import (
    ConnectProxy,
    Origin,
    echo,
    http_upstream,
    read_until_error,
    relay_settings,
    until,
)
from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import ConnectionClosed, ConnectionOpened, Event, EventBus
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.runner import EngineThread


def _engine(upstreams, destination, events: list[Event]) -> RelayEngine:
    bus = EventBus()
    bus.subscribe(events.append)  # list.append is atomic: fine from the engine thread
    return RelayEngine(
        relay_settings(spare_connections=0),
        upstreams,
        bus=bus,
        destination_of=lambda _sock: destination,
    )


def test_run_answers_on_the_engine_thread_with_the_result_or_the_exception():
    thread = EngineThread(_engine([], ("127.0.0.1", 9), []))
    thread.start()
    try:
        where = thread.run(threading.current_thread).result(5)
        assert where.name == "tray-proxy relay"
        assert thread.run(thread.engine.traffic).result(5) == ({}, 0, 0)
        assert thread.run(thread.engine.close_connections, [1, 2]).result(5) == 0
        with pytest.raises(ZeroDivisionError):
            thread.run(divmod, 1, 0).result(5)
        # call_soon: in order with run, no answer.
        calls: list[int] = []
        for i in range(3):
            thread.call_soon(calls.append, i)
        thread.run(calls.append, 3).result(5)
        assert calls == [0, 1, 2, 3]
    finally:
        thread.stop(10)
    # The relay is off: the caller hears so at once instead of waiting for an answer.
    with pytest.raises(RuntimeError):
        thread.run(thread.engine.traffic)
    with pytest.raises(RuntimeError):
        thread.call_soon(calls.append, 4)


def test_close_connections_from_another_thread_through_run():
    """What the app does: the UI's loop asks the engine's loop to close a tunnel and to
    count its bytes; the client sees a reset."""

    async def main() -> None:
        events: list[Event] = []
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            thread = EngineThread(_engine([http_upstream(proxy)], origin.address, events))
            # The stubs live on this loop: start and stop the thread without blocking it.
            await asyncio.to_thread(thread.start)
            try:
                address = thread.engine.addresses[0]
                reader, writer = await asyncio.open_connection(*address)
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
                (opened,) = [e for e in events if isinstance(e, ConnectionOpened)]
                counters, up, down = await asyncio.wrap_future(thread.run(thread.engine.traffic))
                assert counters == {opened.conn_id: (5, 5)} and (up, down) == (5, 5)

                closing = thread.run(thread.engine.close_connections, [opened.conn_id])
                assert await asyncio.wrap_future(closing) == 1
                got, error = await asyncio.wait_for(read_until_error(reader), 5)
                writer.close()
                assert got == b"" and isinstance(error, ConnectionResetError), error

                def closed() -> list[ConnectionClosed]:
                    return [e for e in events if isinstance(e, ConnectionClosed)]

                await until(lambda: len(closed()) == 1, 5, "the close event")
                assert closed()[0].reason is CloseReason.CLOSED_BY_USER
                _counters, up, down = await asyncio.wrap_future(thread.run(thread.engine.traffic))
                assert (_counters, up, down) == ({}, 5, 5)
            finally:
                await asyncio.to_thread(thread.stop, 10)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_controller_handle_passes_new_credentials_and_extra_listeners_to_the_engine():
    """controller/engine_relay.EngineRelay, the RelayHandle over an EngineThread: the calls
    the controller makes from its worker threads reach the engine on its loop."""
    from tray_proxy.controller.engine_relay import EngineRelay
    from tray_proxy.relay.secrets import Credentials, Secret
    from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

    upstream = UpstreamProxy("corp", UpstreamKind.HTTP, "127.0.0.1", 9, username="alice")
    thread = EngineThread(_engine([upstream], ("127.0.0.1", 9), []))
    thread.start()
    handle = EngineRelay(thread)
    try:
        port = handle.addresses[0][1]
        assert handle.set_extra_listen(["127.0.0.2"]) == (("127.0.0.2", port),)
        assert ("127.0.0.2", port) in handle.addresses
        creds = Credentials("alice", Secret("new"))
        handle.update_credentials("corp", creds)
        assert thread.run(thread.engine._credentials_of, upstream).result(5) == creds
        handle.update_credentials("corp", None)
        assert thread.run(thread.engine._credentials_of, upstream).result(5) is None
        handle.retry_credentials("corp")
        assert handle.set_extra_listen([]) == ()
    finally:
        handle.stop(10)
