"""Routing at the relay level with real components (issue 15 sections 2-4): `tray-proxy run`
with several `[[upstream]]`s, `[routing]` and `[[rule]]`s in its settings file, in the lab's
client namespace behind an nft redirect; real Squids (two of the lab's kind, and one with
Debian's stock squid.conf), real curl with no proxy settings, the lab origins, and a PAC file
served from the origin namespace.

The redirect here is the lab's (tests/lab/netns.py) plus what the real helper adds for DIRECT
connections: the relay's reserved source ports (61000-64999, RelaySettings.source_ports) are
let through, so the relay's own connection to the destination is not redirected back to it.

Must not import tray_proxy (the relay runs as a separate process) or PySide6.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import h11
import pytest
import tomli_w

from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess, Redirect, lab_user_name, render_redirect
from tests.lab.origins import ALT_HOSTNAME, HOSTNAME, pattern_sha256
from tests.lab.squid import BasicAuth, SquidProxy
from tests.lab.squid_stock import StockSquid

pytestmark = pytest.mark.lab

SOURCE_PORTS = (61000, 64999)  # RelaySettings.source_ports' default
BLOCKED = "blocked.lab.test"


def _seed() -> str:
    return secrets.token_hex(6)


class RoutingRelay(RelayProcess):
    """RelayProcess with several upstreams, `[routing]` and `[[rule]]`s."""

    def __init__(
        self,
        lab: Lab,
        upstreams: Sequence[UpstreamSpec],
        *,
        routing: dict[str, Any] | None = None,
        rules: Sequence[dict[str, Any]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(lab, upstreams[0], **kwargs)
        self.upstreams = list(upstreams)
        self.routing = dict(routing or {})
        self.rules = list(rules)

    def _write_files(self) -> None:
        super()._write_files()  # the work dir, the first upstream's credentials
        entries = []
        for spec in self.upstreams:
            if spec.password is not None and spec is not self.upstream:
                path = self.credentials_dir / spec.name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(spec.password)
            entry: dict[str, Any] = {"name": spec.name, "url": spec.url}
            if spec.username is not None:
                entry["username"] = spec.username
            entries.append(entry)
        relay: dict[str, Any] = {
            "port": self.port,
            "listen": ["127.0.0.1", "::1"],
            "redirect_ports": list(self.redirect_ports),
            "upstream": self.upstream.name,
            "drain_timeout": 1.0,
            **self.settings,
        }
        doc: dict[str, Any] = {"relay": relay, "upstream": entries}
        if self.routing:
            doc["routing"] = self.routing
        if self.rules:
            doc["rule"] = self.rules
        self.config_path.write_text(tomli_w.dumps(doc))

    def redirect(self, ports: Sequence[int] | None = None) -> Redirect:
        """The lab's redirect, letting the relay's own (reserved-port) connections through."""
        text = render_redirect(self.port, tuple(ports or self.redirect_ports), self._exclude())
        first, last = SOURCE_PORTS
        text = text.replace(
            "    ip6 daddr ::1 return\n",
            f"    ip6 daddr ::1 return\n    tcp sport {first}-{last} return\n",
        )
        return Redirect(self.lab.client, text).apply()

    def _exclude(self) -> list[str]:
        return [a for a in (self.lab.proxy.v4, self.lab.proxy.v6) if a]


def _squid(lab: Lab, port: int, tag: str, squid_class: type[SquidProxy] = SquidProxy) -> SquidProxy:
    user = lab_user_name(lab.tag)[:18] + tag
    return squid_class(
        lab.proxy,
        lab.tmp / f"routing-squid-{tag}-{port}",
        port=port,
        auth=BasicAuth(ProxyCredentials.generate(user, lab.tmp)),
        hosts=lab.hosts_text(),
    )


@contextlib.contextmanager
def _running(squid: SquidProxy, lab: Lab) -> Iterator[SquidProxy]:
    try:
        squid.start()
        yield squid
    finally:
        squid.stop()
        if not lab.keep_files:
            squid.remove_files()


@pytest.fixture(scope="module")
def two_squids(lab: Lab) -> Iterator[tuple[SquidProxy, SquidProxy]]:
    base = 26000 + os.getpid() % 1000 * 2  # below the ephemeral range (32768+)
    with (
        _running(_squid(lab, base, "a"), lab) as a,
        _running(_squid(lab, base + 1, "b"), lab) as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def stock(lab: Lab) -> Iterator[SquidProxy]:
    port = 28000 + os.getpid() % 1000  # below the ephemeral range
    with _running(_squid(lab, port, "s", StockSquid), lab) as squid:
        yield squid


def _curl(lab: Lab, url: str, name: str | None = None, port: int = 443) -> CurlResult:
    """curl with no proxy settings; `name` resolves to the origin's v4 address."""
    resolve = [f"{name}:{port}:{lab.origins.v4}"] if name else []
    return lab.curl(url, resolve=resolve, max_time=20)


