"""Process attribution with real sockets: this process's, and real child processes' (python
-c, connecting to a listener of this test and waiting). Every answer comes through the
Attributor on a real asyncio loop, from its child process, in batches. What a test
changes inside the lookup (a slow pass, /proc instead of sock_diag) it changes in that
child: `worker()` runs the child as a script that patches, then serves.

The only fake is `docker` (Docker cannot run here): an executable on PATH that prints the
output formats of `docker network ls --quiet --no-trunc` and `docker network inspect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tray_proxy.monitor import attribution
from tray_proxy.monitor.attribution import Attributor, ProcessLookup
from tray_proxy.monitor.rows import ProcessInfo
from tray_proxy.relay.records import Address

Request = tuple[int, Address, Address | None]
Answers = dict[int, ProcessInfo | None]

MY_USER = pwd.getpwuid(os.geteuid()).pw_name
ANSWER_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


# helpers ---------------------------------------------------------------------------------------


class Collector:
    """The `deliver` callback: records every answer, on which thread, in how many batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self.loop = loop
        self.expected = expected
        self.answers: Answers = {}
        self.batches = 0
        self.threads: set[int] = set()
        self.done: asyncio.Future[None] = loop.create_future()

    def __call__(self, batch: list[tuple[int, ProcessInfo | None]]) -> None:
        self.threads.add(threading.get_ident())
        self.batches += 1
        for conn_id, info in batch:
            assert conn_id not in self.answers, f"{conn_id} answered twice"
            self.answers[conn_id] = info
        if len(self.answers) >= self.expected and not self.done.done():
            self.done.set_result(None)


