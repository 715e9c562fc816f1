"""Self-tests of the real-proxy lab: real curl through real Squid and Dante, origin behaviour
(bodies, half-close), the lab's nft redirect, and complete teardown.

Must not import tray_proxy or PySide6.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.dante import DanteProxy
from tests.lab.environment import Lab
from tests.lab.netns import (
    NETNS_ETC_DIR,
    PREFIX,
    LabError,
    Namespace,
    cleanup_stale,
    list_lab_namespaces,
    render_redirect,
)
from tests.lab.origins import HOSTNAME
from tests.lab.squid import SquidProxy

pytestmark = pytest.mark.lab


def _seed() -> str:
    """A seed unique to one request, so log lines of this test cannot be confused."""
    return secrets.token_hex(6)


def _recv_all(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _proxy_addr(lab: Lab, family: int) -> str:
    addr = lab.proxy.v4 if family == 4 else lab.proxy.v6
    assert addr is not None
    return addr


# Squid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_https_through_squid_by_name(lab: Lab, family: int) -> None:
    seed, size = _seed(), 300_000
    t0 = time.time()
    result = lab.curl(
        lab.origins.url("https", lab.origins.bytes_path(size, seed)),
        via=lab.squid,
        family=family,
        resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
    )
    assert result.returncode == 0, result
    assert (result.connect_code, result.http_code) == (200, 200)
    assert result.sha256 == lab.origins.expected_sha256(size, seed)

    creds = lab.squid.credentials
    assert creds is not None
    entry = lab.squid.wait_for_entry(
        lambda e: (
            e.method == "CONNECT"
            and e.uri == f"{HOSTNAME}:443"
            and e.client == (lab.client.v4 if family == 4 else lab.client.v6)
            # The session's Squid log is shared with other tests: only this one's request.
            and e.time >= t0 - 0.002
        )
    )
    assert (entry.user, entry.status) == (creds.username, 200)
    # The origin saw the proxy, not the client: the bytes went through Squid.
    event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""))
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)


@pytest.mark.parametrize("family", [4, 6])
def test_plain_http_through_squid(lab: Lab, family: int) -> None:
    seed, size = _seed(), 50_000
    path = lab.origins.bytes_path(size, seed)
    result = lab.curl(lab.origins.url("http", path), via=lab.squid, family=family)
    assert result.returncode == 0, result
    assert result.http_code == 200
    assert result.sha256 == lab.origins.expected_sha256(size, seed)
    entry = lab.squid.wait_for_entry(lambda e: seed in e.uri)
    assert (entry.method, entry.status) == ("GET", 200)
    assert entry.uri == f"http://{HOSTNAME}{path}"


def test_https_to_ipv6_literal_through_squid(lab: Lab) -> None:
    seed = _seed()
    result = lab.curl(
        lab.origins.url("https", lab.origins.bytes_path(1000, seed), host="v6"),
        via=lab.squid,
        family=6,
    )
    assert result.returncode == 0, result
    assert result.sha256 == lab.origins.expected_sha256(1000, seed)
    lab.squid.wait_for_entry(lambda e: e.uri == f"[{lab.origins.v6}]:443" and e.status == 200)


def test_post_echo_through_squid(lab: Lab) -> None:
    payload = os.urandom(200_000)
    result = lab.curl(lab.origins.url("https", "/echo"), via=lab.squid, data=payload)
    assert result.returncode == 0, result
    assert result.body == payload


def test_squid_refuses_wrong_and_missing_password(lab: Lab) -> None:
    creds = lab.squid.credentials
    assert creds is not None
    t0 = time.time()  # the session's Squid log is shared with other tests
    wrong = lab.curl(lab.origins.url("https"), via=lab.squid, credentials=creds.wrong())
    assert wrong.connect_code == 407, wrong
    assert wrong.returncode != 0
    missing = lab.curl(lab.origins.url("http"), via=lab.squid, credentials=False)
    assert missing.http_code == 407, missing
    entry = lab.squid.wait_for_entry(
        lambda e: e.method == "CONNECT" and e.status == 407 and e.time >= t0 - 0.002
    )
    assert entry.uri == f"{HOSTNAME}:443"


def test_squid_factory_without_auth_on_port_80(
    lab: Lab, squid_factory: Callable[..., SquidProxy]
) -> None:
    squid = squid_factory(port=80, auth="none")
    assert squid.credentials is None
    seed = _seed()
    result = lab.curl(lab.origins.url("https", lab.origins.bytes_path(10, seed)), via=squid)
    assert result.returncode == 0, result
    entry = squid.wait_for_entry(lambda e: e.method == "CONNECT")
    assert entry.user == "-"
    # A fresh instance has its own log: the session Squid never saw this request.
    assert not [e for e in lab.squid.entries() if seed in e.uri]


# Dante ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_https_through_dante(lab: Lab, family: int) -> None:
    seed, size = _seed(), 300_000
    result = lab.curl(
        lab.origins.url("https", lab.origins.bytes_path(size, seed)), via=lab.dante, family=family
    )
    assert result.returncode == 0, result
    assert result.sha256 == lab.origins.expected_sha256(size, seed)
    client = lab.client.v4 if family == 4 else lab.client.v6
    lab.dante.wait_for_log(f"username%{lab.dante.credentials.username}@{client}")
    event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""))
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)


def test_dante_refuses_wrong_password(lab: Lab) -> None:
    seed = _seed()
    result = lab.curl(
        lab.origins.url("http", lab.origins.bytes_path(10, seed)),
        via=lab.dante,
        credentials=lab.dante.credentials.wrong(),
    )
    assert result.returncode == 97, result  # CURLE_PROXY: the SOCKS5 handshake failed
    assert result.body == b""
    lab.dante.wait_for_log("password authentication failed")
    assert not [e for e in lab.origins.events() if seed in e.get("path", "")]


def test_no_proxy_secret_in_any_argv(lab: Lab) -> None:
    secrets_ = [lab.dante.credentials.password]
    if lab.squid.credentials is not None:
        secrets_.append(lab.squid.credentials.password)
    pids = lab.proxy.pids()
    assert pids, "no process found in the proxy namespace"
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert not any(s in cmdline for s in secrets_), f"secret in argv of pid {pid}"


# origin TCP server, directly from the client namespace -------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_echo_half_close_from_client(lab: Lab, family: int) -> None:
    addr = lab.origins.v4 if family == 4 else lab.origins.v6
    payload = os.urandom(1_000_000)
    with lab.client.connect(addr, lab.origins.tcp_port, timeout=10) as sock:
        sent: list[int] = []

        def send() -> None:  # a separate writer: echo of 1 MB would fill both windows
            sock.sendall(b"ECHO\n" + payload)
            sock.shutdown(socket.SHUT_WR)
            sent.append(len(payload))

        writer = threading.Thread(target=send)
        writer.start()
        echoed = _recv_all(sock)
        writer.join(timeout=10)
    assert sent == [len(payload)]
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    client = lab.client.v4 if family == 4 else lab.client.v6
    lab.origins.wait_for_event(
        lambda e: (
            e.get("mode") == "ECHO"
            and e.get("received") == len(payload)
            and e.get("peer") == client
        )
    )


def test_tcp_send_then_half_close_keeps_upstream_open(lab: Lab) -> None:
    seed, size = _seed(), 500_000
    with lab.client.connect(lab.origins.v4, lab.origins.tcp_port, timeout=10) as sock:
        sock.sendall(f"SEND {size} {seed}\n".encode())
        received = _recv_all(sock)  # ends at the server's half-close
        # Our direction is still open after the server's EOF: it must receive this.
        sock.sendall(b"x" * 1234)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert hashlib.sha256(received).hexdigest() == lab.origins.expected_sha256(size, seed)
    event = lab.origins.wait_for_event(
        lambda e: e.get("mode") == "SEND" and e.get("sent") == size and e.get("received") == 1234
    )
    assert "error" not in event


def test_tcp_sink_reports_count_and_hash(lab: Lab) -> None:
    payload = os.urandom(300_000)
    with lab.client.connect(lab.origins.v6, lab.origins.tcp_port, timeout=10) as sock:
        sock.sendall(b"SINK\n" + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = _recv_all(sock)
    assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


# nft redirect -----------------------------------------------------------------------------------


def test_render_redirect_excludes_proxies() -> None:
    text = render_redirect(15080, (80, 443), ["10.200.2.2", "fd00:200:2::2"])
    assert "ip daddr { 10.200.2.2 } return" in text
    assert "ip6 daddr { fd00:200:2::2 } return" in text
    assert text.index("return") < text.index("redirect to :15080")


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST of a redirected connection."""
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    raw = conn.getsockopt(socket.SOL_IP, 80, 16)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")


