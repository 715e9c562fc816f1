"""A delayed, lossy link between two lab namespaces, forwarded in user space through TUN devices.

This kernel has no netem (`CONFIG_NET_SCH_NETEM` unset: `tc qdisc ... netem` fails), so the
lab cannot give a veth a delay. Instead a forwarder process owns one TUN device in namespace A
and one in namespace B and copies every IP packet from one to the other after `delay_ms`
(each direction), dropping each with probability `loss_percent`. Routes for chosen address
pairs send their traffic over the TUN devices instead of the lab's veths:

    with DelayedLink(lab.client, lab.proxy, delay_ms=10) as link:   # 20 ms round trip
        link.carry(lab.client.v4, lab.proxy.v4)   # client <-> proxy both ways, delayed
        ...                                       # TCP connect client -> Squid: ~20 ms
    stats = link.stats                            # packets forwarded / lost, at exit

One file, two roles:
- imported (`tests.lab.linkemu`): `DelayedLink` starts this file as a script inside namespace
  A, waits for it, sets the devices up and adds the routes. Leaving `with` stops the
  forwarder; the TUN devices are not persistent, so they and every route through them
  vanish with its file descriptors. Nothing else is changed in either namespace.
- run as a script (`python -I tests/lab/linkemu.py ...`, stdlib only): the forwarder. It
  exits on SIGTERM/SIGINT, when its stdin closes (the process that started it is gone), and
  after `--lifetime` seconds at the latest; `Namespace.close()` of A kills it too. Queues
  are bounded (`--max-queue` packets per direction; overflow is counted and dropped).

Precision: each packet leaves at its due time plus up to about 1 ms (epoll's millisecond
timeout, rounded up), plus whatever time the forwarder waits for a CPU; it runs at nice -10
so that ordinary load does not delay it. A 20 ms round trip (delay_ms 10) measured a TCP
connect of 20.9 ms median on a quiet 2-CPU machine and 20.6 ms with both CPUs kept busy by
two other processes (tests/lab/test_linkemu.py asserts 20-28 ms).

Must not import tray_proxy, pytest or PySide6; the script part uses the stdlib only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.lab.netns import Namespace, NsProcess

SCRIPT = Path(__file__).resolve()
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_READS_PER_WAKEUP = 256  # packets read from one device before the other gets its turn
_MAX_PACKET = 65536
_NICE = -10  # the forwarder's scheduling priority (root may raise it)


@dataclass(frozen=True)
class LinkStats:
    """What the forwarder did, in packets; `ab` is namespace A to B, `ba` the reverse."""

    forwarded_ab: int = 0
    forwarded_ba: int = 0
    lost_ab: int = 0  # dropped on purpose (loss_percent)
    lost_ba: int = 0
    overflow: int = 0  # dropped because a direction's queue was full
    write_errors: int = 0

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LinkStats:
        fields = cls.__dataclass_fields__
        return cls(**{k: int(v) for k, v in data.items() if k in fields and isinstance(v, int)})


# -- the controller (imported by tests and bench) ---------------------------------------------


class DelayedLink:
    """A user-space link with `delay_ms` each way (RTT = 2 x delay_ms) between namespaces
    `a` and `b`; `carry(x, y)` routes traffic between address x (in a) and y (in b) over it.

    `name` is the TUN device's name in both namespaces (at most 15 characters; two links
    between the same namespaces need different names). `seed` makes the losses repeatable.
    """

    def __init__(
        self,
        a: Namespace,
        b: Namespace,
        *,
        delay_ms: float,
        loss_percent: float = 0.0,
        name: str = "tplink0",
        seed: int = 1,
        max_queue: int = 8192,
        lifetime: float = 3600.0,
    ) -> None:
        if not 0.0 <= delay_ms <= 10_000.0:
            raise ValueError(f"delay_ms must be 0-10000, got {delay_ms}")
        if not 0.0 <= loss_percent <= 100.0:
            raise ValueError(f"loss_percent must be 0-100, got {loss_percent}")
        if not 1 <= len(name) <= 15:
            raise ValueError(f"a device name has 1-15 characters, got {name!r}")
        self.a = a
        self.b = b
        self.delay_ms = delay_ms
        self.loss_percent = loss_percent
        self.name = name
        self.seed = seed
        self.max_queue = max_queue
        self.lifetime = lifetime
        self.process: NsProcess | None = None
        self.stats: LinkStats | None = None  # set by stop()
        self.stderr = ""

    def __repr__(self) -> str:
        return (
            f"<DelayedLink {self.a.role}<->{self.b.role} {self.delay_ms} ms each way, "
            f"{self.loss_percent} % loss>"
        )

    def argv(self) -> list[str]:
        return [
            sys.executable, "-I", str(SCRIPT),
            "--ns-b", self.b.name, "--device", self.name,
            "--delay-ms", repr(float(self.delay_ms)),
            "--loss-percent", repr(float(self.loss_percent)),
            "--seed", str(self.seed), "--max-queue", str(self.max_queue),
            "--lifetime", repr(float(self.lifetime)),
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> DelayedLink:
        """Start the forwarder in namespace A and bring both devices up; on failure nothing
        is left running."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.process = self.a.popen(
            self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        line = _read_line(self.process, timeout)
        if line.strip() != "READY":
            self.stop()
            raise _lab_error(
                f"the link emulator did not start (said {line.strip()!r}): {self.stderr[-1500:]}"
            )
        for ns in (self.a, self.b):
            # No IPv6 link-local address: no router solicitations or DAD on the link.
            ns.run(["ip", "link", "set", "dev", self.name, "addrgenmode", "none"], check=False)
            ns.run(["ip", "link", "set", "dev", self.name, "up"])

    def carry(self, a_address: str, b_address: str) -> None:
        """From now on, traffic between `a_address` (in A) and `b_address` (in B) takes the
        link both ways: a host route in each namespace, with the local address as source,
        so replies come back the same way (no asymmetric path, no rp_filter surprise)."""
        if self.process is None:
            raise _lab_error("the link is not started")
        six = ":" in a_address
        if six != (":" in b_address):
            raise ValueError("carry() needs two addresses of the same family")
        host = "/128" if six else "/32"
        family = ["-6"] if six else ["-4"]
        for ns, local, remote in ((self.a, a_address, b_address), (self.b, b_address, a_address)):
            ns.run(
                ["ip", *family, "route", "replace", remote + host, "dev", self.name, "src", local]
            )

    def stop(self) -> LinkStats | None:
        """Stop the forwarder (its devices and routes go with it); returns its counters."""
        proc, self.process = self.process, None
        if proc is None:
            return self.stats
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                # EOF on stdin is the forwarder's orderly stop: it prints its counters.
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        finally:
            proc.stop(grace=2.0)
            self.a.forget(proc)
            # The forwarder has exited: its few lines are all in the pipes, nothing blocks.
            out = err = b""
            if proc.stdout is not None:
                out = proc.stdout.read()
                proc.stdout.close()
            if proc.stderr is not None:
                err = proc.stderr.read()
                proc.stderr.close()
            self.stderr += err.decode(errors="replace")
        for text in reversed(out.decode(errors="replace").splitlines()):
            if text.startswith("{"):
                self.stats = LinkStats.from_json(json.loads(text))
                break
        return self.stats

    def __enter__(self) -> DelayedLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _lab_error(message: str) -> Exception:
    # Imported here: run as a script (`python -I`), this file cannot import the lab package.
    from tests.lab.netns import LabError

    return LabError(message)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The process's next stdout line, or "" at EOF or after `timeout` seconds."""
    assert proc.stdout is not None
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return ""
    return proc.stdout.readline().decode(errors="replace")


