"""Dialing an upstream proxy and running its handshake (HTTP CONNECT or SOCKS5).

Must not import PySide6. The protocol logic lives in relay/protocol (sans-IO); this module
only does the I/O around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import errno
import functools
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tray_proxy.relay.aio import within
from tray_proxy.relay.failures import UpstreamError as UpstreamError
from tray_proxy.relay.failures import (
    bad_answer,
    connect_timeout,
    dropped,
    handshake_timeout,
)
from tray_proxy.relay.failures import refusal_words as refusal_words
from tray_proxy.relay.failures import (
    refused as proxy_refused,
)
from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.errors import (
    HandshakeRefused,
    ProtocolError,
    UsageError,
)
from tray_proxy.relay.protocol.handshake import UpstreamHandshake
from tray_proxy.relay.protocol.http_connect import (
    ConnectHandshake,
    ProxyAuthRequired,
    format_authority,
)
from tray_proxy.relay.protocol.proxy_auth import (
    AuthMemo,
    AuthStep,
    ProxyAuth,
    ProxyRejectedCredentials,
)
from tray_proxy.relay.protocol.socks5 import Socks5Handshake
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.relay.sockets import SourcePorts, outbound_socket
from tray_proxy.relay.spnego_auth import kerberos_available, token_contexts

_RECV = 65536
_RESOLVE_TTL = 60.0
_PORT_CLASH = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})
# Seconds after our own bind in which a connection from that reserved source port is our own
# come back (a redirect without the exclusion sends the SYN back at once; its retries come
# within connect_timeout's first seconds).
LOOP_WINDOW = 5.0


@dataclass(slots=True)
class _Resolved:
    addresses: list[tuple[int, Address]]
    expires: float


class Dialer:
    """Opens TCP connections to upstreams, from the reserved source-port range."""

    def __init__(self, source_ports: tuple[int, int] | None) -> None:
        self._ports = SourcePorts(*source_ports) if source_ports else None
        self._cache: dict[tuple[str, int], _Resolved] = {}
        self._known: set[Address] = set()  # every address an upstream resolved to
        # host:port -> its address when host is an IP literal, or None (parsed once).
        self._literals: dict[tuple[str, int], list[tuple[int, Address]] | None] = {}

    def dialed_from(self, port: int) -> bool:
        """Did one of our own connections leave from this reserved source port a moment ago
        (LOOP_WINDOW)? A redirect that sends it back brings it to the relay at once."""
        return self._ports is not None and self._ports.bound_within(port, LOOP_WINDOW)

    def is_upstream_address(self, addr: Address) -> bool:
        """Did we dial an upstream at this address? (A redirect of it would be a loop.)"""
        return addr in self._known

    def _literal(self, host: str, port: int) -> list[tuple[int, Address]] | None:
        """The address of an IP-literal host, without a trip through the loop; else None."""
        key = (host, port)
        if key in self._literals:
            return self._literals[key]
        ip = _ip_literal(host)
        found: list[tuple[int, Address]] | None = None
        if ip is not None:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            self._known.add((str(ip), port))
            found = [(family, (str(ip), port))]
        if len(self._literals) < 64:  # upstream names: a handful
            self._literals[key] = found
        return found

    def known_addresses(self, host: str, port: int) -> list[tuple[int, Address]] | None:
        """The addresses of `host` if no lookup is needed (IP literal, or cached); else None."""
        literal = self._literal(host, port)
        if literal is not None:
            return literal
        cached = self._cache.get((host, port))
        if cached is not None and cached.expires > time.monotonic():
            return cached.addresses
        return None

    async def resolve(self, host: str, port: int) -> list[tuple[int, Address]]:
        known = self.known_addresses(host, port)
        if known is not None:
            return known
        key = (host, port)
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[tuple[int, Address]] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
            if entry not in addresses:
                addresses.append(entry)
        self._cache[key] = _Resolved(addresses, now + _RESOLVE_TTL)
        self._known.update(addr for _family, addr in addresses)
        return addresses

    async def connect_direct(self, address: Address, timeout: float) -> socket.socket:
        """A connection to a destination itself (DIRECT), from the reserved source ports so
        the redirect lets it through. Unlike an upstream's, its address is not remembered
        as one (is_upstream_address): a later redirected connection to it is no loop."""
        ip = _ip_literal(address[0])
        if ip is None:
            raise UpstreamError(CloseReason.CONFIG_ERROR, f"not an address: {address[0]}")
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        deadline = asyncio.get_running_loop().time() + timeout
        return await self._connect_to([(family, address)], deadline, timeout, self._ports)

    async def connect(
        self, host: str, port: int, timeout: float, *, reserved: bool = True
    ) -> socket.socket:
        """A connected non-blocking socket, or UpstreamError (unreachable / timeout).

        `reserved`: bind to the reserved source-port range. Needed only when the
        destination port is one the redirect catches (an upstream on 80/443, or a direct
        connection): anything else is never redirected. Every source port in the range
        to one proxy address spends 60 s in TIME_WAIT after the relay closes first, so
        binding all upstream connections there would cap the relay at about
        range/60 new connections per second.
        """
        ports = self._ports if reserved else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # Most connections go to an upstream already resolved: no timer for those.
            known = self.known_addresses(host, port)
            addresses = (
                known if known is not None else await within(timeout, self.resolve(host, port))
            )
        except asyncio.TimeoutError:
            raise UpstreamError(
                CloseReason.UPSTREAM_TIMEOUT, f"resolving {host} took over {timeout:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                CloseReason.UPSTREAM_UNREACHABLE, f"cannot resolve {host}: {exc.strerror or exc}"
            ) from None
        return await self._connect_to(addresses, deadline, timeout, ports)

    async def _connect_to(
        self,
        addresses: list[tuple[int, Address]],
        deadline: float,
        timeout: float,
        ports: SourcePorts | None,
    ) -> socket.socket:
        """Connect to the first of `addresses` that answers by `deadline` (loop time);
        `timeout` is the limit the words name."""
        loop = asyncio.get_running_loop()
        last = "no address"
        last_errno: int | None = None
        for family, addr in addresses:
            # With SO_REUSEADDR, bind() accepts a source port that already carries a
            # connection to this very address; the clash shows only at connect() as
            # EADDRNOTAVAIL. Then the next port of the range is tried.
            for _ in range(ports.attempts if ports is not None else 1):
                try:
                    sock = outbound_socket(family, addr[0], ports)
                except OSError as exc:
                    if exc.errno not in _PORT_CLASH or ports is None:
                        raise  # out of descriptors: our own shortage (RelayEngine._serve)
                    last = f"{format_authority(*addr)}: {exc.strerror or exc}"
                    last_errno = exc.errno
                    continue
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    await within(remaining, loop.sock_connect(sock, addr))
                    return sock
                except asyncio.TimeoutError:
                    sock.close()
                    raise connect_timeout(addr, timeout) from None
                except OSError as exc:
                    sock.close()
                    # asyncio's strerror is "Connect call failed (addr)": say why instead.
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    last = f"{format_authority(*addr)}: {why}"
                    last_errno = exc.errno
                    if exc.errno not in _PORT_CLASH or ports is None:
                        break
                except BaseException:
                    sock.close()
                    raise
        raise UpstreamError(
            CloseReason.UPSTREAM_UNREACHABLE, f"cannot connect to {last}", errno=last_errno
        )


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # A name has a character no IPv4 literal has and no colon (as every IPv6 literal does):
    # skip ip_address() and the two exceptions it raises for it, on every connection.
    if ":" not in host and not host.replace(".", "").isdigit():
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def socks5_handshake(
    target_host: str, target_port: int, creds: Credentials | None
) -> Socks5Handshake:
    """The SOCKS5 handshake for one tunnel to target_host:target_port; it offers
    username/password (RFC 1929) only when there are credentials. HTTP upstreams go through
    ProxyAuth instead (challenge-driven)."""
    if creds is None:
        return Socks5Handshake(target_host, target_port)
    return Socks5Handshake(
        target_host,
        target_port,
        username=creds.username,
        password=creds.password.reveal(),
    )


async def run_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    handshake: UpstreamHandshake,
    upstream: UpstreamProxy,
    timeout: float,
) -> bytes:
    """Drive `handshake` over `sock`; returns the bytes that followed it (tunnel data)."""

    async def drive() -> bytes:
        out = handshake.data_to_send()
        if out:
            await loop.sock_sendall(sock, out)
        while not handshake.done:
            data = await loop.sock_recv(sock, _RECV)
            handshake.receive_data(data)
            out = handshake.data_to_send()
            if out:
                await loop.sock_sendall(sock, out)
        return handshake.trailing

    try:
        return await asyncio.wait_for(drive(), timeout)
    except asyncio.TimeoutError:
        raise handshake_timeout(upstream, timeout) from None
    except HandshakeRefused as exc:
        if exc.auth_failed:
            raise UpstreamError(
                CloseReason.UPSTREAM_AUTH_FAILED,
                f"proxy {upstream} rejected the credentials ({exc})",
                status=exc.status,
            ) from None
        raise proxy_refused(upstream, exc) from None
    except ProtocolError as exc:
        raise bad_answer(upstream, exc) from None
    except OSError as exc:
        raise dropped(upstream, exc) from None


# -- authentication: one upstream's credential state, and the tunnel opener ------------------


class CredentialState(enum.Enum):
    UNVERIFIED = "unverified"  # new or changed: one connection at a time may try them
    VERIFIED = "verified"  # the proxy accepted them: every connection may use them
    REJECTED = "rejected"  # the proxy refused them: sent nowhere until they change


@dataclass(slots=True)
class Permit:
    """Leave to send credentials. `verifier`: this connection tries unverified ones;
    `version`: the credential version they belong to (UpstreamAuth)."""

    credentials: Credentials
    verifier: bool
    version: int = 0


class UpstreamAuth:
    """Per upstream: the scheme that worked (memo) and whether its credentials are verified.

    Single-flight verification: while the credentials are unverified, only one connection
    at a time sends them; the others wait for its outcome and then either go ahead or fail
    fast. A wrong password thus costs the directory account one failed login, not fifty
    (ARCHITECTURE.md, "Credentials"). Lives on the engine's loop; not thread-safe.

    A credential *version* starts with every change of the credentials and with `renew()`
    (the user entered the password again, even the same one): an outcome counts only for
    the version it was learnt with, and a rejection is announced (`on_rejected`) once per
    version. The engine re-verifies rejected credentials now and then (`reverify()`, one
    attempt per period, issue 16 item 7); when they are accepted again `on_accepted` says so.

    NTLM and Negotiate steps run on `threads()`, a few threads of this upstream's own (see
    _Opener._auth_step), shut down with `close()`.
    """

    def __init__(
        self,
        on_rejected: Callable[[Credentials], None] | None = None,
        on_accepted: Callable[[Credentials], None] | None = None,
    ) -> None:
        self.memo = AuthMemo()
        self.state = CredentialState.UNVERIFIED
        self.version = 0
        # Where the last credentialed tunnel went: a re-verification asks for the same.
        self.target: tuple[str, int] | None = None
        self._credentials: Credentials | None = None
        self._busy = False
        self._outcome: asyncio.Future[None] | None = None
        self._on_rejected = on_rejected
        self._on_accepted = on_accepted
        self._announced = -1  # the version whose rejection was announced
        self._was_rejected = False  # rejected since the last acceptance
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<UpstreamAuth {self.state.value} v{self.version} busy={self._busy} {self.memo!r}>"

    def observe(self, credentials: Credentials | None) -> None:
        """Start over when the credentials changed (the user typed a new password)."""
        if credentials != self._credentials:
            self._credentials = credentials
            self._new_version()

    def _new_version(self) -> None:
        self.version += 1
        self.state = CredentialState.UNVERIFIED

    def renew(self) -> None:
        """The user entered the password again (the same or another): a fresh version, as
        unverified as a new password, whatever the proxy said of the previous one."""
        self._new_version()
        self._wake()

    def verified(self, credentials: Credentials) -> bool:
        """Did the proxy accept exactly these credentials? (No state change.)"""
        return self.state is CredentialState.VERIFIED and credentials == self._credentials

    def doubt(self, credentials: Credentials) -> None:
        """The proxy refused verified `credentials`: verify them again, one at a time."""
        if credentials == self._credentials and self.state is CredentialState.VERIFIED:
            self.state = CredentialState.UNVERIFIED

    def reject(self, credentials: Credentials) -> None:
        """The proxy refused verified `credentials` in a way a re-check could not change
        (Basic, and nothing else offered): rejected, as a failed verification would leave
        them."""
        if credentials == self._credentials and self.state is CredentialState.VERIFIED:
            permit = Permit(credentials, verifier=False, version=self.version)
            self.settle(permit, CredentialState.REJECTED)

    def sends_basic(self, pinned: str | None) -> bool:
        """Would a tunnel's first request carry Basic credentials (ProxyAuth.first())?"""
        return (pinned or self.memo.scheme) == "basic"

    def reverify(self) -> int | None:
        """The backoff after a rejection is over: let one connection try the same
        credentials again. Returns the version it concerns, or None when they are no longer
        rejected (changed, or accepted meanwhile)."""
        if self.state is not CredentialState.REJECTED:
            return None
        self.state = CredentialState.UNVERIFIED
        self._wake()
        return self.version

    def back_off(self, version: int) -> bool:
        """A re-verification of `version` learnt nothing (the proxy did not answer): keep
        the credentials rejected until the next period rather than let every connection
        try them. True when they are rejected again."""
        if version == self.version and self.state is CredentialState.UNVERIFIED and not self._busy:
            self.state = CredentialState.REJECTED
            return True
        return False

    def rejected(self, credentials: Credentials | None) -> bool:
        self.observe(credentials)
        return credentials is not None and self.state is CredentialState.REJECTED

    async def permit(self, credentials: Credentials, timeout: float) -> Permit:
        """Wait (at most `timeout`) until this connection may send `credentials`.

        Raises UpstreamError when they are rejected, or when the verifying connection did
        not finish in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.observe(credentials)
            if self.state is CredentialState.REJECTED:
                raise _rejected_earlier(credentials)
            if self.state is CredentialState.VERIFIED:
                return Permit(credentials, verifier=False, version=self.version)
            if not self._busy:
                self._busy = True
                return Permit(credentials, verifier=True, version=self.version)
            if self._outcome is None or self._outcome.done():
                self._outcome = loop.create_future()
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await within(remaining, asyncio.shield(self._outcome))
            except asyncio.TimeoutError:
                raise UpstreamError(
                    CloseReason.UPSTREAM_TIMEOUT,
                    f"waited {timeout:g}s for another connection to check the credentials "
                    f"of {credentials.username}",
                ) from None

    def settle(self, permit: Permit | None, outcome: CredentialState | None) -> bool:
        """Record how a connection that held `permit` ended (None: it told us nothing).

        Returns True when this outcome turned the credentials to REJECTED.
        """
        if permit is None:
            return False
        if permit.verifier:
            self._busy = False
        newly_rejected = False
        accepted_again = False
        # An outcome for credentials that have since changed (or were entered again) says
        # nothing about the new version.
        if outcome is not None and permit.version == self.version:
            newly_rejected = (
                outcome is CredentialState.REJECTED and self.state is not CredentialState.REJECTED
            )
            accepted_again = outcome is CredentialState.VERIFIED and self._was_rejected
            self.state = outcome
        if newly_rejected:
            self._was_rejected = True
            if self._on_rejected is not None:
                self._on_rejected(permit.credentials)
        elif accepted_again:
            self._was_rejected = False
            if self._on_accepted is not None:
                self._on_accepted(permit.credentials)
        self._wake()
        return newly_rejected

    def announce(self) -> bool:
        """Is this the first rejection of the current version to be told to the user?"""
        if self._announced == self.version:
            return False
        self._announced = self.version
        return True

    def threads(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads NTLM and Negotiate steps run on, started on first use: a few of their
        own, so a slow KDC holding them never delays the default executor's name lookups."""
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="proxy-auth"
            )
        return self._threads

    def close(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """Stop the auth threads: idle ones end at once, a busy one after its step. Returns
        the executor, so a caller off the loop can wait for them (`shutdown(wait=True)`)."""
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        self._wake()
        return threads

    def _wake(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(None)
        self._outcome = None


def _rejected_earlier(credentials: Credentials) -> UpstreamError:
    return UpstreamError(
        CloseReason.UPSTREAM_AUTH_FAILED,
        f"the proxy rejected the credentials of {credentials.username} earlier; "
        "they are not tried again until they change or the next re-check",
        status=407,
        rejected=True,
    )


def check_credentials(upstream: UpstreamProxy, creds: Credentials | None) -> None:
    """Refuse, before any byte goes out, credentials the chosen scheme cannot carry."""
    if creds is None:
        return
    try:
        if upstream.kind is UpstreamKind.SOCKS5:
            Socks5Handshake(
                "check.invalid", 1, username=creds.username, password=creds.password.reveal()
            )
        elif upstream.auth in (AuthScheme.AUTO, AuthScheme.BASIC):
            basic_proxy_authorization(creds.username, creds.password.reveal())
    except UsageError as exc:
        raise UpstreamError(
            CloseReason.CONFIG_ERROR, f"upstream {upstream.name} cannot be used: {exc}"
        ) from None


# The body of a 407 is read so the connection can carry the next leg; Squid's is 3-4 KiB.
_MAX_407_BODY = 64 * 1024
_RECONNECTS = 1

T = TypeVar("T")


class _ClosedBeforeAnswer(Exception):
    """A kept-alive connection ended before any answer to the next request."""


async def open_tunnel(
    dialer: Dialer,
    upstream: UpstreamProxy,
    target: tuple[str, int],
    creds: Credentials | None,
    auth: UpstreamAuth,
    *,
    connect_timeout: float,
    handshake_timeout: float,
    reserved: bool,
    on_dialed: Callable[[], None] | None = None,
) -> tuple[socket.socket, bytes]:
    """Dial `upstream` and open a tunnel to `target` through it, authenticating as needed.

    Returns the connected socket and the tunnel bytes that came with the proxy's answer.
    Raises UpstreamError; `rejected` is set when the proxy refused the credentials.
    """
    check_credentials(upstream, creds)
    if auth.rejected(creds):
        assert creds is not None
        raise _rejected_earlier(creds)
    if creds is not None:
        auth.target = target
    opener = _Opener(dialer, upstream, target, creds, auth, connect_timeout, reserved, on_dialed)
    try:
        return await opener.run(handshake_timeout)
    except BaseException:
        opener.close()
        raise


class _Opener:
    """One tunnel's dial + handshake rounds; owns the socket until it hands it over."""

    def __init__(
        self,
        dialer: Dialer,
        upstream: UpstreamProxy,
        target: tuple[str, int],
        creds: Credentials | None,
        auth: UpstreamAuth,
        connect_timeout: float,
        reserved: bool,
        on_dialed: Callable[[], None] | None = None,
    ) -> None:
        self.dialer = dialer
        self.on_dialed = on_dialed
        self.upstream = upstream
        self.target = target
        self.creds = creds
        self.auth = auth
        self.connect_timeout = connect_timeout
        self.reserved = reserved
        self.sock: socket.socket | None = None
        self.permit: Permit | None = None
        self.deadline = 0.0
        self.timeout = 0.0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def dial(self) -> socket.socket:
        self.close()
        self.sock = await self.dialer.connect(
            self.upstream.host, self.upstream.port, self.connect_timeout, reserved=self.reserved
        )
        if self.on_dialed is not None:
            self.on_dialed()
        return self.sock

    async def acquire(self) -> None:
        """Get leave to send the credentials; time spent waiting does not count."""
        if self.permit is not None or self.creds is None:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.permit = await self.auth.permit(self.creds, self.timeout)
        self.deadline += loop.time() - started

    async def run(self, timeout: float) -> tuple[socket.socket, bytes]:
        self.timeout = timeout
        try:
            if self.upstream.kind is UpstreamKind.SOCKS5:
                trailing = await self.socks5()
            else:
                trailing = await self.http()
        except UpstreamError as exc:
            outcome = CredentialState.REJECTED if exc.rejected else None
            if exc.reason is CloseReason.UPSTREAM_REFUSED and self.permit is not None:
                # The proxy took the credentials and refused the target (403 and such).
                outcome = CredentialState.VERIFIED
            self.auth.settle(self.permit, outcome)
            raise
        except BaseException:
            self.auth.settle(self.permit, None)
            raise
        self.auth.settle(self.permit, CredentialState.VERIFIED)
        assert self.sock is not None
        sock, self.sock = self.sock, None
        return sock, trailing

    async def socks5(self) -> bytes:
        host, port = self.target
        if self.creds is not None:
            await self.acquire()
        handshake = socks5_handshake(host, port, self.creds)
        sock = await self.dial()
        loop = asyncio.get_running_loop()
        try:
            return await run_handshake(loop, sock, handshake, self.upstream, self.timeout)
        except UpstreamError as exc:
            if exc.reason is CloseReason.UPSTREAM_AUTH_FAILED and self.creds is not None:
                exc.rejected = True
                exc.detail = self._rejected_words("username/password")
            raise

    def _rejected_words(self, scheme: str) -> str:
        assert self.creds is not None
        return (
            f"proxy {self.upstream} rejected the credentials of {self.creds.username} "
            f"({scheme}); they are not sent again until they change or the next re-check"
        )

    async def _auth_step(self, call: Callable[[], AuthStep], token: bool) -> AuthStep:
        """Run one ProxyAuth call; one that may step an NTLM or Negotiate context (`token`)
        runs in a worker thread, within the handshake's time. Kerberos asks the KDC for a
        service ticket inside that step: a network round trip, seconds when the KDC is slow
        or away, which on the loop would stop every other tunnel meanwhile. Basic and Digest
        steps are pure computation and stay on the loop.

        Only this coroutine uses the ProxyAuth, and it waits for the thread; the shared
        AuthMemo is only read there (a stale read equals another tunnel's `succeeded()`
        landing a moment later).
        """
        if not token:
            return call()
        loop = asyncio.get_running_loop()
        return await self._in_time(
            lambda: loop.run_in_executor(self.auth.threads(), call),
            f"proxy {self.upstream}: the NTLM/Negotiate step did not finish within "
            f"{self.timeout:g}s (with Kerberos: is the KDC reachable?)",
        )

    async def _in_time(self, work: Callable[[], Awaitable[T]], late: str) -> T:
        """Await `work()` within what is left of the handshake's time; past it, the tunnel
        fails with upstream-timeout and the words `late`."""
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await within(remaining, work())
        except asyncio.TimeoutError:
            raise UpstreamError(CloseReason.UPSTREAM_TIMEOUT, late) from None

    async def http(self) -> bytes:
        loop = asyncio.get_running_loop()
        host, port = self.target
        creds = self.creds
        pinned = None if self.upstream.auth is AuthScheme.AUTO else self.upstream.auth.value
        username = creds.username if creds is not None else None
        password = creds.password.reveal() if creds is not None else None
        proxy_auth = ProxyAuth(
            authority=format_authority(host, port),
            username=username,
            password=password,
            pinned=pinned,
            memo=self.auth.memo,
            contexts=token_contexts(username, password, self.upstream.host),
            kerberos=kerberos_available(),
        )
        self.deadline = loop.time() + self.timeout
        step = await self._auth_step(proxy_auth.first, proxy_auth.steps_token())
        reconnects = 0
        sock = await self.dial()
        handshake: ConnectHandshake | None = None
        while True:
            if step.sends_credentials:
                await self.acquire()
            headers = [step.header] if step.header is not None else []
            try:
                if handshake is None:
                    handshake = ConnectHandshake(
                        host, port, headers=headers, max_refusal_body=_MAX_407_BODY
                    )
                    reused = False
                else:
                    handshake.next_request(headers)
                    reused = True
                trailing = await self._drive(sock, handshake, reused)
            except ProxyAuthRequired as exc:
                keep = exc.reusable
                try:
                    step = await self._auth_step(
                        functools.partial(proxy_auth.challenged, exc.headers, same_connection=keep),
                        proxy_auth.steps_token(exc.headers),
                    )
                except ProxyRejectedCredentials as rejected:
                    raise UpstreamError(
                        CloseReason.UPSTREAM_AUTH_FAILED,
                        self._rejected_words(_SCHEME_WORDS[rejected.scheme]),
                        status=407,
                        refusal=exc.reason,
                        rejected=True,
                    ) from None
                except HandshakeRefused as refused:
                    raise UpstreamError(
                        CloseReason.UPSTREAM_AUTH_FAILED,
                        f"proxy {self.upstream}: {refused.reason} (407)",
                        status=407,
                        refusal=exc.reason,
                    ) from None
                except ProtocolError as bad:
                    raise self._protocol_error(bad) from None
                if not keep:
                    if reconnects >= _RECONNECTS:
                        raise UpstreamError(
                            CloseReason.UPSTREAM_AUTH_FAILED,
                            f"proxy {self.upstream} closed the connection after each 407, so "
                            f"{_SCHEME_WORDS.get(step.scheme or '', 'authentication')} could "
                            "not finish (it needs a kept-alive connection)",
                            status=407,
                        ) from None
                    reconnects += 1
                    sock = await self.dial()
                    handshake = None
                continue
            except _ClosedBeforeAnswer:
                if reconnects >= _RECONNECTS:
                    raise UpstreamError(
                        CloseReason.UPSTREAM_PROTOCOL_ERROR,
                        f"proxy {self.upstream} closed the connection without answering "
                        "the next authentication step",
                    ) from None
                reconnects += 1
                step = await self._auth_step(proxy_auth.restart, proxy_auth.steps_token())
                sock = await self.dial()
                handshake = None
                continue
            except HandshakeRefused as exc:
                raise proxy_refused(self.upstream, exc) from None
            except ProtocolError as exc:
                raise self._protocol_error(exc) from None
            except UsageError as exc:
                raise UpstreamError(
                    CloseReason.CONFIG_ERROR, f"upstream {self.upstream.name} cannot be used: {exc}"
                ) from None
            proxy_auth.succeeded()
            if not proxy_auth.credentials_sent:
                # Nothing learned about the credentials: hand the permit back untouched.
                self.auth.settle(self.permit, None)
                self.permit = None
            return trailing

    def _protocol_error(self, exc: ProtocolError) -> UpstreamError:
        return bad_answer(self.upstream, exc)

    async def _drive(self, sock: socket.socket, handshake: ConnectHandshake, reused: bool) -> bytes:
        loop = asyncio.get_running_loop()
        received = 0

        async def exchange() -> bytes:
            nonlocal received
            out = handshake.data_to_send()
            if out:
                await loop.sock_sendall(sock, out)
            while not handshake.done:
                data = await loop.sock_recv(sock, _RECV)
                if not data and reused and received == 0:
                    raise _ClosedBeforeAnswer
                received += len(data)
                handshake.receive_data(data)
            return handshake.trailing

        try:
            return await self._in_time(
                exchange, handshake_timeout(self.upstream, self.timeout).detail
            )
        except OSError as exc:
            if reused and received == 0:
                raise _ClosedBeforeAnswer from None
            raise dropped(self.upstream, exc) from None


_SCHEME_WORDS = {"basic": "Basic", "digest": "Digest", "ntlm": "NTLM", "negotiate": "Negotiate"}
