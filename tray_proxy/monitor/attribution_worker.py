"""The child process that runs process attribution's lookups for the relay (see
`tray_proxy.monitor.attribution.Attributor`), so they never take the relay's GIL.

    python -I -m tray_proxy.monitor.attribution_worker --relay-pid PID [--delay S]
        [--cpu-share F]

Requests on stdin, one a line: `id client-ip client-port [dst-ip dst-port]`. Answers on
stdout, one JSON line per lookup pass: `[[id, null | [pid, name, exe, user, exited,
container, remote]], ...]`, every request answered once. One pass per burst: a burst
gathers for `delay` after its first request; the passes keep to `cpu_share` of one core
(a token bucket). It runs at a lower priority than the relay and the UI, and ends at
stdin's end-of-file, or when its parent ends (PR_SET_PDEATHSIG).

Must not import PySide6 or asyncio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence

from tray_proxy.monitor import attribution
from tray_proxy.monitor.rows import ProcessInfo
from tray_proxy.relay.records import Address

log = logging.getLogger(__name__)

Request = tuple[int, Address, Address | None]

_PR_SET_PDEATHSIG = 1


def parse_request(line: bytes) -> Request | None:
    """`id ip port [ip port]` -> (id, client, destination or None); None: malformed."""
    fields = line.split()
    try:
        conn_id = int(fields[0])
        client = (fields[1].decode("ascii"), int(fields[2]))
        if len(fields) == 3:
            return conn_id, client, None
        if len(fields) == 5:
            return conn_id, client, (fields[3].decode("ascii"), int(fields[4]))
    except (IndexError, ValueError):
        pass
    return None


def encode_answers(answers: Sequence[tuple[int, ProcessInfo | None]]) -> bytes:
    """One pass's answers as one JSON line (ProcessInfo's fields in their order)."""
    return (
        json.dumps(
            [
                [
                    conn_id,
                    None
                    if info is None
                    else [
                        info.pid,
                        info.name,
                        info.exe,
                        info.user,
                        info.exited,
                        info.container,
                        info.remote,
                    ],
                ]
                for conn_id, info in answers
            ],
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


class Pacer:
    """When the next pass may start: `delay` after a burst's first request, and after a
    costly pass, once the CPU it took is paid back at `cpu_share` of a core (a token
    bucket of attribution._CPU_BURST seconds, a rest of at most attribution._MAX_REST)."""

    def __init__(self, delay: float, cpu_share: float) -> None:
        self.delay = delay
        self.cpu_share = cpu_share
        self.budget = attribution._CPU_BURST
        self.budget_at = 0.0
        self.rest_until = 0.0

    def start_at(self, first_at: float) -> float:
        return max(first_at + self.delay, self.rest_until)

    def spent(self, cpu: float) -> None:
        now = time.monotonic()
        share = self.cpu_share
        burst = attribution._CPU_BURST
        self.budget = min(burst, self.budget + (now - self.budget_at) * share) - cpu
        self.budget_at = now
        if self.budget < 0:
            self.rest_until = now + min(-self.budget / share, attribution._MAX_REST)


def serve(stdin_fd: int, stdout_fd: int, lookup: attribution.ProcessLookup, pacer: Pacer) -> None:
    """Read requests until end-of-file; answer each burst with one pass.

    Waiting for a pass (the burst's `delay`, or a rest), it sleeps rather than watching
    stdin: the relay's request writes meanwhile wake nobody (each wake-up cost the relay's
    loop a few µs and a CPU switch on a 2-core machine, once per connection)."""
    pending: list[Request] = []
    first_at = 0.0
    rest = b""
    os.set_blocking(stdin_fd, False)
    while True:
        if pending:
            wait = pacer.start_at(first_at) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        else:
            select.select([stdin_fd], [], [])
        data, eof = _read_available(stdin_fd)
        if data:
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                request = parse_request(line)
                if request is None:
                    log.warning("ignored a malformed request: %r", line[:200])
                    continue
                if not pending:
                    first_at = time.monotonic()
                pending.append(request)
        if eof:
            return  # the relay has gone or closed us: requests left are not waited for
        if not pending or time.monotonic() < pacer.start_at(first_at):
            continue
        burst, pending = pending, []
        cpu = time.thread_time()
        try:
            answers = lookup.find(burst)
        except Exception:  # a bug here must not leave the rows waiting forever
            log.exception("process attribution failed for %d connections", len(burst))
            answers = [(conn_id, None) for conn_id, _, _ in burst]
        _write_all(stdout_fd, encode_answers(answers))
        pacer.spent(time.thread_time() - cpu)


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What `fd` (non-blocking) holds now, and whether its end was reached."""
    chunks: list[bytes] = []
    for _ in range(256):  # 16 MiB at most at once; the rest at the next turn
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent ends (even killed), checked once against a parent that
    ended before the request was made."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tray_proxy.monitor.attribution_worker")
    parser.add_argument("--relay-pid", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0005)
    parser.add_argument("--cpu-share", type=float, default=0.02)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="tray-proxy attribution: %(levelname)s %(message)s"
    )
    _die_with_parent(os.getppid())
    with contextlib.suppress(OSError):
        os.nice(10)  # the relay and the UI first
    # Ctrl+C in a terminal reaches the whole process group: end, without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    lookup = attribution.ProcessLookup(relay_pid=args.relay_pid)
    try:
        serve(sys.stdin.fileno(), sys.stdout.fileno(), lookup, Pacer(args.delay, args.cpu_share))
    except BrokenPipeError:
        pass  # the relay stopped reading: it has gone
    finally:
        lookup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
