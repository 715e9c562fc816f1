"""Tunnel and PipePool on real loopback TCP pairs: bytes, backpressure, half-close, resets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

import pytest

from tests.relay.stubs import pattern, sha, until
from tray_proxy.relay.pipe import PipePool, Tunnel
from tray_proxy.relay.records import CloseReason, ConnectionRecord

MiB = 1 << 20


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Rig:
    """client_peer <-> [client | Tunnel | upstream] <-> upstream_peer"""

    def __init__(self, pool: PipePool | None = None) -> None:
        self.client_peer, self.client = tcp_pair()
        self.upstream, self.upstream_peer = tcp_pair()
        self.record = ConnectionRecord(id=1, client=("127.0.0.1", 1))
        self.closes: list[tuple[CloseReason, str]] = []
        self.pool = pool or PipePool()
        self.tunnel = Tunnel(
            asyncio.get_running_loop(),
            self.pool,
            self.client,
            self.upstream,
            self.record,
            lambda reason, detail: self.closes.append((reason, detail)),
        )
        self.tunnel.start()

    def close(self) -> None:
        self.tunnel.close(CloseReason.SHUTDOWN, "test over")
        self.pool.close()
        for sock in (self.client_peer, self.upstream_peer):
            sock.close()


@contextlib.asynccontextmanager
async def rig(pool: PipePool | None = None):
    r = Rig(pool)
    try:
        yield r
    finally:
        r.close()


async def send_all(sock: socket.socket, data: bytes, eof: bool = True) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if eof:
        sock.shutdown(socket.SHUT_WR)


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 18):
        out += chunk
    return bytes(out)


def test_bytes_both_ways_then_done(run):
    up, down = pattern(11, 8 * MiB), pattern(12, 8 * MiB)

    async def main():
        async with rig() as r:
            got_up, got_down, _, _ = await asyncio.gather(
                recv_all(r.upstream_peer),
                recv_all(r.client_peer),
                send_all(r.client_peer, up),
                send_all(r.upstream_peer, down),
            )
            assert sha(got_up) == sha(up) and sha(got_down) == sha(down)
            await until(lambda: r.closes, what="tunnel close")
            assert r.closes == [(CloseReason.DONE, "")]
            assert (r.record.bytes_up, r.record.bytes_down) == (len(up), len(down))
            assert r.client.fileno() == -1 and r.upstream.fileno() == -1
            # Pipes went back to the pool: a couple, not one per chunk.
            assert 1 <= r.pool.created <= 2

    run(main)


@pytest.mark.parametrize("first", ["client", "upstream"])
def test_half_close_keeps_the_other_direction(run, first):
    async def main():
        async with rig() as r:
            closer, closer_far = (
                (r.client_peer, r.upstream_peer)
                if first == "client"
                else (r.upstream_peer, r.client_peer)
            )
            await send_all(closer, b"last words")  # then SHUT_WR
            assert await recv_all(closer_far) == b"last words"  # EOF passed on
            # The other way still flows, long after the EOF.
            late = pattern(13, 3 * MiB)
            got, _ = await asyncio.gather(recv_all(closer), send_all(closer_far, late))
            assert sha(got) == sha(late)
            await until(lambda: r.closes, what="tunnel close")
            assert r.closes == [(CloseReason.DONE, "")]

    run(main)


@pytest.mark.parametrize("side", ["upstream", "client"])
def test_reset_on_one_side_resets_the_other(run, side):
    async def main():
        async with rig() as r:
            loop = asyncio.get_running_loop()
            resetter, other = (
                (r.upstream_peer, r.client_peer)
                if side == "upstream"
                else (r.client_peer, r.upstream_peer)
            )
            await loop.sock_sendall(resetter, b"hello")
            assert await loop.sock_recv(other, 16) == b"hello"
            resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            resetter.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(recv_all(other), 5)
            await until(lambda: r.closes, what="tunnel close")
            ((reason, detail),) = r.closes
            expected = (
                CloseReason.UPSTREAM_RESET if side == "upstream" else CloseReason.CLIENT_RESET
            )
            assert reason is expected
            assert detail.startswith(f"{side} side:")

    run(main)


def test_backpressure_bounds_what_the_tunnel_holds(run):
    """A destination that does not read stops the tunnel reading its source."""
    total = 64 * MiB
    data = pattern(14, total)

    async def main():
        async with rig() as r:
            sender = asyncio.ensure_future(send_all(r.client_peer, data))
            # Wait until the byte counter stands still while the tunnel holds undelivered
            # bytes: the pipe and the socket buffers are full.
            loop = asyncio.get_running_loop()
            last, since = -1, loop.time()
            deadline = loop.time() + 10
            while loop.time() - since < 0.2 or not r.tunnel.up.pending:
                assert loop.time() < deadline, "bytes_up never settled"
                if r.record.bytes_up != last:
                    last, since = r.record.bytes_up, loop.time()
                await asyncio.sleep(0.01)
            assert not sender.done()
            assert 0 < r.record.bytes_up < 40 * MiB
            assert r.tunnel.up.pending > 0  # holding bytes it cannot deliver ...
            assert r.tunnel.up.pending <= r.tunnel.up.pipe[2]  # ... at most one pipe full
            got = await recv_all(r.upstream_peer)
            await sender
            assert sha(got) == sha(data)

    run(main)


def test_close_is_idempotent_and_resets_when_asked(run):
    async def main():
        async with rig() as r:
            loop = asyncio.get_running_loop()
            r.tunnel.close(CloseReason.IDLE_TIMEOUT, "idle", reset=True)
            r.tunnel.close(CloseReason.DONE, "")
            assert r.closes == [(CloseReason.IDLE_TIMEOUT, "idle")]
            for peer in (r.client_peer, r.upstream_peer):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(loop.sock_recv(peer, 16), 5)

    run(main)


class StarvedPool(PipePool):
    """A pool that cannot make a pipe for the first `failures` requests (as under EMFILE)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def take(self) -> tuple[int, int, int]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().take()


def test_no_pipe_available_pauses_instead_of_failing(run):
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        async with rig(StarvedPool(failures=3)) as r:
            data = pattern(15, 1 * MiB)
            got, _ = await asyncio.gather(recv_all(r.upstream_peer), send_all(r.client_peer, data))
            assert sha(got) == sha(data)
            assert r.pool.failures == 0
        assert errors == [], errors

    run(main)


def test_pool_lends_and_keeps_a_bounded_number():
    pool = PipePool(keep=2)
    pipes = [pool.take() for _ in range(4)]
    assert pool.created == 4
    for pipe in pipes:
        assert pipe[2] >= 65536
        pool.give_back(pipe)
    # Two kept, two closed.
    open_fds = [p for p in pipes if _is_open(p[0])]
    assert len(open_fds) == 2
    again = pool.take()
    assert again in pipes and pool.created == 4
    pool.give_back(again)
    pool.close()
    assert not any(_is_open(p[0]) or _is_open(p[1]) for p in pipes)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