def _url(scheme: str, host: str, path: str) -> str:
    return f"{scheme}://{host}{path}"


def _connects(squid: SquidProxy, since: float) -> list[str]:
    """The CONNECTs the Squid let through since `since` (in auto mode the relay's first
    CONNECT to a proxy it has not met carries no credentials: a 407 is logged first)."""
    return [
        e.uri
        for e in squid.entries()
        if e.method == "CONNECT" and e.time >= since - 0.002 and e.status != 407
    ]


def _get(lab: Lab, name: str, scheme: str, seed: str, size: int = 3000) -> CurlResult:
    port = 443 if scheme == "https" else 80
    result = _curl(lab, _url(scheme, name, f"/bytes/{size}?seed={seed}"), name, port)
    return result


def _ok(result: CurlResult, size: int, seed: str) -> None:
    assert result.returncode == 0 and result.http_code == 200, result
    assert result.connect_code == 0, "curl itself must not have used a proxy"
    assert result.sha256 == pattern_sha256(size, seed), result


# -- failover between two Squids -------------------------------------------------------------


def test_stopping_the_first_squid_moves_new_connections_to_the_second_and_back(
    lab: Lab, two_squids: tuple[SquidProxy, SquidProxy]
) -> None:
    a, b = two_squids
    specs = [UpstreamSpec.for_squid(a, name="a"), UpstreamSpec.for_squid(b, name="b")]
    with RoutingRelay(lab, specs) as relay, relay.redirect():
        t0 = time.time()
        for _ in range(3):
            seed = _seed()
            _ok(_get(lab, HOSTNAME, "https", seed), 3000, seed)
        assert len(_connects(a, t0)) >= 3 and _connects(b, t0) == []

        a.stop()
        t1 = time.time()
        mark = relay.mark()
        # Every connection after the stop works: the failure of a is invisible to curl.
        for _ in range(8):
            seed = _seed()
            _ok(_get(lab, HOSTNAME, "https", seed), 3000, seed)
        assert len(_connects(b, t1)) == 8
        relay.wait_for_line("upstream a is down", since=mark)

        a.start()
        mark = relay.mark()
        t2 = time.time()
        deadline = time.monotonic() + 40
        while not _connects(a, t2):
            assert time.monotonic() < deadline, "new connections never went back to a"
            seed = _seed()
            _ok(_get(lab, HOSTNAME, "https", seed), 3000, seed)
            time.sleep(0.2)
        relay.wait_for_line("upstream a is back", since=mark)
        # Back for good: the next ones go through a again.
        t3 = time.time()
        seed = _seed()
        _ok(_get(lab, HOSTNAME, "https", seed), 3000, seed)
        assert len(_connects(a, t3)) == 1


# -- rules on names, ports 80 and 443 ----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_name_rules_direct_block_and_a_named_upstream(
    lab: Lab, two_squids: tuple[SquidProxy, SquidProxy], scheme: str
) -> None:
    a, b = two_squids
    specs = [UpstreamSpec.for_squid(a, name="a"), UpstreamSpec.for_squid(b, name="b")]
    rules = [
        {"match": [ALT_HOSTNAME], "action": "direct"},
        {"match": [BLOCKED], "action": "block"},
        {"match": [HOSTNAME], "action": "b"},
    ]
    port = 443 if scheme == "https" else 80
    with RoutingRelay(lab, specs, rules=rules) as relay, relay.redirect():
        t0 = time.time()
        seed = _seed()
        # DIRECT: the origin sees the client's own address, from the reserved source ports.
        _ok(_get(lab, ALT_HOSTNAME, scheme, seed), 3000, seed)
        event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""))
        assert event["peer"] in (lab.client.v4, lab.client.v6), event
        relay.wait_for_line(re.compile(rf"-> {re.escape(ALT_HOSTNAME)}:{port} via -: done"))

        # BLOCK: reset at once, recorded with the rule.
        mark = relay.mark()
        blocked = _get(lab, BLOCKED, scheme, _seed())
        assert blocked.returncode != 0 and blocked.http_code == 0, blocked
        relay.wait_for_line(f"blocked by rule[1] ({BLOCKED} -> block)", since=mark)

        # PROXY b: the rule names it, a is not asked.
        seed = _seed()
        _ok(_get(lab, HOSTNAME, scheme, seed), 3000, seed)
        b.wait_for_entry(lambda e: e.time >= t0 - 0.002 and HOSTNAME in e.uri)
        assert _connects(a, t0) == [] and not [e for e in a.entries() if e.time >= t0 - 0.002]
        for squid in (a, b):
            assert not [e for e in squid.entries() if e.time >= t0 and ALT_HOSTNAME in e.uri]
            assert not [e for e in squid.entries() if e.time >= t0 and BLOCKED in e.uri]