# -- the forwarder (run as a script, stdlib only) ----------------------------------------------


def _open_tun(name: str) -> int:
    """A TUN device `name` in the calling thread's network namespace (IP packets, no header)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SystemExit("linkemu: no /dev/net/tun: load the tun module (modprobe tun)") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def forward(
    a: int,
    b: int,
    delay: float,
    loss: float,
    rnd: random.Random,
    max_queue: int,
    deadline: float,
    stop: list[int],
    control: int,
) -> collections.Counter[str]:
    """Copy packets a->b and b->a, each `delay` seconds late, until `stop` fills, `control`
    (stdin) reaches EOF or `deadline` (monotonic) passes. Returns the counters."""
    stats: collections.Counter[str] = collections.Counter()
    peer = {a: b, b: a}
    direction = {a: "ab", b: "ba"}
    # Packets waiting to be written to each device, (due, packet), oldest first: one delay
    # for all, so the queues stay in order and the head is always the next one due.
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {
        a: collections.deque(),
        b: collections.deque(),
    }
    ep = select.epoll()
    ep.register(a, select.EPOLLIN)
    ep.register(b, select.EPOLLIN)
    ep.register(control, select.EPOLLIN | select.EPOLLHUP)
    try:
        while not stop:
            now = time.monotonic()
            if now >= deadline:
                stats["lifetime_reached"] += 1
                break
            due = min((q[0][0] for q in queues.values() if q), default=deadline)
            try:
                events = ep.poll(max(0.0, min(due, deadline) - now))
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd, _ in events:
                if fd == control:
                    if not os.read(control, 4096):
                        stop.append(1)
                    continue
                queue = queues[peer[fd]]
                key = direction[fd]
                for _ in range(_READS_PER_WAKEUP):
                    try:
                        packet = os.read(fd, _MAX_PACKET)
                    except (BlockingIOError, InterruptedError):
                        break
                    if loss and rnd.random() < loss:
                        stats[f"lost_{key}"] += 1
                    elif len(queue) >= max_queue:
                        stats["overflow"] += 1
                    else:
                        queue.append((now + delay, packet))
            now = time.monotonic()
            for fd, queue in queues.items():
                key = "ba" if fd == a else "ab"  # written to a: it came from b
                while queue and queue[0][0] <= now:
                    packet = queue.popleft()[1]
                    try:
                        os.write(fd, packet)
                        stats[f"forwarded_{key}"] += 1
                    except OSError:
                        stats["write_errors"] += 1
    finally:
        ep.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--ns-b", required=True, help="the other namespace's name (/run/netns)")
    parser.add_argument("--device", required=True, help="TUN device name in both namespaces")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay each way")
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=8192)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    # A link delays packets by its setting, not by how busy the machine is (netem does its
    # work in the kernel): ahead of ordinary processes for the CPU, as far as allowed.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, _NICE)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    # This process runs in namespace A (started there by `ip netns exec`); device B is made
    # from inside B, and the process returns to A. A TUN device stays in the namespace it
    # was created in, whatever namespace its file descriptor is used from.
    a = _open_tun(args.device)
    home = f"/proc/{os.getpid()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(f"/run/netns/{args.ns_b}")
        b = _open_tun(args.device)
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        returned = libc.setns(home_fd, _CLONE_NEWNET)
        os.close(home_fd)
    if returned != 0:
        raise OSError(ctypes.get_errno(), "setns back to namespace A")
    print("READY", flush=True)
    stats = forward(
        a,
        b,
        args.delay_ms / 1000.0,
        args.loss_percent / 100.0,
        random.Random(args.seed),
        args.max_queue,
        time.monotonic() + args.lifetime,
        stop,
        sys.stdin.fileno(),
    )
    print(json.dumps(dict(stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
