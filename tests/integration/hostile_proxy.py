"""A misbehaving HTTP CONNECT proxy for the lab, run as a script in the proxy namespace.

The first label of the CONNECT target picks how it answers, so one stub (and one relay)
covers every case: `CONNECT bighead.hostile.lab.test:80` gets a 1 MiB head, and so on.

- bighead      a 200 status line followed by 1 MiB of header lines
- manyheaders  a 200 with 10,000 small headers
- nul          a 200 whose header holds a NUL byte
- badstatus    a status line that is not HTTP
- glued        a valid 200 with GLUED bytes right after the head, then a real tunnel
- auth         407 Proxy Authentication Required
- silent       reads the request, never answers (holds the connection until the peer leaves)
- anything else: a well-behaved 200 and a real tunnel to --origin at the CONNECT's port

Each connection is logged as one JSON line (mode, target, whether Proxy-Authorization was
sent; never its value). Prints READY once listening; exits when stdin closes.

Runs as a plain script with `python -I`: stdlib only. Must not import tray_proxy, pytest or
the lab modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from typing import Any

GLUED = b"GLUED-BYTES-BEFORE-THE-ORIGIN\n"
MAX_HEAD = 64 * 1024
HOLD_LIMIT = 60.0  # the silent mode never holds a connection longer than this
IO_TIMEOUT = 30.0
CHUNK = 64 * 1024
OK_HEAD = b"HTTP/1.1 200 Connection established\r\n\r\n"


class EventLog:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the stub
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        event["t"] = round(time.time(), 6)
        with self._lock:
            self._file.write(json.dumps(event) + "\n")


def read_head(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more or len(data) > MAX_HEAD:
            return None
        data += more
    return data


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send what the relay still accepts; a relay that hangs up on us is the expected outcome."""
    try:
        view = memoryview(data)
        while view:
            sent = sock.send(view[:CHUNK])
            view = view[sent:]
    except OSError:
        return False
    return True


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF, then half-close dst (the other direction keeps going)."""
    with contextlib.suppress(OSError):
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def tunnel(client: socket.socket, origin: str, port: int, head: bytes) -> None:
    upstream = socket.create_connection((origin, port), timeout=IO_TIMEOUT)
    with upstream:
        if not send_quietly(client, head):
            return
        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(IO_TIMEOUT)


def big_head() -> bytes:
    line = b"X-Pad: " + b"a" * 1017 + b"\r\n"  # 1 KiB per line
    return b"HTTP/1.1 200 Connection established\r\n" + line * 1024 + b"\r\n"


def many_headers() -> bytes:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    return b"HTTP/1.1 200 Connection established\r\n" + lines + b"\r\n"


ANSWERS = {
    "bighead": big_head(),
    "manyheaders": many_headers(),
    "nul": b"HTTP/1.1 200 Connection established\r\nX-Nul: a\x00b\r\n\r\n",
    "badstatus": b"HTTP/1.1 two-hundred established\r\n\r\n",
    "auth": (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="hostile"\r\nContent-Length: 0\r\n\r\n'
    ),
}


def handle(client: socket.socket, origin: str, log: EventLog) -> None:
    event: dict[str, Any] = {}
    with client:
        client.settimeout(IO_TIMEOUT)
        try:
            head = read_head(client)
            if head is None:
                event["error"] = "no complete request head"
                return
            lines = head.split(b"\r\n")
            parts = lines[0].decode("latin-1").split()
            target = parts[1] if len(parts) == 3 and parts[0] == "CONNECT" else ""
            host, _, port = target.rpartition(":")
            mode = host.split(".", 1)[0].lower() if host else "bad-request"
            event.update(
                mode=mode,
                target=target,
                proxy_authorization=any(
                    line.lower().startswith(b"proxy-authorization:") for line in lines
                ),
            )
            if mode in ANSWERS:
                event["delivered"] = send_quietly(client, ANSWERS[mode])
                # Let the relay act on what it got before we hang up.
                with contextlib.suppress(OSError):
                    client.recv(1)
            elif mode == "silent":
                client.settimeout(HOLD_LIMIT)
                with contextlib.suppress(OSError):
                    while client.recv(4096):
                        pass
            elif mode == "glued":
                tunnel(client, origin, int(port), OK_HEAD + GLUED)
            else:
                tunnel(client, origin, int(port), OK_HEAD)
        except (OSError, ValueError) as exc:
            event["error"] = str(exc)
        finally:
            log.write(**event)


def serve(listener: socket.socket, origin: str, log: EventLog) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(client, origin, log), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", action="append", required=True, help="address (repeatable)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True, help="where good tunnels go")
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    log = EventLog(args.log)
    for addr in args.listen:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((addr, args.port))
        listener.listen(128)
        threading.Thread(target=serve, args=(listener, args.origin, log), daemon=True).start()
    print("READY", flush=True)
    # Exit when the test closes our stdin (or kills us): never outlive the test run.
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
