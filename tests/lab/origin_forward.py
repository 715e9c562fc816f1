"""An extra origin for the port-80 forwarding tests, run as a script in the origin namespace.

The lab's origin (origin_server.py) answers with Content-Length only. Forwarding must also
carry a chunked response and one without any length (read to close), so this one adds:
`GET|HEAD /chunked/<n>?seed=<s>` (Transfer-Encoding: chunked, pieces of uneven size) and
`GET /close/<n>?seed=<s>` (HTTP/1.0 style: no length, the end is the close), and with
`--static DIR` the files under DIR as `/repo/...` (an apt repository). Bodies are
origin_server's pattern, so `Origins.expected_sha256` gives their checksums. Every request is
appended to the log as a JSON line with the peer address (who connected: the proxy).

Stdlib only, started with `python -I`; imports origin_server from its own directory. Must
not import tray_proxy, pytest or other lab modules.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# `python -I` leaves the script's own directory off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from origin_server import DualStackHTTPServer, EventLog, Handler, pattern_chunks  # noqa: E402

MAX_BODY = 1024**3


class ForwardHandler(Handler):  # type: ignore[misc]
    static: Path | None = None

    def _file(self, head_only: bool) -> None:
        """A file under --static, as plain HTTP servers (and Debian mirrors) serve them."""
        root = self.static
        relative = urlsplit(self.path).path.removeprefix("/repo/")
        path = (root / relative).resolve() if root is not None else None
        if path is None or root is None or not path.is_relative_to(root) or not path.is_file():
            self._reply(404, b"not found\n")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        self.end_headers()
        if not head_only:
            self.wfile.write(data)
        self._event(200, 0 if head_only else len(data))

    def _sized(self, prefix: str) -> tuple[int, str] | None:
        url = urlsplit(self.path)
        try:
            n = int(url.path.removeprefix(prefix))
        except ValueError:
            return None
        if not 0 <= n <= MAX_BODY:
            return None
        return n, parse_qs(url.query).get("seed", ["0"])[0]

    def _chunked(self, head_only: bool) -> None:
        sized = self._sized("/chunked/")
        if sized is None:
            self._reply(400, b"bad length\n")
            return
        n, seed = sized
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        if not head_only:
            for block in pattern_chunks(n, seed, chunk=40_000):
                self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                sent += len(block)
            self.wfile.write(b"0\r\n\r\n")
        self._event(200, sent)

    def do_GET(self) -> None:
        if self.path.startswith("/repo/"):
            self._file(head_only=False)
            return
        if self.path.startswith("/chunked/"):
            self._chunked(head_only=False)
            return
        if self.path.startswith("/close/"):
            sized = self._sized("/close/")
            if sized is None:
                self._reply(400, b"bad length\n")
                return
            n, seed = sized
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            sent = 0
            for block in pattern_chunks(n, seed):
                self.wfile.write(block)
                sent += len(block)
            self.close_connection = True
            self._event(200, sent)
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        if self.path.startswith("/repo/"):
            self._file(head_only=True)
            return
        if self.path.startswith("/chunked/"):
            self._chunked(head_only=True)
            return
        self._reply(404, b"")


class ForwardServer(DualStackHTTPServer):  # type: ignore[misc]
    def __init__(self, port: int, log: EventLog) -> None:
        self.log = log
        self.tls = None
        self.scheme = "http"
        super(DualStackHTTPServer, self).__init__(("::", port), ForwardHandler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--static", type=Path)
    args = parser.parse_args()
    if args.static is not None:
        ForwardHandler.static = args.static.resolve()
    server: Any = ForwardServer(args.port, EventLog(args.log))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("READY", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # the test closes our stdin: never outlive it
    return 0


if __name__ == "__main__":
    sys.exit(main())
