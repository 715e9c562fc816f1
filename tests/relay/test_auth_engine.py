"""The engine authenticating to CONNECT proxy stubs: Digest, NTLM (real pyspnego on both
ends), a 407 that closes the connection, single-flight verification of new credentials
(50 parallel connections, one failed login), and probe_upstream.

The stubs are tests/relay/stubs.py's ConnectProxy with other `authenticate` answers.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gc
import hashlib
import logging
import secrets
import socket
import sys
import threading
import types
from pathlib import Path

import pytest
import spnego

from tests.relay.stubs import (
    ConnectProxy,
    Mode,
    Origin,
    ProxyRequest,
    Socks5Proxy,
    echo,
    http_upstream,
    read_until_error,
    running_relay,
    socks_upstream,
    until,
)
from tray_proxy.relay import upstream as upstream_module
from tray_proxy.relay.events import (
    CredentialsAccepted,
    CredentialsRejected,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.probe import ProbeOutcome, probe_upstream
from tray_proxy.relay.protocol.challenge import parse_challenges
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.relay.spnego_auth import SpnegoContext
from tray_proxy.relay.upstream import CredentialState


def _407(*challenges: str, close: bool = False) -> bytes:
    head = b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    head += b"".join(b"Proxy-Authenticate: %s\r\n" % c.encode() for c in challenges)
    if close:
        head += b"Connection: close\r\n"
    body = b"<html>authentication required</html>"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class DigestProxy(ConnectProxy):
    """Digest (RFC 7616) with qop=auth; `stale_first` answers the first response stale."""

    def __init__(self, user: str, password: str, algorithm: str = "MD5", **kw) -> None:
        super().__init__(**kw)
        self.user, self.password, self.algorithm = user, password, algorithm
        self.nonces: list[str] = []
        self.stale_nonces: set[str] = set()
        self.failures = 0

    def _hash(self, text: str) -> str:
        name = "sha256" if self.algorithm.startswith("SHA-256") else "md5"
        return hashlib.new(name, text.encode()).hexdigest()

    def challenge(self, stale: bool = False) -> bytes:
        nonce = secrets.token_hex(8)
        self.nonces.append(nonce)
        extra = ", stale=true" if stale else ""
        return _407(
            f'Digest realm="lab", qop="auth", nonce="{nonce}", algorithm={self.algorithm}{extra}',
            'Basic realm="lab"',
        )

    def authenticate(self, req: ProxyRequest) -> bytes | None:
        value = req.headers.get("proxy-authorization", "")
        if not value.startswith("Digest "):
            return self.challenge()
        (got,) = parse_challenges([value])
        p = got.params
        assert p["uri"] == f"{req.target[0]}:{req.target[1]}"
        if p["nonce"] in self.stale_nonces or p["nonce"] not in self.nonces:
            return self.challenge(stale=True)
        ha1 = self._hash(f"{self.user}:lab:{self.password}")
        if self.algorithm.endswith("-sess"):
            ha1 = self._hash(f"{ha1}:{p['nonce']}:{p['cnonce']}")
        ha2 = self._hash(f"CONNECT:{p['uri']}")
        expected = self._hash(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")
        if p["username"] != self.user or p["response"] != expected:
            self.failures += 1
            return self.challenge()
        return None


class NtlmProxy(ConnectProxy):
    """NTLM checked by pyspnego's acceptor against NTLM_USER_FILE; offers Negotiate too."""

    def __init__(
        self, offer: tuple[str, ...] = ("Negotiate", "NTLM", 'Basic realm="lab"'), close=False, **kw
    ) -> None:
        super().__init__(**kw)
        self.offer = offer
        self.close_each = close
        self.contexts: dict[int, object] = {}
        self.failures = 0
        self.successes = 0

    def authenticate(self, req: ProxyRequest) -> bytes | None:
        value = req.headers.get("proxy-authorization", "")
        if not value.startswith("NTLM "):
            return _407(*self.offer, close=self.close_each)
        token = base64.b64decode(value[5:])
        server = self.contexts.get(id(req))
        if server is None:
            server = self.contexts[id(req)] = spnego.server(protocol="ntlm")
        try:
            out = server.step(token)
        except spnego.exceptions.SpnegoError:
            self.failures += 1
            del self.contexts[id(req)]
            return _407(*self.offer)
        if out is not None:
            return _407("NTLM " + base64.b64encode(out).decode(), close=self.close_each)
        self.successes += 1
        return None