def attribute(
    requests: Sequence[Request],
    *,
    delay: float = 0.02,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> tuple[Answers, int, Collector]:
    """Ask an Attributor on a fresh loop; wait (bounded) for every answer."""

    async def main() -> tuple[Answers, int, Collector]:
        loop = asyncio.get_running_loop()
        collector = Collector(loop, len(requests))
        attributor = Attributor(loop, collector, delay=delay)
        try:
            for request in requests:
                attributor.request(*request)
            await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
        finally:
            attributor.close()
        assert collector.threads == {threading.get_ident()}, "deliver ran off the loop thread"
        return collector.answers, attributor.passes, collector

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


@contextlib.contextmanager
def listener(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family, backlog=256) as sock:
        yield sock


CHILD = textwrap.dedent(
    """
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    sys.stdin.readline()  # "go": every child connects at the same moment
    sock = socket.create_connection((host, port))
    local = sock.getsockname()
    print(local[0], local[1], flush=True)
    if sys.argv[3] == "wait":
        sys.stdin.read()  # until the test closes our stdin
    elif sys.argv[3] == "reset":
        import struct
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: the socket is gone at once
    """
)


class Child:
    """A python process that connects to `target` once told to, and reports its address."""

    def __init__(self, target: Address, mode: str = "wait") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, target[0], str(target[1]), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.local: Address = ("", 0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def read_address(self) -> Address:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert len(line) == 2, f"child {self.pid} did not connect"
        self.local = (line[0], int(line[1]))
        return self.local

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def children(target: Address, count: int, mode: str = "wait") -> Iterator[list[Child]]:
    made: list[Child] = []
    try:
        for _ in range(count):
            made.append(Child(target, mode))
        yield made
    finally:
        for child in made:
            child.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


def tcp_state(local: Address, remote: Address) -> set[str]:
    """The states of sockets with this 4-tuple, from ss (for waiting on the kernel)."""
    out = subprocess.run(
        ["ss", "-tanH", "src", f"{local[0]}:{local[1]}", "dst", f"{remote[0]}:{remote[1]}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def assert_me(info: ProcessInfo | None) -> None:
    assert info is not None
    assert info.pid == os.getpid()
    assert info.exe == os.path.realpath(sys.executable)
    assert info.user == MY_USER
    assert not info.exited and not info.remote and info.container is None


def worker(monkeypatch: pytest.MonkeyPatch, patch: str) -> None:
    """The Attributor's child runs `patch` (Python, with `attribution` and `ProcessLookup`
    imported) before it serves."""
    script = textwrap.dedent(
        """
        import functools, os, pathlib, sys, time
        from tray_proxy.monitor import attribution, attribution_worker
        from tray_proxy.monitor.attribution import ProcessLookup
        """
    )
    script += textwrap.dedent(patch) + "\nsys.exit(attribution_worker.main())\n"
    monkeypatch.setattr(attribution, "_WORKER", ["-c", script])


@pytest.fixture(params=["sock_diag", "proc"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways to read the socket table: netlink sock_diag, and /proc/net/tcp{,6}."""
    if request.param == "proc":
        worker(
            monkeypatch,
            """
            attribution.ProcessLookup = functools.partial(ProcessLookup, use_sock_diag=False)
            """,
        )
    return str(request.param)


# this process's own sockets ----------------------------------------------------------------------


def test_own_connections_ipv4_ipv6_and_mapped_forms(method: str) -> None:
    with (
        listener("127.0.0.1") as v4,
        listener("::1") as v6,
        socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as dual,
        socket.create_connection(v4.getsockname()) as a,
        socket.create_connection(v6.getsockname()[:2]) as b,
        socket.create_connection(("127.0.0.1", dual.getsockname()[1])) as c,
    ):
        requests: list[Request] = [
            (1, a.getsockname(), a.getpeername()),
            (2, b.getsockname()[:2], b.getpeername()[:2]),
            # How a dual-stack relay listener sees an IPv4 client: IPv4-mapped.
            (3, (f"::ffff:{a.getsockname()[0]}", a.getsockname()[1]), a.getpeername()),
            # A dual-stack program socket (mapped on its side), asked in plain IPv4.
            (4, c.getsockname(), ("127.0.0.1", dual.getsockname()[1])),
        ]
        answers, passes, _ = attribute(requests)
    assert sorted(answers) == [1, 2, 3, 4]
    for info in answers.values():
        assert_me(info)
    assert passes == 1


def test_on_uvloop() -> None:
    """The engine's loop in production."""
    import uvloop

    with listener() as server, socket.create_connection(server.getsockname()) as sock:
        answers, passes, _ = attribute(
            [(1, sock.getsockname(), sock.getpeername())], loop_factory=uvloop.new_event_loop
        )
    assert_me(answers[1])
    assert passes == 1


def test_answers_read_on_a_timer_with_answer_interval() -> None:
    """Headless `run` (the relay on this loop): the answers of several passes are read every
    answer_interval, in one delivery, and the child's pipe wakes the loop for none of them."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        collector = Collector(loop, 3)
        attributor = Attributor(loop, collector, delay=0.0, answer_interval=0.5)
        try:
            with listener() as server:
                socks = [socket.create_connection(server.getsockname()) for _ in range(3)]
                try:
                    for n, sock in enumerate(socks, 1):
                        attributor.request(n, sock.getsockname(), sock.getpeername())
                        # Each its own pass: the child answers each before the next request.
                        await asyncio.sleep(0.05)
                    await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
                finally:
                    for sock in socks:
                        sock.close()
            for n in (1, 2, 3):
                assert_me(collector.answers[n])
            child = attributor._child
            assert child is not None and child.stdout is not None
            assert not loop.remove_reader(child.stdout.fileno()), "a reader per pass"
            assert collector.batches < attributor.passes or attributor.passes == 1
        finally:
            attributor.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_headless_requests_made_together_are_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headless `run` (answer_interval > 0, on the loop): the connections of one batch of
    events go to the child in one write, not one write each (under load, a system call per
    connection); each is answered once."""
    import uvloop

    writes: list[int] = []
    real_write = os.write

    async def main() -> None:
        loop = asyncio.get_running_loop()
        collector = Collector(loop, 5)
        attributor = Attributor(loop, collector, delay=0.0, answer_interval=0.02)
        try:
            await asyncio.sleep(0.05)  # the child starts (prestart)
            child = attributor._child
            assert child is not None and child.stdin is not None
            stdin = child.stdin.fileno()

            def counting(fd: int, data: bytes) -> int:
                if fd == stdin:
                    writes.append(len(data))
                return real_write(fd, data)

            with listener() as server:
                socks = [socket.create_connection(server.getsockname()) for _ in range(5)]
                try:
                    monkeypatch.setattr(attribution.os, "write", counting)
                    attributor.request_all(
                        [(n, s.getsockname(), s.getpeername()) for n, s in enumerate(socks, 1)]
                    )
                    monkeypatch.undo()
                    await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
                finally:
                    for sock in socks:
                        sock.close()
            for n in range(1, 6):
                assert_me(collector.answers[n])
        finally:
            attributor.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert len(writes) == 1, f"{len(writes)} writes for one batch of 5"


def test_requests_while_the_worker_gathers_do_not_wake_it() -> None:
    """The worker sleeps through a burst's gathering: the relay's request writes meanwhile
    wake it none (each wake-up was a switch of CPU on the relay's latency path)."""
    import psutil

    child = subprocess.Popen(
        [
            sys.executable,
            "-I",
            *attribution._WORKER,
            "--relay-pid",
            str(os.getpid()),
            "--delay",
            "1.5",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        with listener() as server, socket.create_connection(server.getsockname()) as sock:
            (ip, port), (dst_ip, dst_port) = sock.getsockname(), sock.getpeername()
            line = f"{ip} {port} {dst_ip} {dst_port}\n"
            # Started: it answers a first request (a pass 1.5 s after it).
            child.stdin.write(f"1 {line}".encode())
            child.stdin.flush()
            assert json.loads(child.stdout.readline())[0][0] == 1
            proc = psutil.Process(child.pid)
            child.stdin.write(f"2 {line}".encode())  # a new burst: it gathers for 1.5 s
            child.stdin.flush()
            time.sleep(0.1)
            started = time.monotonic()
            before = proc.num_ctx_switches().voluntary
            for n in range(3, 43):
                child.stdin.write(f"{n} {line}".encode())
                child.stdin.flush()
                time.sleep(0.005)
            woken = proc.num_ctx_switches().voluntary - before
            gathering = time.monotonic() - started < 1.3  # else the pass may have begun
            answered: set[int] = set()
            while len(answered) < 41:
                answered |= {item[0] for item in json.loads(child.stdout.readline())}
        assert answered == set(range(2, 43))
        if gathering:
            assert woken <= 5, f"woken {woken} times by 40 request writes"
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()


def test_never_a_guess_on_the_port_alone(method: str) -> None:
    with (
        listener() as a_listener,
        listener() as other,
        socket.create_connection(a_listener.getsockname()) as a,
    ):
        client = a.getsockname()
        requests: list[Request] = [
            (1, client, other.getsockname()),  # right client, wrong destination
            (2, ("127.0.0.2", client[1]), a.getpeername()),  # right port, wrong address
            # The listener's own address as the client: an exact lookup would fall back to
            # the listener; that is not the connection asked about.
            (3, a_listener.getsockname(), ("127.0.0.1", 9)),
            (4, client, a.getpeername()),
        ]
        answers, _, _ = attribute(requests)
    assert answers[1] is None and answers[2] is None and answers[3] is None
    assert_me(answers[4])


def test_client_address_alone_when_the_destination_is_unknown(method: str) -> None:
    """A connection that reached the relay without a redirect has no original destination;
    the client address is enough only while exactly one socket has it."""
    with (
        listener() as one,
        socket.socket() as shared_a,
        socket.socket() as shared_b,
        listener() as two,
        socket.create_connection(one.getsockname()) as single,
    ):
        # Two sockets share one local address (SO_REUSEADDR, different destinations).
        for sock in (shared_a, shared_b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared_a.bind(("127.0.0.1", 0))
        shared_b.bind(shared_a.getsockname())
        shared_a.connect(one.getsockname())
        shared_b.connect(two.getsockname())
        answers, _, _ = attribute(
            [(1, single.getsockname(), None), (2, shared_a.getsockname(), None)]
        )
    assert_me(answers[1])
    assert answers[2] is None


# other processes ---------------------------------------------------------------------------------


def test_two_processes_connecting_at_once_to_the_same_destination(method: str) -> None:
    with listener() as server, children(server.getsockname(), 2) as (first, second):
        first.go()
        second.go()
        addresses = {child.pid: child.read_address() for child in (first, second)}
        accepted = [server.accept()[0] for _ in range(2)]
        try:
            requests: list[Request] = [
                (pid, address, server.getsockname()) for pid, address in addresses.items()
            ]
            answers, passes, _ = attribute(requests)
        finally:
            for sock in accepted:
                sock.close()
    assert passes == 1
    for pid, info in answers.items():
        assert info is not None
        assert info.pid == pid, "each connection belongs to its own process"
        assert info.name.startswith("python")
        assert info.exe == os.path.realpath(sys.executable)
        assert info.user == MY_USER
        assert not info.exited


def test_a_burst_is_answered_by_one_pass(method: str) -> None:
    count = 20
    with listener() as server, children(server.getsockname(), count) as made:
        for child in made:
            child.go()
        requests: list[Request] = [
            (index, child.read_address(), server.getsockname()) for index, child in enumerate(made)
        ]
        own = [socket.create_connection(server.getsockname()) for _ in range(30)]
        try:
            requests += [
                (100 + index, sock.getsockname(), sock.getpeername())
                for index, sock in enumerate(own)
            ]
            # Requests spread over part of the delay still form one burst.
            answers, passes, collector = attribute(requests, delay=0.2)
        finally:
            for sock in own:
                sock.close()
    assert passes == 1 and collector.batches == 1
    assert len(answers) == 50
    for index, child in enumerate(made):
        info = answers[index]
        assert info is not None and info.pid == child.pid
    for index in range(30):
        assert_me(answers[100 + index])


@pytest.mark.parametrize("after", ["fin-wait-2", "time-wait", "reset"])
def test_a_process_that_exited_before_the_lookup(method: str, after: str) -> None:
    """Its socket may outlive it (FIN_WAIT2, TIME_WAIT): "exited". A socket that is gone
    too leaves nothing to answer: None."""
    mode = "reset" if after == "reset" else "exit"
    with listener() as server, children(server.getsockname(), 1, mode) as (child,):
        child.go()
        local = child.read_address()
        peer, _ = server.accept()
        with peer:
            child.proc.wait(timeout=5)
            remote = server.getsockname()
            if after == "time-wait":
                peer.close()  # our FIN: the child's side goes to TIME_WAIT
                wait_until(lambda: tcp_state(local, remote) == {"TIME-WAIT"}, "TIME-WAIT")
            elif after == "reset":
                wait_until(lambda: not tcp_state(local, remote), "the socket to be gone")
            else:
                wait_until(lambda: tcp_state(local, remote) == {"FIN-WAIT-2"}, "FIN-WAIT-2")
            answers, _, _ = attribute([(1, local, server.getsockname())])
    info = answers[1]
    if after == "reset":
        assert info is None
    else:
        assert info is not None
        # The kernel keeps these as timewait socks: no owner, no uid.
        assert info == ProcessInfo(pid=None, name="?", exited=True)


def test_a_process_that_ended_between_the_steps() -> None:
    """Its socket was found with its pid, then the process ended before psutil read it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)
    info = ProcessLookup()._process(child.pid, MY_USER)
    assert info == ProcessInfo(pid=child.pid, name="?", user=MY_USER, exited=True)


def test_another_users_process_answers_what_can_be_known(tmp_path: Path) -> None:
    """The relay runs as the user; a connection from another user's program (here: this
    root-owned test process, looked up by a lookup running as `nobody`) cannot be followed
    to its process, but the kernel says whose socket it is."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root, to run the lookup as another user", pytrace=False)
    script = textwrap.dedent(
        """
        import json, sys
        from tray_proxy.monitor.attribution import ProcessLookup
        requests = [(i, tuple(c), tuple(d)) for i, c, d in json.loads(sys.argv[1])]
        answers = ProcessLookup().find(requests)
        print(json.dumps({i: None if a is None else [a.pid, a.name, a.user, a.exited]
                          for i, a in answers}))
        """
    )
    with listener() as server, socket.create_connection(server.getsockname()) as mine:
        requests = [[1, list(mine.getsockname()), list(mine.getpeername())]]
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(requests)],
            user="nobody",
            group="nogroup",
            cwd=tmp_path,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"1": [None, "?", MY_USER, False]}


# cheap passes ------------------------------------------------------------------------------------

SCRIPTED = textwrap.dedent(
    """
    import os, socket, struct, sys
    held = {}
    for line in sys.stdin:
        command, *args = line.split()
        if command == "connect":  # host port [local port]
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if len(args) > 2:
                sock.bind((args[0], int(args[2])))
            sock.connect((args[0], int(args[1])))
            held[sock.getsockname()[1]] = sock
            print(sock.getsockname()[1], flush=True)
        elif command == "reset":  # local port: RST, the socket is gone at once
            sock = held.pop(int(args[0]))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            print("done", flush=True)
        elif command == "exec":  # this pid becomes `cat`, still holding every socket
            for sock in held.values():
                os.set_inheritable(sock.fileno(), True)
            print("done", flush=True)
            os.execv(args[0], ["cat"])
    """
)


class Scripted:
    """A python process that connects and resets when told to (commands on its stdin)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPTED],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def tell(self, *words: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def connect(self, server: Address, local_port: int | None = None) -> Address:
        extra = () if local_port is None else (local_port,)
        return ("127.0.0.1", int(self.tell("connect", server[0], server[1], *extra)))

    def stop(self) -> None:
        Child.stop(self)  # type: ignore[arg-type]  # the same proc attribute


@contextlib.contextmanager
def scripted(count: int) -> Iterator[list[Scripted]]:
    made: list[Scripted] = []
    try:
        for _ in range(count):
            made.append(Scripted())
        yield made
    finally:
        for child in made:
            child.stop()


class ScanSpy:
    """Records the pids whose fd tables a lookup reads, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pids: list[int] = []
        real = ProcessLookup._scan

        def scan(lookup: ProcessLookup, pids: Iterable[int], *args: Any, **kwargs: Any) -> Any:
            listed = list(pids)
            before = lookup.fd_tables_read
            result = real(lookup, listed, *args, **kwargs)
            # The pids actually read: a scan stops once every socket has its owner.
            read = [pid for pid in listed if os.path.exists(f"/proc/{pid}/fd")]
            self.pids += read[: lookup.fd_tables_read - before]
            return result

        monkeypatch.setattr(ProcessLookup, "_scan", scan)


@pytest.mark.parametrize("lookup_method", ["sock_diag", "proc"])
def test_a_socket_in_time_wait_is_answered_without_reading_fd_tables(lookup_method: str) -> None:
    """A closed socket (TIME_WAIT: no inode) has no owner to search for."""
    with listener() as server, children(server.getsockname(), 1, "exit") as (child,):
        child.go()
        local = child.read_address()
        peer, _ = server.accept()
        with peer:
            child.proc.wait(timeout=5)
            peer.close()
            wait_until(lambda: tcp_state(local, server.getsockname()) == {"TIME-WAIT"}, "TIME-WAIT")
            lookup = ProcessLookup(use_sock_diag=lookup_method == "sock_diag")
            try:
                answers = lookup.find([(1, local, server.getsockname())])
            finally:
                lookup.close()
    assert answers == [(1, ProcessInfo(pid=None, name="?", exited=True))]
    assert lookup.fd_tables_read == 0


def test_a_socket_closed_during_the_pass_is_not_searched_in_every_fd_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel listed the socket with its inode, then its program closed it: asked again
    before the expensive part (every process's fd table), the kernel says it is gone."""
    spy = ScanSpy(monkeypatch)
    with listener() as server, scripted(1) as (child,):
        local = child.connect(server.getsockname())
        peer, _ = server.accept()
        with peer:
            lookup = ProcessLookup()
            real = lookup._sockets
            first = real({(local, server.getsockname())})
            assert first[(local, server.getsockname())].inode != 0
            child.tell("reset", local[1])
            wait_until(lambda: not tcp_state(local, server.getsockname()), "the socket to go")
            calls: list[int] = []

            def sockets(exact: Iterable[Address]) -> Any:
                calls.append(1)
                return first if len(calls) == 1 else real(exact)  # type: ignore[arg-type]

            monkeypatch.setattr(lookup, "_sockets", sockets)
            try:
                answers = lookup.find([(1, local, server.getsockname())])
            finally:
                lookup.close()
    assert answers == [(1, ProcessInfo(pid=None, name="?", user=MY_USER, exited=True))]
    assert len(calls) == 2, "the kernel was not asked again"
    assert spy.pids == [] and lookup.fd_tables_read == 0


def test_the_relays_own_fd_table_is_read_only_for_its_own_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another program's socket is found without reading this process's fd table (the
    relay's: two sockets per tunnel); a socket of this process still is, last."""
    spy = ScanSpy(monkeypatch)
    with (
        listener() as server,
        scripted(1) as (child,),
        socket.create_connection(server.getsockname()) as mine,
    ):
        local = child.connect(server.getsockname())
        accepted = [server.accept()[0] for _ in range(2)]
        try:
            lookup = ProcessLookup()
            try:
                theirs = lookup.find([(1, local, server.getsockname())])
                read_for_theirs = list(spy.pids)
                spy.pids.clear()
                own = lookup.find([(2, mine.getsockname(), mine.getpeername())])
            finally:
                lookup.close()
        finally:
            for sock in accepted:
                sock.close()
    info = theirs[0][1]
    assert info is not None and info.pid == child.pid
    assert os.getpid() not in read_for_theirs and child.pid in read_for_theirs
    assert_me(own[0][1])
    assert spy.pids[-1] == os.getpid()
    assert spy.pids.count(os.getpid()) == 1


def test_a_remembered_socket_is_believed_only_while_its_process_holds_it() -> None:
    """A socket seen in a scan is found again without one; once its program has closed it
    and another program connects from the same address to the same destination (the same
    4-tuple, a new socket), the answer is that other program."""
    with listener() as server, scripted(2) as (first, second):
        lookup = ProcessLookup()
        try:
            # Bound before connecting, so that its port is not shared with another
            # connection of this host (connect's own choice may be) and can be bound again.
            local = first.connect(server.getsockname(), 0)
            peer, _ = server.accept()
            found = lookup.find([(1, local, server.getsockname())])
            tables = lookup.fd_tables_read
            again = lookup.find([(2, local, server.getsockname())])
            assert lookup.fd_tables_read == tables, "a remembered socket was searched for"

            first.tell("reset", local[1])
            peer.close()
            wait_until(lambda: not tcp_state(local, server.getsockname()), "the socket to go")
            assert second.connect(server.getsockname(), local[1]) == local
            peer, _ = server.accept()
            with peer:
                reused = lookup.find([(3, local, server.getsockname())])
        finally:
            lookup.close()
    for answers, pid in ((found, first.pid), (again, first.pid), (reused, second.pid)):
        info = answers[0][1]
        assert info is not None and info.pid == pid and not info.exited


def test_a_process_that_runs_another_program_is_named_after_it() -> None:
    """The same pid, after exec: the program's name and executable are read again."""
    cat = os.path.realpath(shutil.which("cat") or "/bin/cat")
    with listener() as server, scripted(1) as (child,):
        lookup = ProcessLookup()
        try:
            local = child.connect(server.getsockname())
            peer, _ = server.accept()
            with peer:
                before = lookup.find([(1, local, server.getsockname())])
                child.tell("exec", cat)
                wait_until(lambda: os.path.realpath(f"/proc/{child.pid}/exe") == cat, "exec")
                after = lookup.find([(2, local, server.getsockname())])
        finally:
            lookup.close()
    first, second = before[0][1], after[0][1]
    assert first is not None and first.pid == child.pid
    assert first.exe == os.path.realpath(sys.executable)
    assert second is not None and second.pid == child.pid
    assert (second.name, second.exe) == ("cat", cat)


# container traffic -------------------------------------------------------------------------------

# The formats of `docker network ls --quiet --no-trunc` and `docker network inspect` (Docker
# 24-27); ids and names are this test's.
NETWORK_IDS = [
    "3f1c8e5a2b7d4c6e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60",
    "9a8b7c6d5e4f30211f2e3d4c5b6a79880f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e",
]
NETWORK_INSPECT = [
    {
        "Name": "bridge",
        "Id": NETWORK_IDS[0],
        "Created": "2026-11-30T08:12:44.501236815Z",
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv6": False,
        "IPAM": {
            "Driver": "default",
            "Options": None,
            "Config": [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}],
        },
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {
            "5be1a4f0c3d2e1b0a9f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d5c4b3a29": {
                "Name": "build-runner",
                "EndpointID": "c0ffee11d2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9",
                "MacAddress": "02:42:ac:11:00:02",
                "IPv4Address": "172.17.0.2/16",
                "IPv6Address": "",
            }
        },
        "Options": {
            "com.docker.network.bridge.default_bridge": "true",
            "com.docker.network.bridge.enable_icc": "true",
            "com.docker.network.bridge.enable_ip_masquerade": "true",
            "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
            "com.docker.network.bridge.name": "docker0",
            "com.docker.network.driver.mtu": "1500",
        },
        "Labels": {},
    },
    {
        "Name": "webapp_default",
        "Id": NETWORK_IDS[1],
        "Created": "2026-12-01T10:02:13.118830104Z",
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv6": True,
        "IPAM": {
            "Driver": "default",
            "Options": None,
            "Config": [
                {"Subnet": "172.20.0.0/16", "Gateway": "172.20.0.1"},
                {"Subnet": "fd00:dead:beef::/64", "Gateway": "fd00:dead:beef::1"},
            ],
        },
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {
            "7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a09f8e": {
                "Name": "webapp-api-1",
                "EndpointID": "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90",
                "MacAddress": "02:42:ac:14:00:03",
                "IPv4Address": "172.20.0.3/16",
                "IPv6Address": "fd00:dead:beef::3/64",
            }
        },
        "Options": {},
        "Labels": {
            "com.docker.compose.network": "default",
            "com.docker.compose.project": "webapp",
            "com.docker.compose.version": "2.29.7",
        },
    },
    {
        "Name": "host",
        "Id": NETWORK_IDS[2],
        "Created": "2026-11-02T14:40:02.914611922Z",
        "Scope": "local",
        "Driver": "host",
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": []},
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
        "Options": {},
        "Labels": {},
    },
]


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A FAKE `docker` on PATH (Docker cannot run here) that answers the two commands the
    lookup uses with their real output formats, and logs each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "inspect.json").write_text(json.dumps(NETWORK_INSPECT, indent=4) + "\n")
    (tmp_path / "ids.txt").write_text("\n".join(NETWORK_IDS) + "\n")
    calls = tmp_path / "calls.log"
    script = bin_dir / "docker"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "$*" >> {calls}
            case "$1 $2" in
              "network ls") exec cat {tmp_path / "ids.txt"} ;;
              "network inspect") exec cat {tmp_path / "inspect.json"} ;;
            esac
            echo "docker: unknown command" >&2
            exit 1
            """
        )
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return calls


def test_container_traffic_is_named_after_its_container(fake_docker: Path) -> None:
    # Addresses of no interface here: what the relay sees of prerouting traffic.
    requests: list[Request] = [
        (1, ("172.17.0.2", 40001), ("93.184.215.14", 443)),
        (2, ("::ffff:172.20.0.3", 40002), ("93.184.215.14", 443)),
        (3, ("fd00:dead:beef::3", 40003), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", 443)),
        (4, ("172.17.0.99", 40004), ("93.184.215.14", 80)),  # no such container
    ]
    answers, passes, _ = attribute(requests)
    assert answers[1] == ProcessInfo(pid=None, name="?", remote=True, container="build-runner")
    assert answers[2] == ProcessInfo(pid=None, name="?", remote=True, container="webapp-api-1")
    assert answers[3] == ProcessInfo(pid=None, name="?", remote=True, container="webapp-api-1")
    assert answers[4] == ProcessInfo(pid=None, name="?", remote=True)
    assert passes == 1
    # One listing for the whole burst, not one per connection.
    calls = fake_docker.read_text().splitlines()
    assert calls == [
        "network ls --quiet --no-trunc",
        "network inspect " + " ".join(NETWORK_IDS),
    ]


def test_container_traffic_without_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here
    answers, _, _ = attribute([(1, ("172.17.0.2", 40001), ("93.184.215.14", 443))])
    assert answers[1] == ProcessInfo(pid=None, name="?", remote=True)


# bounds ------------------------------------------------------------------------------------------


class FileEvent:
    """A threading.Event shared with the child process: a file that exists once set."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self) -> None:
        self.path.touch()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


class Gate:
    """Holds the child inside its first lookup pass until opened (to make it busy)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.entered = FileEvent(tmp_path / "entered")
        self.release = FileEvent(tmp_path / "release")
        worker(
            monkeypatch,
            f"""
            real = ProcessLookup.find
            calls = []

            def find(lookup, burst):
                calls.append(1)
                if len(calls) == 1:
                    pathlib.Path({str(self.entered.path)!r}).touch()
                    release = pathlib.Path({str(self.release.path)!r})
                    deadline = time.monotonic() + {ANSWER_TIMEOUT}
                    while not release.exists() and time.monotonic() < deadline:
                        time.sleep(0.005)
                return real(lookup, burst)

            ProcessLookup.find = find
            """,
        )


def test_a_busy_worker_coalesces_the_next_burst(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gate = Gate(monkeypatch, tmp_path)
    with listener() as server:
        own = [socket.create_connection(server.getsockname()) for _ in range(41)]
        try:

            async def main() -> tuple[Collector, int]:
                loop = asyncio.get_running_loop()
                collector = Collector(loop, len(own))
                attributor = Attributor(loop, collector, delay=0.01)
                try:
                    sock = own[0]
                    attributor.request(0, sock.getsockname(), sock.getpeername())
                    await loop.run_in_executor(None, gate.entered.wait, ANSWER_TIMEOUT)
                    for index, sock in enumerate(own[1:], 1):
                        attributor.request(index, sock.getsockname(), sock.getpeername())
                    gate.release.set()
                    await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
                finally:
                    gate.release.set()
                    attributor.close()
                return collector, attributor.passes

            with asyncio.Runner() as runner:
                collector, passes = runner.run(main())
        finally:
            for sock in own:
                sock.close()
    assert passes == 2 and collector.batches == 2
    for info in collector.answers.values():
        assert_me(info)


def test_after_a_costly_pass_the_worker_rests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker's CPU stays near `cpu_share` of a core: with no CPU left in its budget,
    after a pass that cost 60 ms of CPU, at a share of one half, the next pass waits
    120 ms (60 ms of work in 120 ms), and the requests made meanwhile are answered
    together by it."""
    times = tmp_path / "times"  # "start <monotonic>" and "end <monotonic>" lines
    worker(
        monkeypatch,
        f"""
        attribution._CPU_BURST = 0.0
        real = ProcessLookup.find
        calls = []

        def find(lookup, burst):
            calls.append(1)
            with open({str(times)!r}, "a") as log:
                print("start", time.monotonic(), file=log, flush=True)
                if len(calls) == 1:
                    spent = time.thread_time()
                    while time.thread_time() - spent < 0.06:  # bounded: 60 ms of CPU
                        pass
                result = real(lookup, burst)
                print("end", time.monotonic(), file=log, flush=True)
            return result

        ProcessLookup.find = find
        """,
    )

    def logged(what: str) -> list[float]:
        lines = times.read_text().splitlines() if times.exists() else []
        return [float(line.split()[1]) for line in lines if line.startswith(what)]

    with listener() as server:
        own = [socket.create_connection(server.getsockname()) for _ in range(4)]
        try:

            async def main() -> tuple[Collector, int]:
                loop = asyncio.get_running_loop()
                collector = Collector(loop, len(own))
                attributor = Attributor(loop, collector, delay=0.0, cpu_share=0.5)
                try:
                    sock = own[0]
                    attributor.request(0, sock.getsockname(), sock.getpeername())
                    while not logged("end"):  # bounded by the test's timeout
                        await asyncio.sleep(0.005)
                    for index, sock in enumerate(own[1:], 1):
                        attributor.request(index, sock.getsockname(), sock.getpeername())
                    await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
                finally:
                    attributor.close()
                return collector, attributor.passes

            with asyncio.Runner() as runner:
                collector, passes = runner.run(main())
        finally:
            for sock in own:
                sock.close()
    assert passes == 2 and collector.batches == 2
    starts, ends = logged("start"), logged("end")
    assert starts[1] - ends[0] >= 0.12 * 0.9  # thread_time's clock is not monotonic's
    for info in collector.answers.values():
        assert_me(info)


def test_pending_requests_are_capped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Beyond the cap (requests not answered yet, the one in the child's pass included) a
    request is answered None at once (on the loop), not queued."""
    monkeypatch.setattr(attribution, "MAX_PENDING", 5)
    gate = Gate(monkeypatch, tmp_path)
    with listener() as server, socket.create_connection(server.getsockname()) as sock:
        client, dst = sock.getsockname(), sock.getpeername()

        async def main() -> Collector:
            loop = asyncio.get_running_loop()
            collector = Collector(loop, 1 + 5 + 3)
            attributor = Attributor(loop, collector, delay=0.0)
            try:
                attributor.request(0, client, dst)
                await loop.run_in_executor(None, gate.entered.wait, ANSWER_TIMEOUT)
                for conn_id in range(1, 9):  # 4 fit, 4 do not
                    attributor.request(conn_id, client, dst)
                await asyncio.sleep(0)  # the overflow answer is already scheduled
                await asyncio.sleep(0)
                overflow = (5, 6, 7, 8)
                assert {c: collector.answers[c] for c in overflow} == dict.fromkeys(overflow), (
                    "the overflow was not answered at once"
                )
                gate.release.set()
                await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
            finally:
                gate.release.set()
                attributor.close()
            return collector

        with asyncio.Runner() as runner:
            collector = runner.run(main())
    for conn_id in range(5):
        assert_me(collector.answers[conn_id])


def test_close_stops_the_child_promptly_and_no_thread_is_left() -> None:
    """The lookups run in a child process: the relay's process has no thread for them, and
    close() ends the child (reaped: no zombie)."""
    threads_before = set(threading.enumerate())

    async def main() -> tuple[float, set[threading.Thread], subprocess.Popen[bytes]]:
        loop = asyncio.get_running_loop()
        collector = Collector(loop, 1)
        attributor = Attributor(loop, collector, delay=0.0)
        attributor.request(1, ("127.0.0.1", 1), ("127.0.0.1", 2))
        await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
        threads = set(threading.enumerate()) - threads_before
        child = attributor._child
        assert child is not None and child.poll() is None
        started = time.monotonic()
        attributor.close()
        took = time.monotonic() - started
        attributor.request(2, ("127.0.0.1", 1), ("127.0.0.1", 2))  # ignored once closed
        await asyncio.sleep(0.05)
        assert 2 not in collector.answers
        return took, threads, child

    with asyncio.Runner() as runner:
        took, threads, child = runner.run(main())
    assert took < 1.0
    assert threads == set(), "a thread in the relay's process"
    assert child.returncode is not None, "the child was not reaped"
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


def test_the_child_starts_with_the_attributor_on_the_loop() -> None:
    """Ready before the first request: a child still importing would find a short-lived
    program gone."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        attributor = Attributor(loop, lambda batch: None)
        assert attributor._child is None, "started off the loop's turn"
        await asyncio.sleep(0)
        child = attributor._child
        assert child is not None and child.poll() is None
        attributor.close()
        assert child.returncode is not None

    with asyncio.Runner() as runner:
        runner.run(main())


def test_the_child_ends_when_its_stdin_closes() -> None:
    """Whatever becomes of the relay, its end of the pipe closes: the child never outlives
    it."""
    child = subprocess.Popen(
        [sys.executable, "-I", *attribution._WORKER, "--relay-pid", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    with listener() as server, socket.create_connection(server.getsockname()) as sock:
        (ip, port), (dst_ip, dst_port) = sock.getsockname(), sock.getpeername()
        child.stdin.write(f"7 {ip} {port} {dst_ip} {dst_port}\n".encode())
        child.stdin.flush()
        answer = json.loads(child.stdout.readline())
    assert answer[0][0] == 7 and answer[0][1][0] == os.getpid()
    child.stdin.close()
    assert child.wait(timeout=5) == 0
    child.stdout.close()


def test_requests_from_another_thread_are_answered_on_the_loop() -> None:
    with listener() as server, socket.create_connection(server.getsockname()) as sock:

        async def main() -> Collector:
            loop = asyncio.get_running_loop()
            collector = Collector(loop, 2)
            attributor = Attributor(loop, collector, delay=0.0)
            try:
                asking = threading.Thread(
                    target=lambda: [
                        attributor.request(i, sock.getsockname(), sock.getpeername())
                        for i in (1, 2)
                    ]
                )
                asking.start()
                asking.join()
                await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
            finally:
                attributor.close()
            return collector

        with asyncio.Runner() as runner:
            collector = runner.run(main())
    assert collector.threads == {threading.get_ident()}
    assert_me(collector.answers[1])
    assert_me(collector.answers[2])


@pytest.mark.parametrize("answer_interval", [0.0, 0.05])
def test_a_killed_child_answers_none_until_it_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    answer_interval: float,
) -> None:
    """Requests waiting on a child that dies are answered None, so are the ones made before
    its restart (after a backoff); then the new child answers. Never inside request(): its
    caller (the Monitor's feed) is in the middle of its own bookkeeping."""
    monkeypatch.setattr(attribution, "_RESTART_BACKOFF", 0.3)
    gate = Gate(monkeypatch, tmp_path)
    with listener() as server, socket.create_connection(server.getsockname()) as sock:
        client, dst = sock.getsockname(), sock.getpeername()

        async def main() -> Collector:
            loop = asyncio.get_running_loop()
            collector = Collector(loop, 4)
            attributor = Attributor(loop, collector, delay=0.0, answer_interval=answer_interval)
            try:
                attributor.request(1, client, dst)
                await loop.run_in_executor(None, gate.entered.wait, ANSWER_TIMEOUT)
                attributor.request(2, client, dst)
                child = attributor._child
                assert child is not None
                os.kill(child.pid, signal.SIGKILL)
                while len(collector.answers) < 2:  # bounded by the test's timeout
                    await asyncio.sleep(0.005)
                assert collector.answers == {1: None, 2: None}
                assert child.returncode == -signal.SIGKILL, "the dead child was not reaped"
                attributor.request(3, client, dst)  # within the backoff
                assert 3 not in collector.answers, "answered inside request()"
                while 3 not in collector.answers:
                    await asyncio.sleep(0.005)
                assert collector.answers[3] is None
                await asyncio.sleep(0.4)
                gate.release.set()  # the new child's first pass is gated too
                attributor.request(4, client, dst)
                await asyncio.wait_for(collector.done, ANSWER_TIMEOUT)
            finally:
                gate.release.set()
                attributor.close()
            return collector

        with asyncio.Runner() as runner:
            collector = runner.run(main())
    assert_me(collector.answers[4])
    warnings = [r for r in caplog.records if r.name == attribution.__name__]
    assert len(warnings) == 1 and "starting it again in 0.3 s" in warnings[0].getMessage()


def test_a_child_that_cannot_start_answers_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At most _MAX_RESTARTS starts again, then None for good, without an exception."""
    monkeypatch.setattr(attribution, "_RESTART_BACKOFF", 0.0)
    monkeypatch.setattr(attribution, "_WORKER", ["-c", "raise SystemExit(3)"])

    async def main() -> Collector:
        loop = asyncio.get_running_loop()
        collector = Collector(loop, 6)
        attributor = Attributor(loop, collector, delay=0.0)
        try:
            for conn_id in range(1, 7):
                attributor.request(conn_id, ("127.0.0.1", 1), ("127.0.0.1", 2))
                while conn_id not in collector.answers:  # bounded by the test's timeout
                    await asyncio.sleep(0.005)
        finally:
            attributor.close()
        return collector

    with asyncio.Runner() as runner:
        collector = runner.run(main())
    assert collector.answers == dict.fromkeys(range(1, 7))
    messages = [r.getMessage() for r in caplog.records if r.name == attribution.__name__]
    assert len(messages) == 1 + attribution._MAX_RESTARTS
    assert "programs are no longer named" in messages[-1]


def test_without_sock_diag_the_lookup_reads_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses the netlink protocol (here: a protocol number it does not
    have) makes the lookup read /proc/net/tcp{,6} instead, for good."""
    monkeypatch.setattr(attribution, "_NETLINK_SOCK_DIAG", 31)  # no such netlink family
    with listener() as server, socket.create_connection(server.getsockname()) as sock:
        lookup = ProcessLookup()
        try:
            first = lookup.find([(1, sock.getsockname(), sock.getpeername())])
            second = lookup.find([(2, sock.getsockname(), sock.getpeername())])
        finally:
            lookup.close()
    assert_me(first[0][1])
    assert_me(second[0][1])


@pytest.mark.parametrize("missing", ["_libc_recv", "_libc_readlinkat"])
def test_without_the_libc_calls_that_keep_the_gil(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """recv and readlinkat go through libc when it has them (the GIL kept); without, the
    socket module's and os's own calls give the same answers."""
    monkeypatch.setattr(attribution, missing, None)
    with listener() as server, scripted(1) as (child,):
        local = child.connect(server.getsockname())
        peer, _ = server.accept()
        with peer, socket.create_connection(server.getsockname()) as mine:
            lookup = ProcessLookup()
            try:
                answers = dict(
                    lookup.find(
                        [
                            (1, local, server.getsockname()),
                            (2, mine.getsockname(), mine.getpeername()),
                        ]
                    )
                )
            finally:
                lookup.close()
    info = answers[1]
    assert info is not None and info.pid == child.pid
    assert_me(answers[2])


def test_a_loop_closed_under_a_pass_ends_the_child_quietly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gate = Gate(monkeypatch, tmp_path)
    loop = asyncio.new_event_loop()
    attributor = Attributor(loop, lambda batch: None, delay=0.0)
    try:
        attributor.request(1, ("127.0.0.1", 1), ("127.0.0.1", 2))
        loop.run_until_complete(asyncio.sleep(0.05))  # the request reaches the child
        assert gate.entered.wait(ANSWER_TIMEOUT)
        child = attributor._child
        assert child is not None
    finally:
        loop.close()
        gate.release.set()
    attributor.close()
    assert child.returncode is not None


def test_a_burst_larger_than_one_netlink_message() -> None:
    count = 2 * attribution._DIAG_CHUNK + 44
    with listener() as server, contextlib.ExitStack() as stack:
        own: list[socket.socket] = []
        for _ in range(count):  # accepted as they come: the backlog is smaller than count
            own.append(stack.enter_context(socket.create_connection(server.getsockname(), 5)))
            stack.enter_context(server.accept()[0])
        answers, passes, _ = attribute(
            [(index, sock.getsockname(), sock.getpeername()) for index, sock in enumerate(own)]
        )
    assert passes == 1 and len(answers) == count
    for info in answers.values():
        assert_me(info)


def test_a_program_with_many_sockets_connecting_again_costs_one_readlink_per_pass() -> None:
    """A program holding hundreds of sockets that closes a connection and opens the next (a
    package manager, a browser) gets the freed fd again: the pass reads that fd first and
    stops, instead of reading the whole fd table (before: every fd, each pass)."""
    with listener() as server, scripted(1) as (child,):
        address = server.getsockname()
        accepted: list[socket.socket] = []
        lookup = ProcessLookup()
        try:
            for _ in range(300):  # the sockets the program keeps open
                child.connect(address)
                accepted.append(server.accept()[0])
            reads: list[int] = []
            for conn_id in range(6):
                local = child.connect(address)
                peer, _ = server.accept()
                with peer:
                    before = lookup.fds_read
                    answers = lookup.find([(conn_id, local, address)])
                    reads.append(lookup.fds_read - before)
                    child.tell("reset", local[1])
                info = answers[0][1]
                assert info is not None and info.pid == child.pid and not info.exited
        finally:
            lookup.close()
            for sock in accepted:
                sock.close()
    assert reads[0] > 300  # the first pass reads the table
    assert reads[1:] == [1] * 5, reads
