"""Early data on by default (`relay.early_data = "auto"`, issue 15 section 7): through a
real Squid the first tunnel proves that the proxy keeps the ClientHello written behind the
CONNECT; through a proxy that drops it, HTTPS still works, one wait later, and after two
such waits the relay stops sending early bytes to that proxy.

Real components: the real RelayEngine in-process with default settings (its loop thread
joined the lab's client namespace), the lab's nft redirect, real curl with no proxy
settings, a real Squid 5.7 and the lab's TLS origin. The dropping proxy is a fake
(`DroppingProxy`): no real proxy that drops those bytes can be run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.integration.engine_in_lab import EngineInLab
from tests.integration.relay import allocate_port
from tests.lab.environment import Lab
from tests.lab.squid import SquidProxy
from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import EventBus
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

pytestmark = pytest.mark.lab

SQUID_PORT = 3147
DROPPING_PORT = 3148
WAIT = 1.0  # the relay's wait for a server's answer on a near proxy: max(1 s, 4 x answer)
IO_LIMIT = 30.0  # no fake-proxy step waits longer than this


class LabRelay(EngineInLab):
    """A RelayEngine with default settings (but its port) in the client namespace, through
    one HTTP upstream without credentials; `stats()` copies its counters."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        super().__init__(lab.client.name)
        self.upstream = UpstreamProxy("corp", UpstreamKind.HTTP, host, port)
        self.port = allocate_port(lab)
        self.engine: RelayEngine | None = None

    async def _main(self) -> None:
        settings = RelaySettings(port=self.port, listen=("127.0.0.1",))
        assert settings.early_data == "auto"  # the default under test
        engine = self.engine = RelayEngine(settings, [self.upstream], None, EventBus())
        await engine.start()
        try:
            await self.serve()
        finally:
            await engine.stop(drain_timeout=0.5)

    def stats(self) -> Counter[str]:
        assert self._loop is not None and self.engine is not None
        engine = self.engine

        async def copy() -> Counter[str]:
            return Counter(engine.stats)

        return asyncio.run_coroutine_threadsafe(copy(), self._loop).result(10)


class DroppingProxy(EngineInLab):
    """A fake HTTP CONNECT proxy in the proxy namespace, of the naive kind early data must
    survive: it reads the CONNECT with one recv, throws away whatever came behind the head
    in that read, answers 200 and tunnels the rest to the lab origin (at the CONNECT's
    port, whatever name it gives). `firsts` holds each connection's first read."""

    def __init__(self, lab: Lab, port: int) -> None:
        super().__init__(lab.proxy.name)
        assert lab.proxy.v4 is not None and lab.origins.v4 is not None
        self.host = lab.proxy.v4
        self.port = port
        self.origin = lab.origins.v4
        self.firsts: list[bytes] = []
        self.lock = threading.Lock()

    async def _main(self) -> None:
        server = await asyncio.start_server(self._handle, self.host, self.port)
        try:
            await self.serve()
        finally:
            server.close()
            await server.wait_closed()

    def connect_reads(self) -> list[bytes]:
        """The first reads that held a CONNECT (spares that never spoke are left out)."""
        with self.lock:
            return [f for f in self.firsts if f.startswith(b"CONNECT ")]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin: asyncio.StreamWriter | None = None
        try:
            first = await asyncio.wait_for(reader.read(65536), IO_LIMIT)
            with self.lock:
                self.firsts.append(first)
            head = first.partition(b"\r\n\r\n")[0]
            target = head.split(b"\r\n")[0].split(b" ")
            if len(target) != 3 or target[0] != b"CONNECT":
                return
            port = int(target[1].rpartition(b":")[2])
            from_origin, to_origin = await asyncio.wait_for(
                asyncio.open_connection(self.origin, port), IO_LIMIT
            )
            origin = to_origin
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pump(reader, to_origin), _pump(from_origin, writer))
        except (OSError, ValueError, asyncio.TimeoutError):
            pass
        finally:
            for w in (writer, origin):
                if w is not None:
                    w.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await asyncio.wait_for(src.read(65536), IO_LIMIT):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()


def _fetch(lab: Lab) -> tuple[int, float]:
    """curl with no proxy settings (the redirect takes it to the relay): status, seconds."""
    started = time.monotonic()
    result = lab.curl(lab.origins.url("https", "/health"), max_time=20)
    return result.http_code, time.monotonic() - started


def _redirect(lab: Lab, relay: LabRelay):  # type: ignore[no-untyped-def]
    return lab.redirect(relay.port, exclude=[a for a in (lab.proxy.v4, lab.proxy.v6) if a])


def test_squid_keeps_early_bytes_so_the_default_proves_it(
    lab: Lab, squid_factory: Callable[..., SquidProxy]
) -> None:
    squid = squid_factory(port=SQUID_PORT, auth="none", name="squid-early-data")
    with LabRelay(lab, squid.host, squid.port) as relay, _redirect(lab, relay):
        for _ in range(3):
            code, _took = _fetch(lab)
            assert code == 200
        stats = relay.stats()
        assert stats["early_proven"] == 1, stats  # the first tunnel proved it, once
        assert stats["early_fallback"] == 0 and stats["early_refused"] == 0, stats


def test_a_proxy_that_drops_early_bytes_costs_one_wait_then_none(lab: Lab) -> None:
    with (
        DroppingProxy(lab, DROPPING_PORT) as proxy,
        LabRelay(lab, proxy.host, proxy.port) as relay,
        _redirect(lab, relay),
    ):
        took = []
        for _ in range(3):
            code, seconds = _fetch(lab)
            assert code == 200
            took.append(seconds)
        # The first two each waited for an answer that never came, then went again.
        assert WAIT <= took[0] < WAIT + 2.0, took
        assert WAIT <= took[1] < WAIT + 2.0, took
        assert took[2] < WAIT, took  # no early bytes any more: no wait
        stats = relay.stats()
        assert stats["early_fallback"] == 2 and stats["early_refused"] == 1, stats
        assert stats["early_proven"] == 0, stats
        behind = [f.partition(b"\r\n\r\n")[2] != b"" for f in proxy.connect_reads()]
        # Two tunnels each for the first two fetches (early bytes, then none), one for the
        # third (none).
        assert behind == [True, False, True, False, False], behind