class ClosingBasicProxy(ConnectProxy):
    """Basic whose 407 always says Connection: close (old Squid setups, some appliances)."""

    def authenticate(self, req: ProxyRequest) -> bytes | None:
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        if req.headers.get("proxy-authorization") != f"Basic {token}":
            return _407('Basic realm="x"', close=True)
        return None


class CountingBasicProxy(ConnectProxy):
    """Basic that counts the passwords it checked and the ones that failed."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.checked = 0
        self.failed = 0

    def authenticate(self, req: ProxyRequest) -> bytes | None:
        if "proxy-authorization" in req.headers:
            self.checked += 1
        answer = super().authenticate(req)
        if answer is not None and "proxy-authorization" in req.headers:
            self.failed += 1
        return answer


async def _fetch(relay, payload: bytes = b"ping") -> bytes:
    reader, writer = await relay.connect()
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


def _creds(upstream: str, user: str, password: str) -> StaticCredentialSource:
    return StaticCredentialSource({upstream: Credentials(user, Secret(password))})


# -- Digest --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "MD5-sess"])
def test_digest_then_preemptive_with_the_next_count(run, algorithm):
    async def main():
        async with (
            Origin(echo) as origin,
            DigestProxy("alice", "right", algorithm) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            async with running_relay(
                [up], origin.address, _creds("corp", "alice", "right")
            ) as relay:
                assert await _fetch(relay) == b"ping"
                assert await _fetch(relay) == b"ping"
                await relay.wait_closed(2)
            first, second = proxy.requests
            assert [("proxy-authorization" in r) for r in first.rounds] == [False, True]
            # The second tunnel answered at once with the remembered nonce, count 2.
            assert len(second.rounds) == 1
            params = parse_challenges([second.rounds[0]["proxy-authorization"]])[0].params
            assert params["nc"] == "00000002" and params["algorithm"] == algorithm

    run(main)


def test_digest_stale_nonce_is_retried_and_not_a_failure(run):
    async def main():
        async with Origin(echo) as origin, DigestProxy("alice", "right") as proxy:
            up = http_upstream(proxy, "corp", "alice")
            async with running_relay(
                [up], origin.address, _creds("corp", "alice", "right")
            ) as relay:
                assert await _fetch(relay) == b"ping"
                proxy.stale_nonces.update(proxy.nonces)  # the proxy forgets its nonces
                assert await _fetch(relay) == b"ping"
                closed = await relay.wait_closed(2)
                assert [c.reason for c in closed] == [CloseReason.DONE] * 2
                assert not relay.of(CredentialsRejected)
            assert proxy.failures == 0
            assert len(proxy.requests[1].rounds) == 2  # stale, then the fresh nonce

    run(main)


# -- NTLM ----------------------------------------------------------------------------------


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    password = "pw-" + secrets.token_hex(6)
    users = tmp_path / "ntlm-users"
    users.write_text(f"CORP:alice:{password}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    return password


def test_ntlm_on_one_connection_chosen_over_basic_and_unusable_negotiate(run, ntlm_users):
    """Offers Negotiate, NTLM, Basic; no Kerberos here, so NTLM (not Negotiate-wrapped)."""

    async def main():
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up = http_upstream(proxy, "corp", "CORP\\alice")
            creds = _creds("corp", "CORP\\alice", ntlm_users)
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fetch(relay) == b"ping"
                assert await _fetch(relay) == b"ping"
                await relay.wait_closed(2)
            first, second = proxy.requests
            kinds = [r.get("proxy-authorization", "-").split(" ")[0] for r in first.rounds]
            assert kinds == ["-", "NTLM", "NTLM"]  # three CONNECTs, one connection
            assert [r.get("proxy-authorization", "-")[:4] for r in second.rounds] == ["NTLM"] * 2
            assert proxy.successes == 2 and proxy.failures == 0

    run(main)


def test_ntlm_wrong_password_is_one_failure_then_fail_fast(run, ntlm_users):
    async def main():
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up = http_upstream(proxy, "corp", "CORP\\alice")
            creds = _creds("corp", "CORP\\alice", "wrong")
            async with running_relay([up], origin.address, creds) as relay:
                for i in range(3):
                    reader, writer = await relay.connect()
                    await read_until_error(reader)
                    writer.close()
                    await relay.wait_closed(i + 1)
                assert [c.reason for c in relay.closed] == [CloseReason.UPSTREAM_AUTH_FAILED] * 3
                assert "rejected the credentials of CORP\\alice (NTLM)" in relay.closed[0].detail
                assert relay.of(CredentialsRejected) == [CredentialsRejected("corp", "CORP\\alice")]
            assert proxy.failures == 1 and len(proxy.requests) == 1

    run(main)


def test_ntlm_needs_a_kept_connection(run, ntlm_users):
    async def main():
        async with Origin(echo) as origin, NtlmProxy(offer=("NTLM",), close=True) as proxy:
            up = http_upstream(proxy, "corp", "CORP\\alice")
            creds = _creds("corp", "CORP\\alice", ntlm_users)
            async with running_relay([up], origin.address, creds) as relay:
                reader, writer = await relay.connect()
                await read_until_error(reader)
                writer.close()
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.UPSTREAM_AUTH_FAILED
                assert "needs a kept-alive connection" in closed.detail
                assert not relay.of(CredentialsRejected)
            assert len(proxy.requests) == 2  # reconnected once, no more

    run(main)


def _pinned_ntlm(proxy: NtlmProxy, password: str) -> tuple[UpstreamProxy, StaticCredentialSource]:
    """An upstream with `auth = "ntlm"` for CORP\\alice, and her credentials."""
    host, port = proxy.address
    up = UpstreamProxy("corp", UpstreamKind.HTTP, host, port, "CORP\\alice", AuthScheme.NTLM)
    return up, _creds("corp", "CORP\\alice", password)


def test_pinned_ntlm_starts_with_its_first_token(run, ntlm_users):
    async def main():
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up, creds = _pinned_ntlm(proxy, ntlm_users)
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fetch(relay) == b"ping"
            assert [r["proxy-authorization"][:4] for r in proxy.requests[0].rounds] == ["NTLM"] * 2

    run(main)


def test_ntlm_steps_run_off_the_loop(run, ntlm_users, monkeypatch):
    """A Kerberos step may wait seconds on the KDC, so NTLM/Negotiate steps run in a worker
    thread. Each step here asks the loop to run a coroutine and waits for it: on the loop
    thread itself that could never happen, and the wait would end at its timeout."""
    original = SpnegoContext.step
    seen: list[str] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    def step(self, token):
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop_box[0]).result(timeout=2)
            seen.append("loop free")
        except concurrent.futures.TimeoutError:
            seen.append("loop blocked")
        return original(self, token)

    monkeypatch.setattr(SpnegoContext, "step", step)

    async def main():
        loop_box.append(asyncio.get_running_loop())
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up, creds = _pinned_ntlm(proxy, ntlm_users)
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fetch(relay) == b"ping"
        assert seen == ["loop free", "loop free"]  # the type 1 token, then the type 3 answer

    run(main)


def test_basic_and_digest_steps_stay_on_the_loop(run, monkeypatch):
    """Answering a Basic or Digest 407 is computation: no hop to the proxy-auth threads."""
    hops: list[object] = []

    class Watching(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            hops.append(fn)
            return super().submit(fn, *args, **kwargs)

    watching = Watching(1)
    monkeypatch.setattr(upstream_module.UpstreamAuth, "threads", lambda self: watching)

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as basic,
            DigestProxy("alice", "right") as digest,
        ):
            ups = [http_upstream(basic, "basic", "alice"), http_upstream(digest, "digest", "alice")]
            creds = StaticCredentialSource(
                {name: Credentials("alice", Secret("right")) for name in ("basic", "digest")}
            )
            for up in ups:
                async with running_relay([up], origin.address, creds) as relay:
                    assert await _fetch(relay) == b"ping"
        assert hops == []

    try:
        run(main)
    finally:
        watching.shutdown()


def test_a_token_step_that_hangs_ends_at_the_handshake_timeout(run, ntlm_users, monkeypatch):
    """A KDC that never answers: the tunnel fails at handshake_timeout, and says which step."""
    release = threading.Event()

    def step(self, token):
        release.wait(10)
        raise RuntimeError("released")

    monkeypatch.setattr(SpnegoContext, "step", step)

    async def main():
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up, creds = _pinned_ntlm(proxy, ntlm_users)
            try:
                async with running_relay(
                    [up], origin.address, creds, handshake_timeout=0.3
                ) as relay:
                    reader, writer = await relay.connect()
                    await read_until_error(reader)
                    writer.close()
                    (closed,) = await relay.wait_closed()
            finally:
                release.set()
            assert closed.reason is CloseReason.UPSTREAM_TIMEOUT, closed
            assert "NTLM/Negotiate step did not finish within 0.3s" in closed.detail
            assert proxy.requests == []  # the step came before any CONNECT

    run(main)


# -- reconnect -----------------------------------------------------------------------------


def test_407_with_connection_close_reconnects_once(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ClosingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", "right")
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fetch(relay) == b"ping"
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.DONE
            assert len(proxy.requests) == 2
            assert "proxy-authorization" not in proxy.requests[0].headers
            assert proxy.requests[1].headers["proxy-authorization"].startswith("Basic ")

    run(main)


# -- single-flight verification --------------------------------------------------------------


def test_fifty_parallel_connections_and_a_wrong_password_cost_one_failed_login(run, caplog):
    caplog.set_level(logging.DEBUG)
    password = "wrong-" + secrets.token_hex(6)

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", password)
            async with running_relay([up], origin.address, creds, handshake_timeout=5.0) as relay:

                async def one():
                    reader, writer = await relay.connect()
                    got, _ = await read_until_error(reader)
                    writer.close()
                    return got

                loop = asyncio.get_running_loop()
                started = loop.time()
                got = await asyncio.gather(*(one() for _ in range(50)))
                took = loop.time() - started
                assert got == [b""] * 50
                closed = await relay.wait_closed(50)
                assert {c.reason for c in closed} == {CloseReason.UPSTREAM_AUTH_FAILED}
                assert took < 4.0, f"connections waited {took:.1f}s for a refused password"
                assert proxy.failed == 1 and proxy.checked == 1
                assert relay.of(CredentialsRejected) == [CredentialsRejected("corp", "alice")]
                details = {c.detail for c in closed}
                assert any("not tried again" in d for d in details)
                texts = [repr(relay.events), *details]
            return texts

    texts = run(main)
    texts.append(caplog.text)
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    for text in texts:
        assert password not in text and token not in text
    assert "rejected the credentials of alice" in caplog.text


def test_fifty_parallel_connections_with_new_right_credentials_all_work(run):
    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            async with running_relay(
                [up], origin.address, _creds("corp", "alice", "right")
            ) as relay:
                got = await asyncio.gather(*(_fetch(relay, b"x%d" % i) for i in range(50)))
                assert got == [b"x%d" % i for i in range(50)]
                closed = await relay.wait_closed(50)
                assert {c.reason for c in closed} == {CloseReason.DONE}
                assert len(relay.of(TunnelEstablished)) == 50
            # Every credentialed request was right: nothing failed while verifying.
            assert proxy.failed == 0

    run(main)


def test_changed_credentials_are_tried_again_and_retry_credentials(run):
    creds = _creds("corp", "alice", "wrong")

    async def main():
        async with Origin(echo) as origin, ConnectProxy(credentials=("alice", "right")) as proxy:
            up = http_upstream(proxy, "corp", "alice")
            async with running_relay([up], origin.address, creds) as relay:
                reader, writer = await relay.connect()
                await read_until_error(reader)
                writer.close()
                await relay.wait_closed(1)

                def logins() -> int:
                    return sum("proxy-authorization" in r.headers for r in proxy.requests)

                assert logins() == 1
                # The user entered the password again: one verification at once, by the
                # relay itself, to where the last tunnel went (issue 16 item 7).
                relay.engine.retry_credentials("corp")
                await until(lambda: logins() == 2, 5, "the verification")
                await until(lambda: len(relay.of(CredentialsRejected)) == 2, 5, "its 407")
                reader, writer = await relay.connect()
                await read_until_error(reader)
                writer.close()
                await relay.wait_closed(2)
                assert logins() == 2  # the next connection did not send them again
                creds.set("corp", Credentials("alice", Secret("right")))
                assert await _fetch(relay) == b"ping"

    run(main)


def test_socks5_wrong_password_fails_fast_after_one_try(run):
    async def main():
        async with Origin(echo) as origin, Socks5Proxy(credentials=("bob", "right")) as proxy:
            up = socks_upstream(proxy, username="bob")
            async with running_relay(
                [up], origin.address, _creds("socks", "bob", "wrong")
            ) as relay:
                results = await asyncio.gather(*(_fail(relay) for _ in range(10)))
                assert results == [b""] * 10
                await relay.wait_closed(10)
            assert proxy.auth_seen == [("bob", "wrong")]

    run(main)


async def _fail(relay) -> bytes:
    reader, writer = await relay.connect()
    got, _ = await read_until_error(reader)
    writer.close()
    return got


def test_no_credentials_for_a_proxy_that_asks(run):
    async def main():
        async with (
            Origin(echo) as origin,
            DigestProxy("alice", "right") as proxy,
            running_relay([http_upstream(proxy, "corp")], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            await read_until_error(reader)
            writer.close()
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.UPSTREAM_AUTH_FAILED
            assert "no password is set up" in closed.detail
            (failed,) = relay.of(UpstreamFailed)
            assert failed.upstream == "corp"

    run(main)


# -- probe_upstream ------------------------------------------------------------------------


def test_probe_outcomes(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(credentials=("alice", "right")) as proxy,
            ConnectProxy(mode=Mode.FORBIDDEN) as forbidding,
            ConnectProxy(mode=Mode.SILENT) as silent,
        ):
            up = http_upstream(proxy, "corp", "alice")
            right = Credentials("alice", Secret("right"))
            ok = await probe_upstream(up, right, origin.address, 3)
            assert ok.ok and ok.latency_s is not None and ok.words.startswith("OK in ")
            assert ok.words.endswith(" ms")
            bad = await probe_upstream(up, Credentials("alice", Secret("nope")), origin.address, 3)
            assert bad.outcome is ProbeOutcome.AUTH_FAILED and bad.status == 407
            assert bad.words == f"127.0.0.1:{up.port} rejected the password for alice (407)"
            assert "nope" not in repr(bad)
            none = await probe_upstream(up, None, origin.address, 3)
            assert none.outcome is ProbeOutcome.AUTH_FAILED
            assert "requires a user name and password" in none.words
            no = await probe_upstream(http_upstream(forbidding), None, origin.address, 3)
            assert no.outcome is ProbeOutcome.FORBIDDEN and no.status == 403
            assert no.words == "forbidden by the proxy (403 Forbidden)"
            slow = await probe_upstream(http_upstream(silent), None, origin.address, 0.3)
            assert slow.outcome is ProbeOutcome.TIMEOUT and slow.words == "timed out after 0.3 s"
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            gone = UpstreamProxy("gone", UpstreamKind.HTTP, "127.0.0.1", port)
            refused = await probe_upstream(gone, None, origin.address, 3)
            assert refused.outcome is ProbeOutcome.REFUSED
            assert refused.words == f"connection refused by 127.0.0.1:{port}"

    run(main)


# -- recovering from a 407 (issue 16 item 7) and credentials changed while running ----------


def test_a_407_for_credentials_that_worked_recovers_after_the_backoff_one_try_per_period(run):
    """The proxy took the password, then refused it (a directory hiccup): the relay stops
    sending it (one failed login), tries it once per `reverify_after`, and once the proxy
    takes it again the upstream is usable, CredentialsAccepted says so."""
    period = 0.6

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", "right")
            async with running_relay([up], origin.address, creds, reverify_after=period) as relay:
                assert await _fetch(relay) == b"ping"
                proxy.credentials = ("alice", "changed-by-the-directory")
                # The first refusal costs one login: the fast path's request, which carried
                # the password before any 407 came back; a Basic-only 407 is final, no
                # re-check. (Connections already on their way when it came each cost one.)
                # The storm after it costs none.
                assert await _fail(relay) == b""
                assert proxy.failed == 1
                refused = await asyncio.gather(*(_fail(relay) for _ in range(10)))
                assert refused == [b""] * 10
                assert proxy.failed == 1
                assert relay.of(CredentialsRejected) == [CredentialsRejected("corp", "alice")]
                loop = asyncio.get_running_loop()
                rejected_at = loop.time()
                # Still refused: one attempt per period, none in between, no new event.
                await until(lambda: proxy.failed == 2, 3 * period, "the first re-verification")
                first = loop.time() - rejected_at
                assert period * 0.8 <= first < period * 2, first
                await until(lambda: proxy.failed == 3, 3 * period, "the second")
                assert loop.time() - rejected_at >= 1.8 * period
                assert len(relay.of(CredentialsRejected)) == 1
                assert await _fail(relay) == b""  # meanwhile: fail fast, nothing sent
                assert proxy.failed == 3
                proxy.credentials = ("alice", "right")  # the directory is back
                await until(lambda: relay.of(CredentialsAccepted), 3 * period, "the recovery")
                assert relay.of(CredentialsAccepted) == [CredentialsAccepted("corp", "alice")]
                assert proxy.failed == 3
                assert await _fetch(relay) == b"ping"
                assert await _fetch(relay) == b"ping"

    run(main)


def test_entering_the_same_password_again_verifies_it_at_once(run):
    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", "right")
            async with running_relay([up], origin.address, creds) as relay:  # 600 s backoff
                assert await _fetch(relay) == b"ping"
                proxy.credentials = ("alice", "changed-by-the-directory")
                assert await _fail(relay) == b""
                assert proxy.failed == 1
                proxy.credentials = ("alice", "right")
                assert await _fail(relay) == b""  # still rejected: nothing sent
                assert proxy.failed == 1 and proxy.checked == 2
                relay.engine.set_credentials("corp", Credentials("alice", Secret("right")))
                await until(lambda: relay.of(CredentialsAccepted), 5, "the verification")
                assert proxy.checked == 3 and proxy.failed == 1
                assert await _fetch(relay) == b"ping"

    run(main)


def test_a_new_password_is_used_at_the_next_connection_and_a_wrong_one_costs_one_407(run):
    """Credentials changed while the relay runs (issue 14 bug 1): set_credentials replaces
    what the source has; a wrong one gets its own single 407, the right one works next."""

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "new")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", "old")
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fail(relay) == b""
                assert proxy.failed == 1
                engine = relay.engine
                engine.set_credentials("corp", Credentials("alice", Secret("typo")))
                await until(lambda: proxy.failed == 2, 5, "the typo's verification")
                results = await asyncio.gather(*(_fail(relay) for _ in range(10)))
                assert results == [b""] * 10 and proxy.failed == 2
                assert len(relay.of(CredentialsRejected)) == 2
                engine.set_credentials("corp", Credentials("alice", Secret("new")))
                got = await asyncio.gather(*(_fetch(relay, b"x%d" % i) for i in range(10)))
                assert got == [b"x%d" % i for i in range(10)]
                assert proxy.failed == 2

    run(main)


def _module_held(token: bytes) -> list[str]:
    """Where the relay's modules hold `token` in bytes or str: a walk from their globals
    through classes, containers and instances (not into functions or other modules, which
    lead everywhere). The old cache was a class attribute of relay/opening.py."""
    seen: set[int] = set()
    found: list[str] = []
    todo: list[tuple[object, str]] = [
        (vars(m), name)
        for name, m in sys.modules.items()
        if name.startswith("tray_proxy.relay") and m is not None
    ]
    while todo and len(seen) < 200_000:
        obj, where = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if (
            isinstance(obj, bytes)
            and token in obj
            or isinstance(obj, str)
            and token.decode() in obj
        ):
            found.append(where)
            continue
        if isinstance(obj, (types.ModuleType, types.FunctionType, type(len), str, bytes)):
            continue
        todo.extend((ref, where) for ref in gc.get_referents(obj))
    return found


def test_no_request_bytes_with_the_secret_outlive_a_credential_change_or_the_engine(run):
    """The fast path keeps CONNECT bytes with Proxy-Authorization: per engine (no module or
    class holds them), dropped when the credentials change and when the engine stops
    (issue 16, "Secrets and boundaries in code")."""
    password = "s3cret-" + secrets.token_hex(6)
    token = base64.b64encode(f"alice:{password}".encode())

    def kept(engine) -> list[bytes]:
        return [r for r in engine._requests.by_target.values() if token in r]

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", password)) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            creds = _creds("corp", "alice", password)
            async with running_relay([up], origin.address, creds) as relay:
                engine = relay.engine
                for _ in range(3):  # verified, then the fast path with kept request bytes
                    assert await _fetch(relay) == b"ping"
                await relay.wait_closed(3)
                assert kept(engine), "the fast path kept no request: nothing to test"
                assert _module_held(token) == []
                engine.set_credentials("corp", Credentials("alice", Secret("other")))
                assert not engine._requests.by_target and engine._requests.header is None
                assert engine._route is None
                engine.set_credentials("corp", Credentials("alice", Secret(password)))
                for _ in range(3):
                    assert await _fetch(relay) == b"ping"
                assert kept(engine)
            # running_relay stopped the engine.
            assert not engine._requests.by_target and engine._requests.header is None
            assert engine._route is None and engine._overrides == {}
            assert _module_held(token) == []

    run(main)


def test_no_auth_thread_outlives_the_engine(run, ntlm_users):
    def auth_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("proxy-auth")]

    async def main():
        async with Origin(echo) as origin, NtlmProxy() as proxy:
            up, creds = _pinned_ntlm(proxy, ntlm_users)
            async with running_relay([up], origin.address, creds) as relay:
                assert await _fetch(relay) == b"ping"
                assert auth_threads(), "NTLM ran on no proxy-auth thread"
            assert auth_threads() == []

    run(main)


def test_a_re_verification_without_an_answer_keeps_the_password_back_until_the_next(run):
    """The proxy does not answer the re-verification: that says nothing about the password,
    so it stays held back (connections fail fast, send nothing) until the next period."""
    period = 0.5

    async def main():
        async with (
            Origin(echo) as origin,
            CountingBasicProxy(credentials=("alice", "right")) as proxy,
        ):
            up = http_upstream(proxy, "corp", "alice")
            async with running_relay(
                [up],
                origin.address,
                _creds("corp", "alice", "right"),
                reverify_after=period,
                handshake_timeout=0.3,
            ) as relay:
                assert await _fetch(relay) == b"ping"
                proxy.credentials = ("alice", "changed")
                assert await _fail(relay) == b""
                asked = len(proxy.requests)
                proxy.credentials, proxy.mode = None, Mode.SILENT
                await until(lambda: len(proxy.requests) == asked + 1, 3 * period, "the re-check")
                auth = relay.engine._auth["corp"]
                await until(lambda: auth.state is CredentialState.REJECTED, 2, "the backoff")
                assert await _fail(relay) == b""
                assert len(proxy.requests) == asked + 1  # held back: nothing sent
                proxy.credentials, proxy.mode = ("alice", "right"), Mode.OK
                await until(lambda: relay.of(CredentialsAccepted), 3 * period, "the recovery")
                assert await _fetch(relay) == b"ping"

    run(main)
