"""NetworkWatcher (tray_proxy/netwatch.py) against the real kernel: a network namespace made
for each test, real `ip` commands, a real NETLINK_ROUTE socket, on asyncio and on uvloop.

The namespace's links have `addrgenmode none`, so the kernel adds no IPv6 link-local
address (and runs no duplicate address detection) a second after the link comes up: every
burst here is exactly the one the test made.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from tests.lab.netns import Namespace, run_tag, thread_in_namespace
from tray_proxy.netwatch import NetworkState, NetworkWatcher, count_changes, open_route_socket

pytestmark = pytest.mark.lab

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture
def ns() -> Iterator[Namespace]:
    """A fresh namespace with a link `d0` (up, no automatic IPv6 address)."""
    namespace = Namespace(f"{run_tag()}-nw", "netwatch")
    try:
        namespace.create()
        # This kernel has no dummy driver: a veth pair with both ends in the namespace.
        namespace.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        for dev in ("d0", "d1"):
            namespace.run(["ip", "link", "set", dev, "addrgenmode", "none"])
            namespace.run(["ip", "link", "set", dev, "up"])
        yield namespace
    finally:
        namespace.close()


def watcher_in(ns: Namespace, **kwargs: float) -> tuple[NetworkWatcher, list[float]]:
    """A watcher whose socket lives in `ns`; the list collects the loop time of each call."""
    calls: list[float] = []
    with thread_in_namespace(ns.name):
        sock = open_route_socket()
    watcher = NetworkWatcher(lambda: calls.append(time.monotonic()), sock=sock, **kwargs)
    return watcher, calls


async def ip(ns: Namespace, *args: str) -> None:
    await asyncio.to_thread(ns.run, ["ip", *args])


async def expect_calls(calls: list[float], count: int, quiet: float, timeout: float = 3.0) -> None:
    """Wait (bounded) until `calls` has `count` entries, then a few quiet periods more, and
    check that no further call came."""
    deadline = time.monotonic() + timeout
    while len(calls) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(calls) == count, f"{len(calls)} calls, expected {count}"
    await asyncio.sleep(quiet * 3)
    assert len(calls) == count, f"{len(calls)} calls after the burst, expected {count}"


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_one_call_per_burst_and_none_without_change(ns: Namespace, loop_name: str) -> None:
    quiet = 0.2

    async def main() -> None:
        watcher, calls = watcher_in(ns, quiet=quiet)
        watcher.start()
        try:
            await asyncio.sleep(1.0)
            assert calls == []  # nothing changed: nothing reported
            steps: list[tuple[str, ...]] = [
                ("-n", ns.name, "addr", "add", "10.77.0.1/24", "dev", "d0"),
                ("-n", ns.name, "-6", "addr", "add", "fd00:77::1/64", "dev", "d0", "nodad"),
                ("-n", ns.name, "route", "add", "10.78.0.0/16", "via", "10.77.0.2"),
                ("-n", ns.name, "link", "set", "d0", "down"),  # link, routes, addresses
                ("-n", ns.name, "link", "set", "d0", "up"),
                ("-n", ns.name, "addr", "del", "10.77.0.1/24", "dev", "d0"),
            ]
            for count, step in enumerate(steps, start=1):
                started = time.monotonic()
                await ip(ns, *step)
                await expect_calls(calls, count, quiet)
                assert calls[-1] - started < quiet + 0.5, step
            assert watcher.bursts == len(steps)
            assert watcher.messages >= len(steps)
        finally:
            watcher.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_renewals_and_other_non_changes_call_nothing(ns: Namespace, loop_name: str) -> None:
    """A DHCP renewal or an IPv6 router advertisement re-announces an address with new
    lifetimes: the kernel sends RTM_NEWADDR, and nothing a probe could see changed. So for
    an address there before the watcher started (known from its dump) and one added later,
    and for an MTU change."""
    quiet = 0.2
    ns.run(["ip", "addr", "add", "10.84.0.1/24", "dev", "d0", "valid_lft", "1000",
            "preferred_lft", "1000"])  # fmt: skip
    ns.run(["ip", "-6", "addr", "add", "fd00:84::1/64", "dev", "d0", "nodad", "valid_lft",
            "1000", "preferred_lft", "1000"])  # fmt: skip

    async def main() -> None:
        watcher, calls = watcher_in(ns, quiet=quiet)
        watcher.start()
        try:
            assert len(watcher.state) > 0  # the dump
            renewals = [
                ("addr", "change", "10.84.0.1/24", "dev", "d0", "valid_lft", "900",
                 "preferred_lft", "900"),
                ("-6", "addr", "change", "fd00:84::1/64", "dev", "d0", "nodad", "valid_lft",
                 "900", "preferred_lft", "900"),
                ("link", "set", "d0", "mtu", "1400"),
            ]  # fmt: skip
            for args in renewals:
                messages = watcher.messages
                await ip(ns, "-n", ns.name, *args)
                deadline = time.monotonic() + 2.0
                while watcher.messages == messages and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert watcher.messages > messages, args  # the kernel did announce it
            await asyncio.sleep(quiet * 3)
            assert calls == []
            # An address learned from a notification, then renewed.
            await ip(ns, "-n", ns.name, "addr", "add", "10.85.0.1/24", "dev", "d0",
                     "valid_lft", "1000", "preferred_lft", "1000")  # fmt: skip
            await expect_calls(calls, 1, quiet)
            await ip(ns, "-n", ns.name, "addr", "change", "10.85.0.1/24", "dev", "d0",
                     "valid_lft", "800", "preferred_lft", "800")  # fmt: skip
            await expect_calls(calls, 1, quiet)
            # A real change of the same address still counts: it becomes deprecated.
            await ip(ns, "-n", ns.name, "addr", "change", "10.85.0.1/24", "dev", "d0",
                     "valid_lft", "800", "preferred_lft", "0")  # fmt: skip
            await expect_calls(calls, 2, quiet)
        finally:
            watcher.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


def test_many_commands_in_one_burst_are_one_call(ns: Namespace) -> None:
    quiet = 0.3
    batch = "".join(f"addr add 10.79.0.{i}/32 dev d0\n" for i in range(1, 41))

    async def main() -> None:
        watcher, calls = watcher_in(ns, quiet=quiet)
        watcher.start()
        try:
            await asyncio.to_thread(ns.run, ["ip", "-batch", "-"], input=batch.encode())
            await expect_calls(calls, 1, quiet)
            assert watcher.messages >= 40
        finally:
            watcher.close()

    asyncio.run(main())


def test_a_burst_that_never_ends_still_reports_every_max_delay(ns: Namespace) -> None:
    """A flapping link: changes every 50 ms for 2 s. Reported at least every `max_delay`,
    not once per message and not only when the flapping stops."""
    quiet, max_delay, flap_for = 0.3, 0.6, 2.0
    stop = threading.Event()

    def flap() -> None:
        ends = time.monotonic() + flap_for
        up = False
        while time.monotonic() < ends and not stop.is_set():
            action = "add" if not up else "del"
            ns.run(["ip", "addr", action, "10.80.0.1/32", "dev", "d0"], check=False)
            up = not up
            time.sleep(0.05)

    async def main() -> None:
        watcher, calls = watcher_in(ns, quiet=quiet, max_delay=max_delay)
        watcher.start()
        try:
            started = time.monotonic()
            await asyncio.to_thread(flap)
            finished = time.monotonic()
            await asyncio.sleep(quiet * 3)
            during = [t for t in calls if t <= finished]
            assert len(during) >= int(flap_for / max_delay) - 1
            assert calls[0] - started <= max_delay + 0.3
            assert len(calls) <= int(flap_for / max_delay) + 2  # not per message
            assert watcher.messages > len(calls) * 3
        finally:
            stop.set()
            watcher.close()

    asyncio.run(main())


def test_an_overrun_socket_counts_as_a_change(ns: Namespace) -> None:
    """More messages than the socket holds (a VPN installing many routes while the loop was
    busy): the kernel drops some and says ENOBUFS; that is a change too, reported once."""
    batch = "".join(f"addr add 10.83.{i // 250}.{i % 250 + 1}/32 dev d0\n" for i in range(400))

    async def main() -> None:
        calls: list[int] = []
        with thread_in_namespace(ns.name):
            sock = open_route_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        watcher = NetworkWatcher(lambda: calls.append(1), quiet=0.1, sock=sock)
        try:
            # The loop does not read yet: the messages pile up past the buffer.
            await asyncio.to_thread(ns.run, ["ip", "-batch", "-"], input=batch.encode())
            watcher.start()
            deadline = time.monotonic() + 3.0
            while not calls and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert calls == [1]
            assert watcher.overruns >= 1
        finally:
            watcher.close()

    asyncio.run(main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_close_stops_calls_and_the_socket(ns: Namespace, loop_name: str) -> None:
    async def main() -> None:
        watcher, calls = watcher_in(ns, quiet=0.2)
        watcher.start()
        assert watcher.running
        # A change arrives, then the watcher closes before the burst is reported.
        await ip(ns, "-n", ns.name, "addr", "add", "10.81.0.1/24", "dev", "d0")
        deadline = time.monotonic() + 2.0
        while watcher.messages == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert watcher.messages > 0
        watcher.close()
        watcher.close()  # idempotent
        assert not watcher.running
        await ip(ns, "-n", ns.name, "addr", "del", "10.81.0.1/24", "dev", "d0")
        await asyncio.sleep(0.6)
        assert calls == []

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


def test_close_after_the_loop_is_gone(ns: Namespace) -> None:
    loop = asyncio.new_event_loop()
    watcher, _calls = watcher_in(ns)
    try:
        watcher.start(loop)
    finally:
        loop.close()
    watcher.close()  # shutdown order must not matter
    assert not watcher.running


def test_the_watcher_opens_its_own_socket_in_the_current_namespace(ns: Namespace) -> None:
    """Without `sock`, start() opens one in the namespace of the calling thread."""
    calls: list[int] = []

    def run() -> None:
        async def main() -> None:
            watcher = NetworkWatcher(lambda: calls.append(1), quiet=0.1)
            watcher.start()
            try:
                await ip(ns, "-n", ns.name, "addr", "add", "10.82.0.1/24", "dev", "d0")
                deadline = time.monotonic() + 3.0
                while not calls and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            finally:
                watcher.close()

        with thread_in_namespace(ns.name):
            asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert calls == [1]


# the message counter -------------------------------------------------------------------------

HDR = struct.Struct("=IHHII")


def message(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    body = HDR.pack(HDR.size + len(payload), kind, flags, 0, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def test_count_changes_reads_link_address_and_route_messages_only() -> None:
    data = message(16, b"x" * 5) + message(3) + message(21, b"abcd") + message(25)
    assert count_changes(data) == 3  # NLMSG_DONE (3) is not a change
    assert count_changes(data + b"\x01\x02") == 3  # a torn tail is ignored
    assert count_changes(HDR.pack(4, 16, 0, 0, 0)) == 0  # a length below the header
    assert count_changes(HDR.pack(400, 16, 0, 0, 0)) == 0  # a length past the datagram


@given(st.binary(max_size=512))
def test_count_changes_never_raises_on_any_bytes(data: bytes) -> None:
    assert 0 <= count_changes(data) <= len(data) // HDR.size


@given(st.lists(st.tuples(st.sampled_from([16, 17, 20, 21, 24, 25, 3]), st.binary(max_size=40),
                          st.sampled_from([0, 2]))))  # fmt: skip
def test_network_state_reads_any_messages(messages: list[tuple[int, bytes, int]]) -> None:
    """Random bodies (torn, short, garbage attributes) never raise: unreadable is a change."""
    state = NetworkState(limit=5)
    data = b"".join(message(kind, body, flags) for kind, body, flags in messages)
    assert 0 <= state.feed(data) <= len(messages)
    assert len(state) <= 5


def test_network_state_counts_what_changes() -> None:
    addr = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 3) + attr(2, bytes([10, 0, 0, 1]))
    renewed = addr + attr(6, b"\x01" * 16)  # IFA_CACHEINFO: lifetimes only
    state = NetworkState()
    assert state.feed(message(20, addr)) == 1  # new
    assert state.feed(message(20, renewed)) == 0  # same address, new lifetimes
    assert state.feed(message(21, addr)) == 1  # deleted
    assert state.feed(message(21, addr)) == 1  # deleting the unknown still counts
    assert state.feed(message(20, addr, flags=2)) == 0  # a dump answer: learnt, not a change
    assert state.feed(message(20, renewed)) == 0
    cloned = struct.pack("=BBBBBBBBI", socket.AF_INET6, 128, 0, 0, 254, 0, 0, 1, 0x200)
    assert state.feed(message(24, cloned)) == 0  # the IPv6 route cache is not the table
    assert state.feed(message(16, b"short")) == 1  # unreadable: a change

    # `ip route replace default via ... dev other`: only the new route is announced.
    def route(oif: int) -> bytes:
        head = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
        return head + attr(4, struct.pack("=I", oif))

    assert state.feed(message(24, route(3))) == 1
    assert state.feed(message(24, route(4), flags=0x100)) == 1  # replaced, now on device 4
    assert state.feed(message(24, route(3), flags=0x100)) == 1  # back: a change again
    assert state.feed(message(24, route(3))) == 0
    full = NetworkState(limit=1)
    full.feed(message(20, addr))
    other = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 4) + attr(2, bytes([10, 0, 0, 2]))
    assert full.feed(message(20, other)) == 1 and full.feed(message(20, other)) == 1
    assert full.overflowed


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_no_netlink_is_a_network_watch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where AF_NETLINK is unavailable (a sandbox), start() says so with NetworkWatchError
    and the caller keeps its periodic probe. A fake socket(): this machine has netlink."""
    from tray_proxy import netwatch

    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(97, "Address family not supported by protocol")

    loop = asyncio.new_event_loop()
    monkeypatch.setattr(netwatch.socket, "socket", refuse)
    try:
        with pytest.raises(netwatch.NetworkWatchError, match="netlink route socket"):
            NetworkWatcher(lambda: None).start(loop)
    finally:
        monkeypatch.undo()
        loop.close()
