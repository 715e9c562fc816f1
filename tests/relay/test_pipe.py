"""Tunnel and PipePool on real loopback TCP pairs: bytes, backpressure, half-close, resets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

import pytest

from tests.relay.stubs import pattern, sha, tcp_pair, until
from tray_proxy.relay import pipe as pipe_module
from tray_proxy.relay.pipe import PipePool, ReadBatching, Tunnel
from tray_proxy.relay.poller import Poller
from tray_proxy.relay.records import CloseReason, ConnectionRecord

MiB = 1 << 20


class Rig:
    """client_peer <-> [client | Tunnel | upstream] <-> upstream_peer"""

    def __init__(
        self,
        pool: PipePool | None = None,
        batching: ReadBatching | None = None,
        start: bool = True,
    ) -> None:
        self.client_peer, self.client = tcp_pair()
        self.upstream, self.upstream_peer = tcp_pair()
        self.record = ConnectionRecord(id=1, client=("127.0.0.1", 1))
        self.closes: list[tuple[CloseReason, str]] = []
        self.pool = pool or PipePool()
        self.poller = Poller(asyncio.get_running_loop())
        self.tunnel = Tunnel(
            asyncio.get_running_loop(),
            self.pool,
            self.poller,
            self.client,
            self.upstream,
            self.record,
            lambda record, reason, detail: self.closes.append((reason, detail)),
            batching,
        )
        if start:
            self.tunnel.start()

    def close(self) -> None:
        self.tunnel.close(CloseReason.SHUTDOWN, "test over")
        self.pool.close()
        self.poller.close()
        for sock in (self.client_peer, self.upstream_peer):
            sock.close()


@contextlib.asynccontextmanager
async def rig(
    pool: PipePool | None = None, batching: ReadBatching | None = None, start: bool = True
):
    r = Rig(pool, batching, start)
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


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("started", [True, False], ids=["tunnel-running", "before-start"])
def test_reset_right_behind_data_is_not_lost(run, started):
    """Data and RST arrive together: the data goes on, then the reset (uvloop once dropped
    the reset when the reader took the data and left the error pending)."""

    async def main():
        async with rig(start=started) as r:
            r.upstream_peer.send(b"x" * 5000)
            _reset(r.upstream_peer)
            if not started:
                await asyncio.sleep(0.05)  # both are queued before the tunnel looks
                r.tunnel.start()
            got = bytearray()
            with pytest.raises(ConnectionResetError):
                while chunk := await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(r.client_peer, 65536), 5
                ):
                    got += chunk
            assert len(got) <= 5000
            await until(lambda: r.closes, what="tunnel close", timeout=5)
            assert r.closes[0][0] is CloseReason.UPSTREAM_RESET

    run(main)


def test_batching_raises_the_mark_and_releases_a_tail(run):
    """A fast direction reads in batches (SO_RCVLOWAT); a small tail after the burst still
    arrives promptly, and batching ends when the flow stops."""
    burst = pattern(21, 16 * MiB)

    async def main():
        loop = asyncio.get_running_loop()
        batching = ReadBatching(loop)
        marks: list[int] = []
        async with rig(batching=batching) as r:
            upstream_socket = r.upstream

            async def watch() -> None:
                for _ in range(2000):  # bounded: 2,000 x 1 ms
                    marks.append(upstream_socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            got, _ = await asyncio.gather(
                _recv_exactly(r.client_peer, len(burst)), send_all(r.upstream_peer, burst, False)
            )
            assert sha(got) == sha(burst)
            # A tail far below any mark, then nothing: it must not wait for more bytes.
            await send_all(r.upstream_peer, b"tail", eof=False)
            # Without the release it would sit below the mark until the idle timeout.
            assert await asyncio.wait_for(_recv_exactly(r.client_peer, 4), 5) == b"tail"
            await until(lambda: len(batching) == 0, what="batching to end", timeout=5)
            watcher.cancel()
            assert max(marks) >= pipe_module.BATCH_START, marks[:20]
            assert upstream_socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1

    run(main)


@pytest.mark.parametrize("deep", [True, False], ids=["deep-destination", "young-destination"])
def test_a_batching_direction_waits_for_room_on_the_tick_once_the_destination_is_deep(
    run, monkeypatch, deep
):
    """Bulk into a slow reader. Once the destination's send buffer is deep, a full one is
    retried on the batching tick instead of on each EPOLLOUT (a socket reports room once a
    third of its buffer is free, and each report would wake the loop); a young one, whose
    buffer could run dry within a tick, is waited for on EPOLLOUT. Every byte arrives."""
    monkeypatch.setattr(pipe_module, "DEEP_SNDBUF", 64 * 1024 if deep else 1 << 40)
    burst = pattern(22, 48 * MiB)

    async def main():
        loop = asyncio.get_running_loop()
        batching = ReadBatching(loop)
        async with rig(batching=batching) as r:

            async def slow_reader() -> bytes:
                out = bytearray()
                for _ in range(200_000):  # bounded; each read brings bytes or ends
                    chunk = await loop.sock_recv(r.client_peer, 1 << 20)
                    if not chunk:
                        break
                    out += chunk
                    if len(out) >= len(burst):
                        break
                    await asyncio.sleep(0.001)
                return bytes(out)

            got, _ = await asyncio.wait_for(
                asyncio.gather(slow_reader(), send_all(r.upstream_peer, burst, False)), 60
            )
            assert sha(got) == sha(burst)
            if deep:
                assert batching.room_waits > 0
            else:
                assert batching.room_waits == 0
                assert r.tunnel.down.room_watched
            await until(lambda: len(batching) == 0, what="batching to end", timeout=5)

    run(main)


def test_a_stalled_reader_is_waited_for_on_epollout_not_polled(run, monkeypatch):
    """A deep destination whose reader stops (a paused download): after a tick that moved
    nothing, the tunnel waits on EPOLLOUT instead of asking again every tick; when the
    reader resumes, every byte arrives."""
    monkeypatch.setattr(pipe_module, "DEEP_SNDBUF", 64 * 1024)
    burst = pattern(23, 32 * MiB)

    async def main():
        loop = asyncio.get_running_loop()
        batching = ReadBatching(loop)
        async with rig(batching=batching) as r:
            sender = asyncio.ensure_future(send_all(r.upstream_peer, burst, False))
            # Nobody reads the client side: the tunnel fills it, waits on the tick, and
            # then, seeing no progress, on EPOLLOUT.
            await until(lambda: r.tunnel.down.room_watched, what="EPOLLOUT watch", timeout=10)
            assert batching.room_waits > 0
            waits = batching.room_waits
            # Ten ticks later, it has not been asked again.
            await asyncio.sleep(10 * pipe_module.BATCH_TICK)
            assert batching.room_waits == waits
            got = await asyncio.wait_for(_recv_exactly(r.client_peer, len(burst)), 30)
            await asyncio.wait_for(sender, 10)
            assert sha(got) == sha(burst)

    run(main)


def test_small_exchanges_never_batch(run):
    async def main():
        batching = ReadBatching(asyncio.get_running_loop())
        async with rig(batching=batching) as r:
            loop = asyncio.get_running_loop()
            for i in range(50):
                message = pattern(i, 2000)
                await loop.sock_sendall(r.upstream_peer, message)
                assert await _recv_exactly(r.client_peer, len(message)) == message
                assert len(batching) == 0
            assert r.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1

    run(main)


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, min(1 << 18, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


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