def test_redirect_captures_origin_but_not_proxy(
    lab: Lab, squid_factory: Callable[..., SquidProxy]
) -> None:
    squid = squid_factory(port=443, auth="none")  # an upstream on 443 must not loop
    listen4 = lab.client.listen("127.0.0.1")
    relay_port = listen4.getsockname()[1]
    listen6 = lab.client.listen("::1", relay_port)
    captured: list[tuple[str, str, int]] = []

    def accept(listener: socket.socket) -> None:
        listener.settimeout(15)
        with contextlib.suppress(OSError):
            conn, peer = listener.accept()
            with conn:
                captured.append((peer[0], *_original_dst(conn)))

    threads = [threading.Thread(target=accept, args=(s,)) for s in (listen4, listen6)]
    try:
        with lab.redirect(relay_port):
            tables = lab.client.run(["nft", "list", "tables"]).stdout.decode()
            assert "tray_proxy_lab" in tables
            for thread in threads:
                thread.start()
            # Through the excluded proxy on 443: not redirected, reaches Squid.
            seed = _seed()
            url = lab.origins.url("https", lab.origins.bytes_path(5, seed))
            through = lab.curl(url, via=squid)
            assert through.returncode == 0, through
            squid.wait_for_entry(lambda e: e.method == "CONNECT" and e.status == 200)
            # Direct to the origin on 443 (v4 and v6): captured by the redirect.
            for host in ("v4", "v6"):
                direct = lab.curl(lab.origins.url("https", "/health", host=host), max_time=5)
                assert direct.returncode != 0, direct
            for thread in threads:
                thread.join(timeout=20)
        assert sorted(captured) == sorted(
            [(lab.client.v4, lab.origins.v4, 443), (lab.client.v6, lab.origins.v6, 443)]
        )
        tables = lab.client.run(["nft", "list", "tables"]).stdout.decode()
        assert "tray_proxy_lab" not in tables
    finally:
        listen4.close()
        listen6.close()


