"""Can this kernel NAT-redirect? Run as a script: `python3 -I nat_probe.py NFT TABLE [--lo-up]`.

The doctor starts it in a throwaway network namespace (`unshare --net`, or `unshare --user
--map-root-user --net` for a normal user), where `--lo-up` first switches the namespace's
loopback on; as root without namespaces, in the host's namespace with a uniquely named table.
It holds two loopback ports of its own (A, listening, and D, bound only so no other program
can use it), applies `table inet TABLE` whose nat output chain redirects 127.0.0.1:D to :A
(the same `redirect to :PORT` the real ruleset uses), connects to 127.0.0.1:D and expects the
connection on A; then deletes the table. Nothing but its own connection can match the rule.
Prints one JSON line: {"ok": true} or {"ok": false, "stage": ..., "error": ...}.

Standard library only (it runs with `python3 -I`); must not import tray_proxy.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import subprocess
import sys

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
TIMEOUT = 5.0


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _nft(nft: str, text: str) -> str:
    done = subprocess.run(
        [nft, "-f", "-"], input=text.encode(), capture_output=True, timeout=TIMEOUT, check=False
    )
    if done.returncode != 0:
        return done.stderr.decode("utf-8", "replace").strip() or f"nft exited {done.returncode}"
    return ""


def probe(nft: str, table: str, lo_up: bool) -> dict[str, object]:
    if lo_up:
        try:
            _lo_up()
        except OSError as exc:
            return {"ok": False, "stage": "loopback", "error": str(exc)}
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as arrive,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as decoy,
    ):
        arrive.bind(("127.0.0.1", 0))
        arrive.listen(1)
        arrive.settimeout(TIMEOUT)
        decoy.bind(("127.0.0.1", 0))
        to_port = arrive.getsockname()[1]
        from_port = decoy.getsockname()[1]
        rules = (
            f"table inet {table} {{\n"
            "  chain out {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr 127.0.0.1 tcp dport {from_port} redirect to :{to_port}\n"
            "  }\n"
            "}\n"
        )
        error = _nft(nft, rules)
        if error:
            return {"ok": False, "stage": "apply", "error": error}
        try:
            with socket.create_connection(("127.0.0.1", from_port), timeout=TIMEOUT):
                conn, _ = arrive.accept()
                conn.close()
        except OSError as exc:
            return {"ok": False, "stage": "connect", "error": str(exc)}
        finally:
            deleted = _nft(nft, f"delete table inet {table}\n")
        if deleted:
            return {"ok": False, "stage": "delete", "error": deleted}
    return {"ok": True}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--lo-up"):
        print("usage: nat_probe.py NFT TABLE [--lo-up]", file=sys.stderr)
        return 2
    try:
        result = probe(argv[0], argv[1], len(argv) == 3)
    except (OSError, subprocess.SubprocessError) as exc:
        result = {"ok": False, "stage": "setup", "error": str(exc)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