# -- PAC ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pac_server(lab: Lab, text: str) -> Iterator[str]:
    """`python -m http.server` in the origin namespace serving proxy.pac; yields its URL."""
    root = lab.tmp / f"pac-{_seed()}"
    root.mkdir()
    (root / "proxy.pac").write_text(text)
    port = 29000 + os.getpid() % 1000  # below the ephemeral range
    proc: NsProcess = lab.origin.popen(
        [sys.executable, "-I", "-m", "http.server", str(port), "--bind", lab.origins.v4],
        cwd=str(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://{lab.origins.v4}:{port}/proxy.pac"
        deadline = time.monotonic() + 10
        while lab.curl(url, max_time=2).http_code != 200:
            assert time.monotonic() < deadline, "the PAC server did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.stop(grace=2.0)
        lab.origin.forget(proc)


def test_a_pac_file_from_the_origin_chooses_upstreams_and_direct_by_host(
    lab: Lab, two_squids: tuple[SquidProxy, SquidProxy]
) -> None:
    a, b = two_squids
    specs = [UpstreamSpec.for_squid(a, name="a"), UpstreamSpec.for_squid(b, name="b")]
    script = (
        "function FindProxyForURL(url, host) {\n"
        f'  if (host == "{ALT_HOSTNAME}") return "DIRECT";\n'
        f'  if (host == "{HOSTNAME}") return "PROXY {b.host}:{b.port}";\n'
        f'  return "PROXY {a.host}:{a.port}";\n'
        "}\n"
    )
    with _pac_server(lab, script) as pac_url:
        routing = {"default": "pac", "pac_url": pac_url}
        with RoutingRelay(lab, specs, routing=routing) as relay, relay.redirect():
            t0 = time.time()
            by_name, direct, by_ip = _seed(), _seed(), _seed()
            _ok(_get(lab, HOSTNAME, "https", by_name), 3000, by_name)
            _ok(_get(lab, ALT_HOSTNAME, "https", direct), 3000, direct)
            ip_url = lab.origins.url("https", f"/bytes/3000?seed={by_ip}", host="v4")
            _ok(_curl(lab, ip_url), 3000, by_ip)
            assert _connects(b, t0) == [f"{HOSTNAME}:443"]
            assert _connects(a, t0) == [f"{lab.origins.v4}:443"]
            event = lab.origins.wait_for_event(lambda e: direct in e.get("path", ""))
            assert event["peer"] in (lab.client.v4, lab.client.v6), event


# -- port 80 through a stock Squid -------------------------------------------------------------


def _pipelined_gets(lab: Lab, paths: Sequence[str]) -> list[tuple[int, bytes]]:
    """Several GETs written at once on one connection to the origin's port 80 (as apt
    does), through the redirect; the (status, body) of each answer in order."""
    sock = lab.client.connect(lab.origins.v4, 80, timeout=20)
    try:
        sock.sendall(
            b"".join(f"GET {p} HTTP/1.1\r\nHost: {HOSTNAME}\r\n\r\n".encode() for p in paths)
        )
        reader = h11.Connection(h11.CLIENT)
        answers: list[tuple[int, bytes]] = []
        for path in paths:
            reader.send(h11.Request(method="GET", target=path, headers=[("Host", HOSTNAME)]))
            reader.send(h11.EndOfMessage())
            status, body = 0, b""
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(sock.recv(1 << 20))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            answers.append((status, body))
            reader.start_next_cycle()
        return answers
    finally:
        sock.close()


def test_port_80_through_a_stock_squid_is_forwarded_keep_alive_and_pipelined(
    lab: Lab, stock: SquidProxy
) -> None:
    spec = UpstreamSpec.for_squid(stock, name="stock")
    with RoutingRelay(lab, [spec]) as relay, relay.redirect():
        seed = _seed()
        first = _get(lab, HOSTNAME, "http", seed)
        _ok(first, 3000, seed)
        relay.wait_for_line("refused CONNECT to port 80")
        # Later connections go straight to forwarding; several requests on one connection.
        seeds = [_seed() for _ in range(3)]
        answers = _pipelined_gets(lab, [f"/bytes/{1000 + i}?seed={s}" for i, s in enumerate(seeds)])
        for i, (s, (status, body)) in enumerate(zip(seeds, answers, strict=True)):
            assert status == 200 and len(body) == 1000 + i, (status, len(body))
            assert pattern_sha256(1000 + i, s) == hashlib.sha256(body).hexdigest()
        forwarded = [e for e in stock.entries() if e.method == "GET" and seed in e.uri]
        assert forwarded and forwarded[0].uri == f"http://{HOSTNAME}/bytes/3000?seed={seed}"
        for s in seeds:  # Squid logs each request when it is done: poll, bounded
            stock.wait_for_entry(lambda e, s=s: e.method == "GET" and s in e.uri and e.status < 300)
        # 443 still tunnels through the same Squid.
        seed = _seed()
        _ok(_get(lab, HOSTNAME, "https", seed), 3000, seed)
