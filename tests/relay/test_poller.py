"""Poller: the private epoll set the tunnels and openings use, on real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import pytest

from tests.relay.stubs import tcp_pair, until
from tray_proxy.relay.poller import Poller


def test_reader_runs_while_data_waits_and_stops_when_removed(run):
    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        got: list[bytes] = []
        try:
            poller.add_reader(b.fileno(), lambda: got.append(b.recv(3)))
            a.send(b"abcdef")
            await until(lambda: b"".join(got) == b"abcdef", what="both reads")
            assert poller.remove_reader(b.fileno())
            assert not poller.remove_reader(b.fileno())  # twice is harmless
            assert len(poller) == 0
            a.send(b"more")
            await asyncio.sleep(0.05)
            assert b"".join(got) == b"abcdef"  # nothing read after removal
        finally:
            poller.close()
            a.close()
            b.close()

    run(main)


def test_reader_and_writer_on_one_socket_and_replacing_a_callback(run):
    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        calls: list[str] = []
        try:
            poller.add_writer(a.fileno(), lambda: calls.append("w1"))
            await until(lambda: "w1" in calls, what="writable")
            poller.add_writer(a.fileno(), lambda: calls.append("w2"))  # replaces w1
            poller.add_reader(a.fileno(), lambda: calls.append("r") or a.recv(10))
            b.send(b"x")
            await until(lambda: "r" in calls and "w2" in calls, what="both callbacks")
            poller.remove_writer(a.fileno())
            calls.clear()
            b.send(b"y")
            await until(lambda: "r" in calls, what="the reader alone")
            assert "w1" not in calls and "w2" not in calls
            assert len(poller) == 1
        finally:
            poller.close()
            a.close()
            b.close()

    run(main)


def test_a_reset_behind_data_reaches_the_reader(run):
    """The reader sees the data, then the reset: nothing is swallowed by the loop."""

    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        seen: list[object] = []

        def on_readable() -> None:
            try:
                seen.append(b.recv(1 << 16))  # one read per call, as a careless reader does
            except ConnectionResetError as exc:
                seen.append(exc)
                poller.remove_reader(b.fileno())

        try:
            a.send(b"x" * 1000)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            await asyncio.sleep(0.02)  # both queued before anyone looks
            poller.add_reader(b.fileno(), on_readable)
            await until(lambda: any(isinstance(x, ConnectionResetError) for x in seen), 5)
            assert seen[0] == b"x" * 1000
        finally:
            poller.close()
            b.close()

    run(main)


def test_a_number_closed_without_removal_recovers_on_its_next_change(run):
    """The contract is remove-then-close (the engine keeps it: test_opening checks that no
    registration outlives its connection). If a number is closed while registered and then
    reused, the next change of its registration still reaches the kernel."""

    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        fd = b.fileno()
        poller.add_reader(fd, lambda: None)
        b.close()  # the kernel forgets the registration with the socket
        spare = [tcp_pair() for _ in range(2)]
        try:
            reused = next(s for pair in spare for s in pair if s.fileno() == fd)
            writable: list[int] = []
            poller.add_writer(fd, lambda: writable.append(1))  # a change: MOD fails, ADD
            await until(lambda: writable, what="the reused number's writer")
            got: list[bytes] = []
            poller.remove_writer(fd)
            poller.remove_reader(fd)
            poller.add_reader(fd, lambda: got.append(reused.recv(10)))
            peer = next(p for pair in spare if reused in pair for p in pair if p is not reused)
            peer.send(b"hello")
            await until(lambda: got == [b"hello"], what="the reused number's reader")
            poller.remove_reader(fd)
            assert len(poller) == 0
        finally:
            poller.close()
            a.close()
            for pair in spare:
                for s in pair:
                    s.close()

    run(main)


def test_a_failing_callback_is_logged_and_the_others_still_run(run, caplog):
    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        c, d = tcp_pair()
        got: list[bytes] = []

        def broken() -> None:
            b.recv(10)
            raise RuntimeError("bug")

        try:
            poller.add_reader(b.fileno(), broken)
            poller.add_reader(d.fileno(), lambda: got.append(d.recv(10)))
            a.send(b"1")
            c.send(b"2")
            await until(lambda: got == [b"2"], what="the healthy reader")
            await until(lambda: "a socket callback failed" in caplog.text, what="the log line")
        finally:
            poller.close()
            for s in (a, b, c, d):
                s.close()

    with caplog.at_level(logging.ERROR, logger="tray_proxy.relay.poller"):
        run(main)


def test_close_stops_everything_and_is_idempotent(run):
    async def main():
        poller = Poller(asyncio.get_running_loop())
        a, b = tcp_pair()
        calls: list[int] = []
        try:
            poller.add_reader(b.fileno(), lambda: calls.append(1))
            poller.close()
            poller.close()
            a.send(b"x")
            await asyncio.sleep(0.05)
            assert calls == []
            assert len(poller) == 0
        finally:
            a.close()
            b.close()

    run(main)


@pytest.mark.parametrize("count", [600])
def test_more_ready_sockets_than_one_dispatch_takes(run, count):
    """Level-triggered: sockets beyond one batch are served on the next dispatch."""

    async def main():
        poller = Poller(asyncio.get_running_loop())
        pairs = [tcp_pair() for _ in range(count)]
        served: set[int] = set()
        try:
            for i, (_a, b) in enumerate(pairs):

                def on_readable(i: int = i, b: socket.socket = b) -> None:
                    b.recv(10)
                    served.add(i)
                    poller.remove_reader(b.fileno())

                poller.add_reader(b.fileno(), on_readable)
            for a, _b in pairs:
                a.send(b"x")
            await until(lambda: len(served) == count, what="every socket")
        finally:
            poller.close()
            for a, b in pairs:
                a.close()
                b.close()

    run(main)