# lifecycle --------------------------------------------------------------------------------------


def _dead(pid: int, timeout: float = 5.0) -> bool:
    """Gone or a zombie: orphaned helpers wait for init to reap them, but no longer run."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _assert_gone(names: list[str], pids: list[int], user: str, tmp: Path) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout
    for name in names:
        assert name.encode() not in listed, f"namespace {name} left behind"
        assert not (NETNS_ETC_DIR / name).exists()
    for pid in pids:
        assert _dead(pid), f"process {pid} survived the lab"
    assert f"\n{user}:" not in "\n" + Path("/etc/passwd").read_text()
    assert not tmp.exists()


def test_teardown_leaves_nothing() -> None:
    with Lab() as lab:
        names = [ns.name for ns in lab.namespaces]
        pids = [pid for ns in lab.namespaces for pid in ns.pids()]
        user, tmp = lab.dante.credentials.username, lab.tmp
        assert len(pids) >= 3  # origins, squid (+ helpers), danted
        assert set(names) <= set(list_lab_namespaces())
    _assert_gone(names, pids, user, tmp)


def test_guardian_cleans_up_after_killed_creator() -> None:
    # A process that builds a lab and is then SIGKILLed runs no teardown at all.
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from tests.lab import Lab\n"
        "lab = Lab().__enter__()\n"
        "print(lab.tag, lab.dante.credentials.username, lab.tmp, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    creator = subprocess.Popen(
        [sys.executable, "-c", code, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert creator.stdout is not None
        line = creator.stdout.readline().decode().split()
        assert len(line) == 3, creator.stderr.read().decode() if creator.stderr else ""
        tag, user, tmp = line
        names = [n for n in list_lab_namespaces() if n.startswith(tag + "-")]
        assert len(names) == 4
        pids = [pid for name in names for pid in Namespace(name, "?").pids()]
        assert pids
    finally:
        creator.kill()
        creator.wait()
        for pipe in (creator.stdout, creator.stderr):
            if pipe is not None:
                pipe.close()
    deadline = time.monotonic() + 20
    while any(n.startswith(tag + "-") for n in list_lab_namespaces()):
        assert time.monotonic() < deadline, "guardian did not remove the namespaces"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while Path(tmp).exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the guardian removes the directory last
    _assert_gone(names, pids, user, Path(tmp))


def test_failed_setup_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A config danted rejects: the build fails at its last step, after everything else runs.
    monkeypatch.setattr(DanteProxy, "render_config", lambda self: "this is not a config\n")
    lab = Lab()
    with pytest.raises(LabError, match="danted"):
        lab.__enter__()
    user = lab.dante_user.credentials.username if lab.dante_user else "-"
    _assert_gone([ns.name for ns in lab.namespaces], [], user, lab.tmp)


def test_cleanup_stale_removes_dead_runs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{PREFIX}{dead.pid}-{secrets.token_hex(3)}-cli"
    alive = Namespace(f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-cli", "client")
    stale = Namespace(name, "client")
    sleeper = None
    try:
        stale.create()
        alive.create()
        # A process left running inside the stale namespace must die with it.
        sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        deadline = time.monotonic() + 5
        while not stale.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stale.pids()
        removed = cleanup_stale()
        assert f"netns {name}" in removed
        assert name not in list_lab_namespaces()
        assert alive.name in list_lab_namespaces()
        assert sleeper.wait(timeout=10) != 0
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        stale.close()
        alive.close()
