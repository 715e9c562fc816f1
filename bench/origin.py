"""Plain-TCP origin for the benchmark, run as a script in the origin namespace (uvloop).

No TLS on purpose: the benchmark measures the relay, not TLS. The client's first byte picks
the mode, and none of them looks like TLS or HTTP, so the relay's host peek gives up at once:
  0x01 + 8-byte big-endian N   send N bytes, then close (bulk down)
  0x02 + 8-byte N + N bytes    answer 8 bytes (the count) once N arrived (bulk up; no
                               half-close: Squid ends a CONNECT tunnel at the first EOF)
  0x03 + 63 bytes, repeated    answer each 64-byte request with 64 bytes (latency, idle)
Prints READY on stdout once listening; exits on SIGTERM or when stdin closes.

Stdlib and uvloop only. Must not import tray_proxy, PySide6 or the lab modules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import struct
import sys
from typing import cast

MODE_DOWN = 1
MODE_UP = 2
MODE_PING = 3
PING_SIZE = 64
_BLOCK = memoryview(bytes(range(256)) * 4096)  # 1 MiB, never modified: safe to hand out
_SINK = bytearray(1 << 20)  # shared: every byte is consumed inside buffer_updated
_PONG = b"\x03" + b"o" * (PING_SIZE - 1)


class OriginProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = 0
        self.head = bytearray()
        self.received = 0
        self.to_send = 0
        self.expected = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(_SINK)

    def buffer_updated(self, nbytes: int) -> None:
        data = memoryview(_SINK)[:nbytes]
        if self.mode == 0:
            self.head += data
            self._start()
            return
        if self.mode == MODE_UP:
            self._count(nbytes)
        elif self.mode == MODE_PING:
            self._ping(nbytes)

    def _start(self) -> None:
        assert self.transport is not None
        first = self.head[0]
        if first == MODE_DOWN:
            if len(self.head) < 9:
                return
            self.mode = MODE_DOWN
            (self.to_send,) = struct.unpack("!Q", self.head[1:9])
            self._send_more()
        elif first == MODE_UP:
            if len(self.head) < 9:
                return
            self.mode = MODE_UP
            (self.expected,) = struct.unpack("!Q", self.head[1:9])
            self.received = 0
            self._count(len(self.head) - 9)
        elif first == MODE_PING:
            self.mode = MODE_PING
            self._ping(len(self.head))
        else:
            self.transport.abort()
        self.head = bytearray()

    def _count(self, nbytes: int) -> None:
        assert self.transport is not None
        self.received += nbytes
        if self.received >= self.expected and self.expected >= 0:
            self.transport.write(struct.pack("!Q", self.received))
            self.expected = -1  # answered once

    def _ping(self, nbytes: int) -> None:
        assert self.transport is not None
        self.received += nbytes
        answers, self.received = divmod(self.received, PING_SIZE)
        if answers:
            self.transport.write(_PONG * answers)

    def _send_more(self) -> None:
        assert self.transport is not None
        while self.to_send > 0 and not self.paused:
            n = min(len(_BLOCK), self.to_send)
            self.to_send -= n
            self.transport.write(_BLOCK[:n])
        if self.to_send == 0:
            self.transport.close()  # flushes what is buffered, then FIN

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == MODE_DOWN:
            self._send_more()

    def eof_received(self) -> bool:
        return False  # close (after flushing what is buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 1024):  # EOF: the bench is gone
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    server = await loop.create_server(OriginProtocol, host, port, backlog=4096, reuse_address=True)
    print("READY", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=443)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
