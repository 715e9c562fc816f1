"""Load generator for the benchmark, run as a script in the client namespace; prints JSON.

It dials an origin address (the lab's nft redirect sends it to the relay under test) or, in
`mix` mode, one address per row. With `--proxy` it speaks HTTP CONNECT (Basic auth, password
read from a 0600 file, never from argv) to Squid itself, for the "Squid only" row.
Sequential modes (bulk, latency, and mix: the latency of several rows taken in turn) use
blocking sockets so the client adds as little noise as possible; concurrent modes (rate,
idle) use asyncio on uvloop. Every mode is bounded in count and time. Speaks the origin
protocol of bench/origin.py.

Stdlib and uvloop only. Must not import tray_proxy, PySide6 or the lab modules.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import resource
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

PING = b"\x03" + b"p" * 63
PING_SIZE = 64
CHUNK = 1 << 20
HEAD_LIMIT = 16384
MIX_SEED = 20261206  # the latency phase's row order (mix): random, the same in every run


class Target:
    def __init__(
        self,
        target: str,
        proxy: str | None = None,
        user: str | None = None,
        password_file: str | None = None,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.addr = (host, int(port))
        self.proxy: tuple[str, int] | None = None
        self.connect_request = b""
        if proxy:
            phost, _, pport = proxy.rpartition(":")
            self.proxy = (phost, int(pport))
            lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
            if user:
                password = Path(password_file or "").read_text().strip()
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                lines.append(f"Proxy-Authorization: Basic {token}")
            self.connect_request = ("\r\n".join(lines) + "\r\n\r\n").encode()


def _check_connect_reply(head: bytes) -> None:
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.") or status[9:12] != b"200":
        raise OSError(f"proxy refused CONNECT: {status[:80]!r}")


# -- blocking (sequential) -----------------------------------------------------------------


def open_blocking(target: Target, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(target.proxy or target.addr)
        if target.proxy:
            sock.sendall(target.connect_request)
            head = b""
            while b"\r\n\r\n" not in head:
                # Byte-wise keeps tunnel bytes out of the head; the reply is small.
                data = sock.recv(1)
                if not data or len(head) > HEAD_LIMIT:
                    raise OSError("proxy closed during CONNECT")
                head += data
            _check_connect_reply(head)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise OSError(f"peer closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def bulk(target: Target, direction: str, nbytes: int, timeout: float) -> dict[str, Any]:
    sock = open_blocking(target, timeout)
    try:
        if direction == "down":
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            started = time.perf_counter()
            sock.sendall(b"\x01" + struct.pack("!Q", nbytes))
            got = 0
            while True:
                n = sock.recv_into(view)
                if n == 0:
                    break
                got += n
            elapsed = time.perf_counter() - started
            if got != nbytes:
                raise OSError(f"bulk down: got {got} of {nbytes} bytes")
        else:
            block = memoryview(bytes(range(256)) * (CHUNK // 256))
            started = time.perf_counter()
            sock.sendall(b"\x02" + struct.pack("!Q", nbytes))
            left = nbytes
            while left > 0:
                n = min(left, CHUNK)
                sock.sendall(block[:n])
                left -= n
            (got,) = struct.unpack("!Q", recv_exact(sock, 8))
            elapsed = time.perf_counter() - started
            if got != nbytes:
                raise OSError(f"bulk up: origin counted {got} of {nbytes} bytes")
    finally:
        sock.close()
    return {"bytes": nbytes, "seconds": elapsed, "gbit_s": nbytes * 8 / elapsed / 1e9}


def _timed_ping(target: Target, timeout: float) -> float:
    """One connect + 64-byte request/response; microseconds. Raises OSError on failure."""
    started = time.perf_counter()
    sock = open_blocking(target, timeout)
    try:
        sock.sendall(PING)
        recv_exact(sock, PING_SIZE)
    finally:
        sock.close()
    return (time.perf_counter() - started) * 1e6


def latency(target: Target, count: int, timeout: float, budget: float) -> dict[str, Any]:
    """Connect + one 64-byte request/response, sequentially; microseconds per connection."""
    samples: list[float] = []
    errors = 0
    deadline = time.monotonic() + budget
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            samples.append(_timed_ping(target, timeout))
        except OSError:
            errors += 1
    return {"count": len(samples), "errors": errors, **_percentiles(samples)}


def mix(targets: dict[str, Target], count: int, timeout: float, budget: float) -> dict[str, Any]:
    """`latency` for several rows at once, one connection per row in turn, each row once per
    cycle (A C B, B A C, ...).

    A slow phase of the shared machine then hits every row alike instead of whichever row
    happened to be running. Each cycle takes the rows in a new random order (seeded, so
    runs are alike): a relay's work after its connection closed (a tunnel's teardown, its
    spare connections dialed, Squid accepting them) lands on the connection that follows.
    With a fixed order (each cycle only starting at the next row) a row always followed the
    same one: two identical tray-proxy relays measured 1.25x apart in added p50 in the
    8-row bench, 0.99x with the order shuffled (docs/benchmarks.md).
    """
    names = list(targets)
    rng = random.Random(MIX_SEED)
    samples: dict[str, list[float]] = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    deadline = time.monotonic() + budget
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        order = names[:]
        rng.shuffle(order)
        for name in order:
            try:
                samples[name].append(_timed_ping(targets[name], timeout))
            except OSError:
                errors[name] += 1
    return {
        "rows": {
            name: {
                "count": len(samples[name]),
                "errors": errors[name],
                **_percentiles(samples[name]),
            }
            for name in names
        }
    }


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_us": None, "p99_us": None}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_us": statistics.median(ordered), "p99_us": p99}


# -- asyncio (concurrent) ------------------------------------------------------------------


async def open_async(
    target: Target, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = target.proxy or target.addr
        reader, writer = await asyncio.open_connection(host, port)
        if target.proxy:
            writer.write(target.connect_request)
            head = await reader.readuntil(b"\r\n\r\n")
            _check_connect_reply(head)
        return reader, writer

    return await asyncio.wait_for(dial(), timeout)


async def ping_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if writer.is_closing():  # the peer closed it first (uvloop's write would raise RuntimeError)
        raise ConnectionResetError("the connection was closed before the ping")
    writer.write(PING)
    await reader.readexactly(PING_SIZE)


async def rate(target: Target, total: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """`total` connections (connect, one ping, close) by `concurrency` workers."""
    remaining = total
    done = errors = 0

    async def worker() -> None:
        nonlocal remaining, done, errors
        while remaining > 0:
            remaining -= 1
            try:
                reader, writer = await open_async(target, timeout)
                try:
                    await asyncio.wait_for(ping_once(reader, writer), timeout)
                finally:
                    writer.close()
                done += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"done": done, "errors": errors, "seconds": elapsed, "conn_s": done / elapsed}


async def paced(
    targets: list[Target], per_second: float, seconds: float, concurrency: int, timeout: float
) -> dict[str, Any]:
    """New connections (connect, one ping, close) at a steady `per_second` for `seconds`,
    taking the targets in turn; at most `concurrency` at once.

    Starts follow a fixed schedule (start i at i / per_second), not the previous connection's
    end, so a relay that slows down shows as connections started late (`late_starts`, more
    than 50 ms behind the schedule) and a lower achieved rate, not as a gentler load."""
    gate = asyncio.Semaphore(concurrency)
    total = int(per_second * seconds)
    done = errors = late = 0
    kinds: dict[str, int] = {}  # the failures by exception, for the report
    times: list[float] = []
    running: set[asyncio.Task[None]] = set()

    async def one(target: Target) -> None:
        nonlocal done, errors
        try:
            started = time.perf_counter()
            reader, writer = await open_async(target, timeout)
            try:
                await asyncio.wait_for(ping_once(reader, writer), timeout)
            finally:
                writer.close()
            times.append((time.perf_counter() - started) * 1e6)
            done += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            errors += 1
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
        finally:
            gate.release()

    begin = time.perf_counter()
    for i in range(total):
        due = begin + i / per_second
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        if time.perf_counter() - due > 0.05:
            late += 1
        task = asyncio.ensure_future(one(targets[i % len(targets)]))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.wait(list(running), timeout=timeout * 3)
    elapsed = time.perf_counter() - begin
    return {
        "started": total,
        "done": done,
        "errors": errors,
        "late_starts": late,
        "error_kinds": kinds,
        "seconds": elapsed,
        "conn_s": done / elapsed,
        **_percentiles(times),
    }


async def idle(
    target: Target, count: int, probes: int, timeout: float, budget: float
) -> dict[str, Any]:
    """Open `count` tunnels (each proven by one ping), report, wait for a go, probe, close."""
    held: list[asyncio.StreamWriter] = []
    errors = 0
    gate = asyncio.Semaphore(100)  # opening 2,000 at once would only measure SYN backlogs

    async def open_one() -> None:
        nonlocal errors
        async with gate:
            try:
                reader, writer = await open_async(target, timeout)
                await asyncio.wait_for(ping_once(reader, writer), timeout)
                held.append(writer)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                errors += 1

    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(count))), budget)
        print(json.dumps({"event": "open", "open": len(held), "errors": errors}), flush=True)
        line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), budget)
        if line.strip() != "probe":
            return {"open": len(held), "errors": errors, "aborted": True}
        result = await loop.run_in_executor(None, latency, target, probes, timeout, budget)
        return {"open": len(held), "open_errors": errors, "probe": result}
    finally:
        for writer in held:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["bulk", "latency", "mix", "rate", "idle", "paced"])
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        help="origin ip:port (every mode but mix; paced takes several, in turn)",
    )
    parser.add_argument(
        "--row", action="append", default=[], help="mix: NAME=ip:port, once per row"
    )
    parser.add_argument(
        "--proxied-row", action="append", default=[], help="mix: NAME speaks CONNECT via --proxy"
    )
    parser.add_argument("--proxy", help="Squid ip:port: speak CONNECT to it ourselves")
    parser.add_argument("--user")
    parser.add_argument("--password-file")
    parser.add_argument("--direction", choices=["up", "down"], default="down")
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=10.0, help="per connection step")
    parser.add_argument("--budget", type=float, default=120.0, help="whole run, seconds")
    parser.add_argument("--per-second", type=float, default=1000.0, help="paced: new conn/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="paced: for how long")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "mix":
        targets: dict[str, Target] = {}
        for spec in args.row:
            name, _, addr = spec.partition("=")
            proxy = args.proxy if name in args.proxied_row else None
            targets[name] = Target(addr, proxy, args.user, args.password_file)
        if not targets:
            parser.error("mix needs at least one --row NAME=ip:port")
        result = mix(targets, args.count, args.timeout, args.budget)
        print(json.dumps({"event": "result", **result}), flush=True)
        return 0
    if not args.target:
        parser.error(f"{args.mode} needs --target")
    if args.mode == "paced":
        import uvloop

        dials = [Target(t, args.proxy, args.user, args.password_file) for t in args.target]
        coro = paced(dials, args.per_second, args.seconds, args.concurrency, args.timeout)
        result = uvloop.run(asyncio.wait_for(coro, args.budget))
        print(json.dumps({"event": "result", **result}), flush=True)
        return 0
    if len(args.target) > 1:
        parser.error(f"{args.mode} takes one --target")
    target = Target(args.target[0], args.proxy, args.user, args.password_file)
    if args.mode == "bulk":
        result = bulk(target, args.direction, args.bytes, args.timeout)
    elif args.mode == "latency":
        result = latency(target, args.count, args.timeout, args.budget)
    else:
        import uvloop

        if args.mode == "rate":
            coro = rate(target, args.count, args.concurrency, args.timeout)
            result = uvloop.run(asyncio.wait_for(coro, args.budget))
        else:
            coro = idle(target, args.count, args.probes, args.timeout, args.budget)
            result = uvloop.run(coro)
    print(json.dumps({"event": "result", **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
