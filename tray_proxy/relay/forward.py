"""Serve a redirected plain-HTTP connection by forwarding its requests to the proxy.

A proxy that refuses ``CONNECT host:80`` (Debian's stock Squid: ``http_access deny CONNECT
!SSL_ports``) still forwards plain HTTP sent to it as proxy requests. ``Port80Memory`` keeps,
per upstream, which ports it refused to tunnel; ``forward_http`` then serves the client
connection itself: h11 parses each request (keep-alive, pipelining, chunked bodies,
``Expect: 100-continue``), relay/protocol/forward_http.py rewrites it to absolute form with
``Proxy-Authorization``, and the response streams back. Bodies are never held whole: each
read of one side is written to the other before the next read, so a large download costs
one receive buffer of memory.

Credentials go through the upstream's ``UpstreamAuth`` exactly as on the CONNECT path: one
unverified attempt at a time, a 407 to our credentials rejects them for every connection,
and rejected credentials are not sent again until they change (relay/upstream.py).

The opening path uses it so: a plain-HTTP connection (the peek saw an HTTP request) through
an HTTP upstream goes to `forward_http` instead of a CONNECT when `Port80Memory.forwards`, and
when its CONNECT fails with a status `Port80Memory.learn` takes; the peeked bytes are handed
over, and the engine closes the client and records the result.

Must not import PySide6. The credentials never reach a log line, an exception or a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import h11

from tray_proxy.relay.aio import within
from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.challenge import parse_challenges
from tray_proxy.relay.protocol.errors import ProtocolError, UsageError, peer_excerpt
from tray_proxy.relay.protocol.forward_http import (
    ForwardRefused,
    connect_refused,
    error_response,
    proxy_request,
    response_fields,
)
from tray_proxy.relay.records import Address, CloseReason, ConnectionRecord
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.relay.upstream import CredentialState, Permit, UpstreamAuth, UpstreamError
from tray_proxy.tasks import spawn

__all__ = ["ForwardLimits", "ForwardResult", "Port80Memory", "forward_http"]

_WIRE_NAMES = {"basic": "Basic", "digest": "Digest", "ntlm": "NTLM", "negotiate": "Negotiate"}
_LINGER_SECONDS = 1.0
# How long a request body waits for the proxy's first answer when a 407 may still come
# (curl waits 1 s for 100 Continue too).
_HOLD = 1.0
# Request body bytes kept so the request can be sent again (stale kept-alive connection, 407).
_REPLAY_MAX = 64 * 1024
_LINGER_BYTES = 1 << 20


class Port80Memory:
    """Which upstreams refused to tunnel to which port, so plain HTTP there is forwarded.

    Learnt from a refused ``CONNECT host:PORT`` (403, 405, 501); forgotten after `ttl`
    seconds, so a proxy whose rules changed gets tunnels again, and when the settings change
    (`forget`). Lives on the engine's loop; not thread-safe.
    """

    def __init__(self, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._until: dict[tuple[str, int], float] = {}

    def __repr__(self) -> str:
        return f"<Port80Memory {sorted(self._until)}>"

    def learn(self, upstream: UpstreamProxy, port: int, status: int | None) -> bool:
        """The proxy answered ``CONNECT host:port`` with `status`: should this connection
        (and the next ones to that port) be forwarded instead? SOCKS5 upstreams tunnel
        everything; their refusals are about the destination."""
        if upstream.kind is not UpstreamKind.HTTP or not connect_refused(status):
            return False
        if len(self._until) >= 256:  # a handful of upstreams and ports; never grows unbounded
            self._until.clear()
        self._until[(upstream.name, port)] = self._clock() + self.ttl
        return True

    def forwards(self, upstream: UpstreamProxy, port: int) -> bool:
        """Is plain HTTP to `port` through `upstream` forwarded rather than tunnelled?"""
        until = self._until.get((upstream.name, port))
        if until is None:
            return False
        if until <= self._clock():
            del self._until[(upstream.name, port)]
            return False
        return True

    def forget(self, upstream: str | None = None) -> None:
        """Forget one upstream (by name), or all of them."""
        if upstream is None:
            self._until.clear()
        else:
            for key in [k for k in self._until if k[0] == upstream]:
                del self._until[key]


@dataclass(frozen=True, slots=True)
class ForwardLimits:
    """`max_head`: bytes of one request or response head (h11 refuses more: 431 / 502).
    `idle_timeout`: seconds without a byte from the side we wait for. `permit_timeout`:
    seconds to wait for another connection to verify the credentials (the handshake time of
    the CONNECT path)."""

    max_head: int = 64 * 1024
    idle_timeout: float = 600.0
    permit_timeout: float = 10.0
    recv_size: int = 256 * 1024


@dataclass(slots=True)
class ForwardResult:
    """How a forwarded connection ended. `failure`: the upstream could not serve it (the
    engine reports it like a failed CONNECT). `reset`: close the client with RST, because a
    response was cut short and a plain close could pass for its end."""

    reason: CloseReason = CloseReason.DONE
    detail: str = ""
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    failure: UpstreamError | None = None
    reset: bool = False


async def forward_http(
    client: socket.socket,
    first_bytes: bytes,
    destination: Address,
    upstream: UpstreamProxy,
    credentials: Credentials | None,
    auth: UpstreamAuth,
    dial: Callable[[], Awaitable[socket.socket]],
    *,
    host: str | None = None,
    limits: ForwardLimits | None = None,
    record: ConnectionRecord | None = None,
    on_answer: Callable[[], None] | None = None,
) -> ForwardResult:
    """Serve every request on `client` by forwarding it to `upstream`; returns how it ended.

    `client`: the redirected connection (non-blocking); the caller closes it afterwards
    (with RST when `result.reset`). `first_bytes`: what the relay already read from it (the
    peek). `destination`: where the client connected (SO_ORIGINAL_DST). `host`: the name the
    connection was routed for (the peeked ``Host``); requests for another host get 421.
    `dial`: opens a new connection to the proxy or raises UpstreamError; called for the first
    request and whenever the proxy closed the previous one. `record`: its byte counters
    follow the traffic as it flows. `on_answer`: called once, when the proxy's first answer
    (not a 407) arrives: the connection is up (the engine's TunnelEstablished).
    """
    forwarder = _Forwarder(
        client,
        destination,
        upstream,
        credentials,
        auth,
        dial,
        host,
        limits or ForwardLimits(),
        record,
        on_answer,
    )
    return await forwarder.run(first_bytes)


class _Stop(Exception):
    """End the connection: why, and what (if anything) to answer a waiting client."""

    def __init__(
        self,
        reason: CloseReason,
        detail: str,
        *,
        answer: int | None = None,
        failure: UpstreamError | None = None,
        reset: bool = False,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.answer = answer
        self.failure = failure
        self.reset = reset


class _ClosedBeforeAnswer(Exception):
    """A kept-alive proxy connection ended before any answer: the request may go again."""


class _AskAgain(Exception):
    """The proxy asked for Basic credentials we have: send the same request with them."""


def _failed(exc: UpstreamError, answer: int = 502) -> _Stop:
    return _Stop(exc.reason, exc.detail, answer=answer, failure=exc)


class _Forwarder:
    """One client connection's requests; owns the proxy-side socket."""

    def __init__(
        self,
        client: socket.socket,
        destination: Address,
        upstream: UpstreamProxy,
        credentials: Credentials | None,
        auth: UpstreamAuth,
        dial: Callable[[], Awaitable[socket.socket]],
        host: str | None,
        limits: ForwardLimits,
        record: ConnectionRecord | None,
        on_answer: Callable[[], None] | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.destination = destination
        self.upstream = upstream
        self.credentials = credentials
        self.auth = auth
        self.dial = dial
        self.pinned = host
        self.limits = limits
        self.record = record
        self.on_answer = on_answer
        self.down = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.up: h11.Connection | None = None
        self.sock: socket.socket | None = None
        self.permit: Permit | None = None
        self.result = ForwardResult()
        self.consumed = 0  # body bytes of the current request read from the client
        # Those bytes while they are few (<= _REPLAY_MAX), so the request can go again; and
        # whether its end was read too.
        self.replay: bytearray | None = bytearray()
        self.request_done = False
        self.answered = False  # the proxy said something to the request in flight
        self.go = asyncio.Event()  # the upload may start (see _both)
        # Send Basic from the first request when the proxy is known to want it; otherwise
        # only after it asked (as the CONNECT path does: never the password in the clear to a
        # proxy that may want NTLM).
        self.basic = credentials is not None and (
            upstream.auth is AuthScheme.BASIC
            or (upstream.auth is AuthScheme.AUTO and auth.memo.scheme == "basic")
        )

    # -- the connection ------------------------------------------------------------------

    async def run(self, first_bytes: bytes) -> ForwardResult:
        if first_bytes:
            self.down.receive_data(first_bytes)
        try:
            await self._serve()
        except _Stop as stop:
            self.result.reason = stop.reason
            self.result.detail = stop.detail
            self.result.failure = stop.failure
            self.result.reset = stop.reset
            if stop.answer is not None:
                await self._answer(stop.answer, stop.detail)
        finally:
            self._settle(None)
            self._close_upstream()
        if not self.result.reset:
            await self._linger()
        return self.result

    async def _serve(self) -> None:
        while True:
            request = await self._next_request()
            if request is None:
                return
            self.result.requests += 1
            try:
                await self._exchange(request)
            except ForwardRefused as refused:
                raise _Stop(
                    CloseReason.DONE, f"answered {refused}", answer=refused.status
                ) from None
            if self.down.our_state is not h11.DONE or self.down.their_state is not h11.DONE:
                return  # the client or we said close
            self.down.start_next_cycle()

    async def _next_request(self) -> h11.Request | None:
        try:
            event = await self._client_event(between=True)
        except h11.RemoteProtocolError as exc:
            raise _Stop(
                CloseReason.DONE,
                f"answered {exc.error_status_hint}: the client sent no valid HTTP request "
                f"({peer_excerpt(str(exc), 60)})",
                answer=exc.error_status_hint,
            ) from None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11's state machine
            raise _Stop(CloseReason.INTERNAL_ERROR, f"unexpected {type(event).__name__}")
        if _head_size(event) > self.limits.max_head:
            raise _Stop(
                CloseReason.DONE,
                f"answered 431: the request head is over {self.limits.max_head} bytes",
                answer=431,
            )
        return event

    async def _exchange(self, request: h11.Request) -> None:
        """One request and its response. A request may go twice while what was read of its
        body is kept (_REPLAY_MAX): again on a new connection when a kept-alive one closed
        unanswered, again with credentials when the proxy asked for them."""
        bodyless = _bodyless(request)
        self.consumed = 0
        self.replay = bytearray()
        self.request_done = False
        if bodyless:
            # h11 knows at once that no body follows; consume the end of the request now.
            end = await self._client_event()
            assert isinstance(end, h11.EndOfMessage)
        retried = asked = False
        while True:
            authorization = await self._authorization()
            outgoing = proxy_request(
                request, self.destination, pinned=self.pinned, authorization=authorization
            )
            self.pinned = outgoing.host
            # Credentials we may have to add after a 407: hold the body back until the
            # proxy's first word (RFC 9110 section 10.1.1), so the request can go again.
            hold = not bodyless and self.credentials is not None and authorization is None
            sent = outgoing.request
            if hold and not _expects_continue(request):
                sent = _with_expect(sent)
            reused = await self._connect()
            self.answered = False
            try:
                await self._send_up(self._up().send(sent), reused)
                if bodyless:
                    await self._send_up(self._up().send(h11.EndOfMessage()), reused)
                    await self._download(request, reused)
                else:
                    await self._both(request, reused, hold)
                return
            except _ClosedBeforeAnswer:
                if retried or self.replay is None:
                    raise _Stop(
                        CloseReason.UPSTREAM_RESET,
                        f"proxy {self.upstream} closed the connection without answering",
                        answer=502,
                    ) from None
                retried = True
                self._close_upstream()
            except _AskAgain:
                if asked:  # pragma: no cover - _challenged raises when Basic was sent
                    raise
                asked = True
                self.basic = True
                if self.up is not None and self._up_reusable():
                    self.up.start_next_cycle()
                else:
                    self._close_upstream()

    async def _both(self, request: h11.Request, reused: bool, hold: bool) -> None:
        """A request with a body: upload and download at once (the proxy may answer first,
        or send 100 Continue that the client waits for). `hold`: the upload waits for the
        proxy's first answer (at most _HOLD seconds)."""
        self.go = asyncio.Event()
        if not hold:
            self.go.set()
        upload = self._spawn(self._upload(reused), "forward-upload")
        download = self._spawn(self._download(request, reused), "forward-download")
        try:
            pending: set[asyncio.Task[None]] = {upload, download}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        raise exc
                if download in done and upload in pending:
                    # Answered before the request was complete (an error): the rest of the
                    # upload goes nowhere and neither connection can carry on.
                    self.result.detail = "the proxy answered before the request body ended"
                    raise _Stop(CloseReason.DONE, self.result.detail)
        finally:
            for task in (upload, download):
                if not task.done():
                    task.cancel()
            await asyncio.gather(upload, download, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # The caller keeps both tasks and always awaits them before it returns.
        return spawn(coro, name=name, loop=self.loop)

    async def _upload(self, reused: bool) -> None:
        """Send the request body; `reused`: a send failing before any answer means the
        kept-alive connection was stale (the request may go again)."""
        up = self._up()
        if self.replay:
            # The request goes again: first what the client sent of it before.
            await self._send_up(up.send(h11.Data(data=bytes(self.replay))), reused)
        if self.request_done:
            await self._send_up(up.send(h11.EndOfMessage()), reused)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await within(_HOLD, self.go.wait())
        while True:
            try:
                event = await self._client_event()
            except h11.RemoteProtocolError as exc:
                raise _Stop(
                    CloseReason.CLIENT_RESET,
                    f"client side: the request body broke off ({peer_excerpt(str(exc), 60)})",
                    reset=True,
                ) from None
            if isinstance(event, h11.Data):
                self.consumed += len(event.data)
                if self.replay is not None:
                    if len(self.replay) + len(event.data) <= _REPLAY_MAX:
                        self.replay += event.data
                    else:
                        self.replay = None
                await self._send_up(up.send(h11.Data(data=event.data)), reused)
            elif isinstance(event, h11.EndOfMessage):
                self.request_done = True
                await self._send_up(up.send(h11.EndOfMessage()), reused)
                return
            else:  # pragma: no cover - h11 sends only Data and EndOfMessage here
                raise _Stop(CloseReason.INTERNAL_ERROR, f"unexpected {type(event).__name__}")

    async def _download(self, request: h11.Request, reused: bool) -> None:
        up = self._up()
        client_expects = _expects_continue(request)
        while True:
            try:
                event = await self._upstream_event(up)
            except (h11.RemoteProtocolError, _UpstreamEOF) as exc:
                if not self.answered and reused and isinstance(exc, _UpstreamEOF):
                    raise _ClosedBeforeAnswer from None
                raise self._broken(exc) from None
            self.answered = True
            if isinstance(event, h11.InformationalResponse | h11.Response) and (
                _head_size(event) > self.limits.max_head
            ):
                raise self._bad_answer(f"a response head over {self.limits.max_head} bytes")
            if isinstance(event, h11.InformationalResponse):
                # (A 101 never gets here: h11 refuses it to a request without Upgrade.)
                if event.status_code == 100:
                    self.go.set()
                if self.down.their_http_version == b"1.1" and (
                    event.status_code != 100 or client_expects
                ):
                    # RFC 9110 section 15.2: never a 1xx to an HTTP/1.0 client.
                    await self._send_down(
                        self._head_for_client(
                            h11.InformationalResponse(
                                status_code=event.status_code,
                                headers=response_fields(event.headers.raw_items()),
                                reason=event.reason,
                            )
                        )
                    )
            elif isinstance(event, h11.Response):
                if event.status_code == 407:
                    await self._challenged(event)
                self.go.set()
                self._settle(CredentialState.VERIFIED)
                if self.on_answer is not None:
                    on_answer, self.on_answer = self.on_answer, None
                    on_answer()
                await self._send_down(
                    self._head_for_client(
                        h11.Response(
                            status_code=event.status_code,
                            headers=response_fields(event.headers.raw_items()),
                            reason=event.reason,
                        )
                    )
                )
            elif isinstance(event, h11.Data):
                await self._send_down(self.down.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                # Trailers are dropped: the client's framing may not carry them.
                await self._send_down(self.down.send(h11.EndOfMessage()))
                if self._up_reusable():
                    up.start_next_cycle()
                else:
                    self._close_upstream()
                return
            else:  # pragma: no cover - ConnectionClosed comes as _UpstreamEOF
                raise self._bad_answer(f"unexpected {type(event).__name__}")

    def _head_for_client(self, head: h11.InformationalResponse | h11.Response) -> bytes:
        try:
            return self.down.send(head) or b""
        except h11.LocalProtocolError as exc:  # h11 parsed it from the proxy, so: rare
            raise self._bad_answer(f"an answer the client cannot be given ({exc})") from None

    # -- authentication ---------------------------------------------------------------------

    async def _authorization(self) -> tuple[str, str] | None:
        creds = self.credentials
        if not self.basic or creds is None:
            return None
        if self.permit is None:
            try:
                self.permit = await self.auth.permit(creds, self.limits.permit_timeout)
            except UpstreamError as exc:
                raise _failed(exc) from None
        try:
            return basic_proxy_authorization(creds.username, creds.password.reveal())
        except UsageError as exc:
            raise _failed(
                UpstreamError(
                    CloseReason.CONFIG_ERROR, f"upstream {self.upstream.name} cannot be used: {exc}"
                )
            ) from None

    async def _challenged(self, response: h11.Response) -> None:
        """The proxy answered 407: ask again with Basic, or fail as the CONNECT path does."""
        upstream = self.upstream
        creds = self.credentials
        if self.basic and creds is not None:
            self._settle(CredentialState.REJECTED)
            raise _failed(
                UpstreamError(
                    CloseReason.UPSTREAM_AUTH_FAILED,
                    f"proxy {upstream} rejected the credentials of {creds.username} (Basic); "
                    "they are not sent again until they change",
                    status=407,
                    refusal=response.reason.decode("latin-1"),
                    rejected=True,
                )
            )
        try:
            offered = [
                c.scheme
                for c in parse_challenges(
                    v.decode("latin-1") for n, v in response.headers if n == b"proxy-authenticate"
                )
            ]
        except ProtocolError as exc:
            raise self._bad_answer(str(exc)) from None
        if creds is None:
            why = "asks for authentication and no password is set up"
        elif upstream.auth not in (AuthScheme.AUTO, AuthScheme.BASIC) or "basic" not in offered:
            schemes = ", ".join(dict.fromkeys(_WIRE_NAMES.get(o, o) for o in offered))
            schemes = schemes or "no scheme"
            why = f"wants {schemes} for plain HTTP, and forwarding plain HTTP answers Basic only"
        else:
            if self.replay is not None:
                await self._drain_answer()
                if self.replay is not None:
                    raise _AskAgain
            why = (
                "asked for credentials after the request body had started; "
                "the next request sends them at once"
            )
            self.auth.memo.scheme = self.auth.memo.scheme or "basic"
        raise _failed(
            UpstreamError(
                CloseReason.UPSTREAM_AUTH_FAILED,
                f"proxy {upstream} {why} (407)",
                status=407,
                refusal=response.reason.decode("latin-1"),
            )
        )

    async def _drain_answer(self) -> None:
        """Read the rest of a 407 so its connection can carry the next request."""
        up = self._up()
        while True:
            try:
                event = await self._upstream_event(up)
            except (h11.RemoteProtocolError, _UpstreamEOF):
                self._close_upstream()
                return
            if isinstance(event, h11.EndOfMessage):
                return

    def _settle(self, outcome: CredentialState | None) -> None:
        """Tell UpstreamAuth what the proxy said to our credentials (None: nothing)."""
        permit, self.permit = self.permit, None
        if permit is None:
            return
        self.auth.settle(permit, outcome)
        if outcome is CredentialState.VERIFIED and self.auth.memo.scheme is None:
            self.auth.memo.scheme = "basic"

    # -- the two sides ------------------------------------------------------------------------

    async def _client_event(self, between: bool = False) -> object:
        """The next h11 event of the client (reads as needed). `between`: waiting for the
        next request, where silence until the idle timeout and EOF are normal ends."""
        down = self.down
        while True:
            event = down.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await within(
                    self.limits.idle_timeout,
                    self.loop.sock_recv(self.client, self.limits.recv_size),
                )
            except asyncio.TimeoutError:
                raise _Stop(
                    CloseReason.IDLE_TIMEOUT,
                    f"client sent nothing for {self.limits.idle_timeout:g}s",
                    # Quiet between requests is a normal end; within one, it cut the request.
                    reset=not between or bool(down.trailing_data[0]),
                ) from None
            except OSError as exc:
                raise _Stop(
                    CloseReason.CLIENT_RESET, f"client side: {exc.strerror or exc}", reset=True
                ) from None
            down.receive_data(data)

    async def _upstream_event(self, up: h11.Connection) -> object:
        while True:
            event = up.next_event()
            if event is h11.NEED_DATA:
                sock = self.sock
                assert sock is not None
                try:
                    data = await within(
                        self.limits.idle_timeout, self.loop.sock_recv(sock, self.limits.recv_size)
                    )
                except asyncio.TimeoutError:
                    raise _Stop(
                        CloseReason.IDLE_TIMEOUT,
                        f"proxy {self.upstream} sent nothing for {self.limits.idle_timeout:g}s",
                        answer=504 if self.down.our_state is h11.SEND_RESPONSE else None,
                        reset=True,
                    ) from None
                except OSError as exc:
                    raise _UpstreamEOF(exc.strerror or str(exc)) from None
                if not data and up.their_state is h11.SEND_RESPONSE and not _started(up):
                    raise _UpstreamEOF("closed")
                up.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _UpstreamEOF("closed")
            return event

    async def _connect(self) -> bool:
        """A proxy connection for the next request; True when it is a kept-alive one."""
        if self.sock is not None and self.up is not None and self.up.our_state is h11.IDLE:
            return True
        self._close_upstream()
        try:
            self.sock = await self.dial()
        except UpstreamError as exc:
            raise _failed(exc, 504 if exc.reason is CloseReason.UPSTREAM_TIMEOUT else 502) from None
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.limits.max_head)
        return False

    def _up(self) -> h11.Connection:
        assert self.up is not None
        return self.up

    def _up_reusable(self) -> bool:
        up = self._up()
        # trailing_data[1]: the proxy closed (a read-to-close body ended), whatever the states.
        return up.our_state is h11.DONE and up.their_state is h11.DONE and not up.trailing_data[1]

    def _close_upstream(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.up = None

    async def _send_up(self, data: bytes, reused: bool) -> None:
        if not data:
            return
        sock = self.sock
        assert sock is not None
        try:
            await self.loop.sock_sendall(sock, data)
        except OSError as exc:
            if reused and not self.answered:
                raise _ClosedBeforeAnswer from None
            raise _Stop(
                CloseReason.UPSTREAM_RESET,
                f"proxy {self.upstream} dropped the connection: {exc.strerror or exc}",
                answer=502 if self.down.our_state is h11.SEND_RESPONSE else None,
                reset=True,
            ) from None
        self.result.bytes_up += len(data)
        if self.record is not None:
            self.record.bytes_up += len(data)

    async def _send_down(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self.loop.sock_sendall(self.client, data)
        except OSError as exc:
            raise _Stop(
                CloseReason.CLIENT_RESET, f"client side: {exc.strerror or exc}", reset=True
            ) from None
        self.result.bytes_down += len(data)
        if self.record is not None:
            self.record.bytes_down += len(data)

    def _broken(self, exc: Exception) -> _Stop:
        if self.down.our_state is h11.SEND_RESPONSE:
            # Nothing went to the client yet: it gets a 502 and the words.
            if isinstance(exc, _UpstreamEOF):
                return _Stop(
                    CloseReason.UPSTREAM_RESET,
                    f"proxy {self.upstream} closed the connection without answering",
                    answer=502,
                )
            return self._bad_answer(peer_excerpt(str(exc), 60))
        return _Stop(
            CloseReason.UPSTREAM_RESET,
            f"proxy {self.upstream} broke off the response ({peer_excerpt(str(exc), 60)})",
            reset=True,
        )

    def _bad_answer(self, why: str) -> _Stop:
        return _failed(
            UpstreamError(
                CloseReason.UPSTREAM_PROTOCOL_ERROR,
                f"proxy {self.upstream} sent a bad answer: {why}",
            )
        )

    async def _answer(self, status: int, words: str) -> None:
        """The relay's own answer to a waiting client, best effort (then the connection ends)."""
        if self.down.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response, body = error_response(status, words)
        with contextlib.suppress(h11.LocalProtocolError, _Stop):
            data = self.down.send(response) + self.down.send(h11.Data(data=body))
            await self._send_down(data + self.down.send(h11.EndOfMessage()))

    async def _linger(self) -> None:
        """Close the sending side, then read what the client still sends (bounded) before
        the caller closes: closing with unread bytes sends RST, which can destroy the last
        response before the client read it (a pipelining client after our `close`)."""
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
        deadline = self.loop.time() + _LINGER_SECONDS
        drained = 0
        while drained < _LINGER_BYTES:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            try:
                data = await within(remaining, self.loop.sock_recv(self.client, 65536))
            except (asyncio.TimeoutError, OSError):
                return
            if not data:
                return
            drained += len(data)


class _UpstreamEOF(Exception):
    """The proxy's connection ended (EOF or error) where h11 expected more."""


def _started(up: h11.Connection) -> bool:
    # h11 keeps a partial response head in its buffer: a close then cuts a started answer.
    return bool(up.trailing_data[0])


def _head_size(event: h11.Request | h11.InformationalResponse | h11.Response) -> int:
    """About the bytes of a head. h11 caps only a head that arrives in pieces; one that came
    in a single read of any size would pass."""
    first = len(event.target) if isinstance(event, h11.Request) else len(event.reason)
    return first + 16 + sum(len(n) + len(v) + 4 for n, v in event.headers.raw_items())


def _expects_continue(request: h11.Request) -> bool:
    return any(n == b"expect" and v.lower() == b"100-continue" for n, v in request.headers)


def _with_expect(request: h11.Request) -> h11.Request:
    fields = [*request.headers.raw_items(), (b"Expect", b"100-continue")]
    return h11.Request(method=request.method, target=request.target, headers=fields)


def _bodyless(request: h11.Request) -> bool:
    """No body follows the head (RFC 9112 section 6.3: no Transfer-Encoding, no length or 0)."""
    length = b"0"
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            length = value
    return length.strip() in (b"0", b"")
