"""SO_ORIGINAL_DST decoding, and the real lookup inside a throwaway network namespace.

The namespace test needs root, `ip` (iproute2) and `nft` (nftables); it fails, naming the
missing piece, when they are not there. All its traffic stays inside the namespace it
creates (10.99.0.1 and fd99::1 on its loopback), which is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tray_proxy.relay.origdst import original_destination, parse_sockaddr

REPO = Path(__file__).resolve().parents[2]


def test_parse_sockaddr_in():
    raw = (
        socket.AF_INET.to_bytes(2, "little")
        + (443).to_bytes(2, "big")
        + socket.inet_pton(socket.AF_INET, "93.184.216.34")
        + bytes(8)
    )
    assert parse_sockaddr(socket.AF_INET, raw) == ("93.184.216.34", 443)


def test_parse_sockaddr_in6():
    raw = (
        socket.AF_INET6.to_bytes(2, "little")
        + (8443).to_bytes(2, "big")
        + bytes(4)  # flowinfo
        + socket.inet_pton(socket.AF_INET6, "2001:db8::7")
        + bytes(4)  # scope id
    )
    assert parse_sockaddr(socket.AF_INET6, raw) == ("2001:db8::7", 8443)


def test_no_nat_record_or_other_family_gives_none():
    a, b = socket.socketpair()
    with a, b:
        assert original_destination(a) is None


CHILD = textwrap.dedent(
    """
    import json, socket, sys
    from tray_proxy.relay.origdst import original_destination

    port, phase = int(sys.argv[1]), sys.argv[2]
    out = {}
    for family, here, there in (
        (socket.AF_INET, "127.0.0.1", "10.99.0.1"),
        (socket.AF_INET6, "::1", "fd99::1"),
    ):
        with socket.socket(family) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((here, port))
            server.listen()
            server.settimeout(5)
            targets = {"direct": (here, port)}
            if phase == "redirected":
                # Twice: the second answer comes from what the first one remembered, and
                # the caller may name the family (the engine passes its listener's).
                targets["redirected"] = (there, 443)
                targets["again"] = (there, 443)
            for what, target in targets.items():
                with socket.create_connection(target, timeout=5) as client:
                    conn, _ = server.accept()
                    with conn:
                        named = family if what == "again" else None
                        out[f"{family.name}-{what}"] = original_destination(conn, named)
                        assert conn.getpeername()[:2] == client.getsockname()[:2]
    print(json.dumps(out))
    """
)

RULES = """
table inet {table} {{
    chain out {{
        type nat hook output priority -100; policy accept;
        ip daddr 10.99.0.1 tcp dport 443 redirect to :{port}
        ip6 daddr fd99::1 tcp dport 443 redirect to :{port}
    }}
}}
"""


def _need(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{tool} is missing: install it (apt-get install iproute2 nftables)")
    return path


def test_original_destination_in_a_network_namespace():
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it creates a network namespace and an nft table)")
    ip, nft = _need("ip"), _need("nft")
    ns = f"tp-origdst-{os.getpid()}-{secrets.token_hex(3)}"
    port = 20000 + secrets.randbelow(10000)

    def sh(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            args, input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def in_ns(*args: str, stdin: str | None = None) -> str:
        return sh(ip, "netns", "exec", ns, *args, stdin=stdin)

    def probe(phase: str) -> dict:
        out = in_ns(sys.executable, "-c", CHILD, str(port), phase)
        return json.loads(out)

    sh(ip, "netns", "add", ns)
    try:
        # The namespace's own addresses, on its loopback (no dummy module needed).
        in_ns(ip, "addr", "add", "10.99.0.1/32", "dev", "lo")
        in_ns(ip, "-6", "addr", "add", "fd99::1/128", "dev", "lo", "nodad")
        in_ns(ip, "link", "set", "lo", "up")

        # No NAT in the namespace yet: the kernel has no record, the lookup says None.
        assert probe("plain") == {"AF_INET-direct": None, "AF_INET6-direct": None}

        in_ns(nft, "-f", "-", stdin=RULES.format(table=f"tp_{os.getpid()}", port=port))
        got = probe("redirected")
        assert got["AF_INET-redirected"] == ["10.99.0.1", 443]
        assert got["AF_INET6-redirected"] == ["fd99::1", 443]
        assert got["AF_INET-again"] == ["10.99.0.1", 443]
        assert got["AF_INET6-again"] == ["fd99::1", 443]
        # With conntrack on, a direct connection reports the relay's own address: this is
        # why the engine refuses connections whose original destination is itself.
        assert got["AF_INET-direct"] == ["127.0.0.1", port]
        assert got["AF_INET6-direct"] == ["::1", port]
    finally:
        subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30, check=False)
    assert ns not in sh(ip, "netns", "list")
