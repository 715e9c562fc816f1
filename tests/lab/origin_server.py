"""Origin servers of the lab, run as a script inside the origin namespace.

HTTP and HTTPS (ThreadingHTTPServer) with `/bytes/<n>?seed=<s>`, `POST /echo`, `/health`, and a
raw TCP server whose first line picks a mode (`ECHO`, `SEND <n> <seed>`, `SINK`) to test bulk
transfer and half-close in both directions. Every socket is dual-stack (IPv4 and IPv6). Each
request and TCP session is appended as a JSON line to the log file, with the peer address, so
tests can prove who connected (the proxy, not the client).

Runs as a plain script with `python -I`: stdlib only. Must not import tray_proxy, pytest or
other lab modules (origins.py imports this one for `pattern_chunks`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
MAX_BODY = 64 * 1024**3  # /bytes bound: large enough for bulk benchmarks, still finite
MAX_ECHO = 256 * 1024**2  # /echo holds the body in memory
MAX_LINE = 256


def pattern_chunks(n: int, seed: str, chunk: int = CHUNK) -> Iterator[bytes]:
    """The deterministic pseudo-random body of `/bytes/<n>?seed=<seed>` and `SEND n seed`."""
    rng = random.Random(f"tplab:{seed}")
    remaining = n
    while remaining > 0:
        size = min(chunk, remaining)
        yield rng.randbytes(size)
        remaining -= size


def pattern_sha256(n: int, seed: str) -> str:
    digest = hashlib.sha256()
    for block in pattern_chunks(n, seed):
        digest.update(block)
    return digest.hexdigest()


class EventLog:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the server
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        event["t"] = round(time.time(), 6)
        with self._lock:
            self._file.write(json.dumps(event) + "\n")


def _peer(address: Any) -> str:
    host = str(address[0])
    return host.removeprefix("::ffff:")


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, port: int, log: EventLog, tls: ssl.SSLContext | None) -> None:
        self.log = log
        self.tls = tls
        self.scheme = "https" if tls else "http"
        super().__init__(("::", port), Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake in the per-connection thread, so one slow client cannot stall accept().
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.log.write(kind="tls-error", peer=_peer(client_address), error=str(exc))
            return
        with conn:
            super().finish_request(conn, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tplab-origin/1"
    timeout = 120
    server: DualStackHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # structured events go to EventLog instead

    def _event(self, status: int, sent: int, received: int = 0) -> None:
        self.server.log.write(
            kind=self.server.scheme,
            peer=_peer(self.client_address),
            method=self.command,
            path=self.path,
            host=self.headers.get("Host"),
            status=status,
            sent=sent,
            received=received,
        )

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._event(status, len(body))

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            self._reply(200, b"ok\n")
            return
        if url.path.startswith("/bytes/"):
            try:
                n = int(url.path.removeprefix("/bytes/"))
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_BODY:
                self._reply(400, b"bad length\n")
                return
            seed = parse_qs(url.query).get("seed", ["0"])[0]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            for block in pattern_chunks(n, seed):
                self.wfile.write(block)
                sent += len(block)
            self._event(200, sent)
            return
        self._reply(404, b"not found\n")

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(MAX_LINE)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(MAX_LINE) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += size
                if total > MAX_ECHO:
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline(MAX_LINE)
        length = int(self.headers.get("Content-Length", "0"))
        if not 0 <= length <= MAX_ECHO:
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/echo":
            self._reply(404, b"not found\n")
            return
        body = self._read_body()
        if body is None:
            self.close_connection = True
            self._reply(413, b"too large\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._event(200, len(body), len(body))


class DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, port: int, log: EventLog) -> None:
        self.log = log
        super().__init__(("::", port), TCPHandler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _read_line(sock: socket.socket) -> tuple[bytes, bytes]:
    """The first line (without newline) and whatever arrived after it."""
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        more = sock.recv(MAX_LINE)
        if not more:
            break
        data += more
    line, _, rest = data.partition(b"\n")
    return line.strip(), rest


class TCPHandler(socketserver.BaseRequestHandler):
    """ECHO: echo until EOF, then half-close back. SEND n seed: send n bytes, half-close,
    drain until the peer's EOF. SINK: read until EOF, answer `<count> <sha256>\\n`."""

    server: DualStackTCPServer
    request: socket.socket

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(120)
        event: dict[str, Any] = {"kind": "tcp", "peer": _peer(self.client_address)}
        try:
            line, rest = _read_line(sock)
            words = line.decode("ascii", "replace").split()
            mode = words[0].upper() if words else ""
            event["mode"] = mode
            if mode == "ECHO":
                event.update(self._echo(sock, rest))
            elif mode == "SEND" and len(words) == 3:
                event.update(self._send(sock, int(words[1]), words[2]))
            elif mode == "SINK":
                event.update(self._sink(sock, rest))
            else:
                sock.sendall(b"ERR use ECHO | SEND <n> <seed> | SINK\n")
                event["error"] = "bad mode"
        except (OSError, ValueError) as exc:
            event["error"] = str(exc)
        self.server.log.write(**event)

    @staticmethod
    def _echo(sock: socket.socket, rest: bytes) -> dict[str, Any]:
        total = len(rest)
        if rest:
            sock.sendall(rest)
        buf = bytearray(CHUNK)
        while True:
            n = sock.recv_into(buf)
            if n == 0:
                break
            sock.sendall(memoryview(buf)[:n])
            total += n
        sock.shutdown(socket.SHUT_WR)
        return {"received": total, "sent": total, "peer_eof_first": True}

    @staticmethod
    def _send(sock: socket.socket, n: int, seed: str) -> dict[str, Any]:
        if not 0 <= n <= MAX_BODY:
            raise ValueError("bad length")
        sent = 0
        for block in pattern_chunks(n, seed):
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
        received = 0
        while True:  # the peer may keep talking after our EOF: half-close, not close
            more = sock.recv(CHUNK)
            if not more:
                break
            received += len(more)
        return {"sent": sent, "received": received}

    @staticmethod
    def _sink(sock: socket.socket, rest: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(rest)
        total = len(rest)
        while True:
            more = sock.recv(CHUNK)
            if not more:
                break
            digest.update(more)
            total += len(more)
        sock.sendall(f"{total} {digest.hexdigest()}\n".encode())
        sock.shutdown(socket.SHUT_WR)
        return {"received": total, "sha256": digest.hexdigest()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--https-port", type=int, default=443)
    parser.add_argument("--tcp-port", type=int, default=5001)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    log = EventLog(args.log)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    servers: list[socketserver.BaseServer] = [
        DualStackHTTPServer(args.http_port, log, None),
        DualStackHTTPServer(args.https_port, log, tls),
        DualStackTCPServer(args.tcp_port, log),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("READY", flush=True)
    # Exit when the lab closes our stdin (or kills us): never outlive the test run.
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
