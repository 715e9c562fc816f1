"""Opening a tunnel in the common case with callbacks instead of a Task per connection.

Must not import PySide6.

The common case: an HTTP CONNECT upstream whose address is known (an IP literal or a fresh
lookup), no reserved source port needed, and either no credentials or credentials the proxy
already accepted with Basic. Then one connection costs a handful of callbacks: the accept
dials the upstream at once, in parallel with reading the client's first bytes (peek), the
CONNECT goes out as soon as both are done (often within the accept callback itself: a near
proxy has answered the SYN before connect() returns), and a plain 2xx answer starts the
splice tunnel. No Task, no future, no timer per connection: one shared tick checks the
deadlines.

Anything else hands the connection to the engine's coroutine path (`Hooks.fall_back`), which
redials and does the whole handshake (407 challenges, Digest, NTLM, Negotiate, SOCKS5,
several addresses, reserved source ports). Failures that the coroutine path would only
repeat (no answer in time, a refusal, a bad answer) are reported here with the same
reasons and words.

Readiness comes from the engine's Poller (relay/poller.py), like the tunnels': a callback
handed from one phase to the next is a dict update and at most one epoll_ctl.

Early data (settings.early_data, docs/relay.md "Early data"): the client's first bytes may
leave in the CONNECT's own write. With "auto", only a TLS handshake (a ClientHello, which is
harmless to send again on another tunnel) goes early, and only to a proxy that has not been
seen dropping it (`EarlyDataTrust`): the first tunnels through a proxy are held after the 200
until the server answers, and redone on the coroutine path if it does not.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from tray_proxy.relay.failures import (
    UpstreamError,
    bad_answer,
    connect_timeout,
    dropped,
    first_bytes_lost,
    handshake_timeout,
    refused,
)
from tray_proxy.relay.poller import Poller
from tray_proxy.relay.protocol.challenge import parse_challenges
from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError, UsageError
from tray_proxy.relay.protocol.http_connect import (
    ConnectHandshake,
    connect_request,
    plain_2xx_end,
)
from tray_proxy.relay.protocol.peek import HostPeeker
from tray_proxy.relay.records import Address, CloseReason, ConnectionRecord, ConnState
from tray_proxy.relay.settings import RelaySettings, UpstreamProxy
from tray_proxy.relay.sockets import outbound_socket
from tray_proxy.relay.spares import Spares
from tray_proxy.routing.router import Decision

_REQUESTS_KEPT = 512  # CONNECT requests kept ready, by target and header
_PEEK_RECV = 16384
_ANSWER_RECV = 65536
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_TLS_HANDSHAKE = 0x16  # RFC 8446 section 5.1, ContentType.handshake
# Early data on trial ("auto"): how long a tunnel waits after the 200 for the server's first
# bytes before it counts the early bytes as dropped: this many times the CONNECT's answer
# time, and at least _TRIAL_MIN_WAIT seconds. _STRIKES such waits in a row, with no answer
# in between, and the proxy gets no early bytes any more.
_TRIAL_MIN_WAIT = 1.0
_TRIAL_ANSWER_TIMES = 4.0
_STRIKES = 2

log = logging.getLogger(__name__)


class ConnectRequests:
    """CONNECT request bytes by target, for one Proxy-Authorization header at a time: a new
    header (changed credentials) drops them all, so no old secret lingers here.

    One per engine (issue 16, "Secrets and boundaries in code"): the bytes carry the
    password, so they live no longer than the engine, which also `clear()`s them when the
    credentials change and when it stops."""

    __slots__ = ("header", "by_target")

    def __init__(self) -> None:
        self.header: tuple[str, str] | None = None
        self.by_target: dict[tuple[str, int], bytes] = {}

    def clear(self) -> None:
        self.by_target.clear()
        self.header = None


class EarlyDataTrust:
    """Which proxies keep the bytes written right behind a CONNECT (settings.early_data
    "auto"), by the address an Opening dials: unknown at first, `proven` once a server
    answered bytes that went early, `refused` after _STRIKES tunnels in a row got no answer
    in time. A proxy that reads the CONNECT with one recv and throws the rest away would
    otherwise hang every HTTPS connection through it, waiting for a ServerHello.

    One per engine, made anew when the upstreams change (a reload); `stats` is the engine's
    Counter ("early_proven", "early_fallback", "early_refused")."""

    __slots__ = ("proven", "refused", "strikes", "stats")

    def __init__(self, stats: Counter[str] | None = None) -> None:
        self.proven: set[tuple[int, Address]] = set()
        self.refused: set[tuple[int, Address]] = set()
        self.strikes: dict[tuple[int, Address], int] = {}
        self.stats: Counter[str] = stats if stats is not None else Counter()

    def kept(self, address: tuple[int, Address]) -> None:
        """The server answered bytes that went early through the proxy at `address`."""
        self.proven.add(address)
        self.strikes.pop(address, None)
        self.stats["early_proven"] += 1

    def lost(self, address: tuple[int, Address], upstream: UpstreamProxy) -> None:
        """No answer came to the early bytes, neither in time nor before the tunnel ended:
        a strike. A tunnel that ends in silence after a ClientHello is not how a TLS server
        answers one (it sends an alert), and counting it errs on the safe side: the most
        it costs is early data for this proxy."""
        self.stats["early_fallback"] += 1
        if address in self.refused:
            return
        strikes = self.strikes.get(address, 0) + 1
        if strikes < _STRIKES:
            self.strikes[address] = strikes
            return
        self.strikes.pop(address, None)
        self.refused.add(address)
        self.stats["early_refused"] += 1
        log.warning(
            "proxy %s (at %s port %d) drops the bytes sent right behind a CONNECT: %d "
            "tunnels in a row got no answer from the server, so early data is off for this "
            'proxy (relay.early_data = "auto") until the settings change, and its HTTPS '
            "connections take one round trip more. Nothing is lost: those connections were "
            "opened again without it. To skip this test at every start, set "
            "relay.early_data = false in the settings file",
            upstream,
            address[1][0],
            address[1][1],
            _STRIKES,
        )


def _handshake_only(data: bytes) -> bool:
    """Is `data` nothing but complete TLS handshake records (no 0-RTT application data, no
    change_cipher_spec, no record cut short)? Only such bytes go early on "auto": a
    ClientHello may be sent again on another tunnel, a request may not."""
    pos = 0
    end = len(data)
    while pos + 5 <= end and data[pos] == _TLS_HANDSHAKE:
        pos += 5 + (data[pos + 3] << 8 | data[pos + 4])
    return pos == end and end > 0


def _basic_only(headers: Sequence[tuple[str, str]]) -> bool:
    """Does a 407 offer Basic and no other scheme?"""
    values = [v for n, v in headers if n == "proxy-authenticate"]
    try:
        schemes = {c.scheme for c in parse_challenges(values)}
    except ProtocolError:
        return False
    return schemes == {"basic"}


class Hooks(Protocol):
    """What an Opening needs from the engine."""

    def keeps(self, opening: Opening) -> bool:
        """The peek is over (opening.host is final): does the connection's route still go
        through opening.upstream, first? False: it goes on the coroutine path (another
        upstream, DIRECT, BLOCK, a PAC answer to wait for, port-80 forwarding). Sets
        opening.decision."""

    def routed(self, record: ConnectionRecord, decision: Decision | None) -> None:
        """The peek is over: record.host is final; `decision`: the router's, if any."""

    def opened(
        self, record: ConnectionRecord, conn: socket.socket, upstream: socket.socket
    ) -> None:
        """The tunnel is open and every early byte forwarded: start piping."""

    def failed(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        exc: UpstreamError,
        peeked: bytes,
        decision: Decision | None,
    ) -> None:
        """The upstream could not give a tunnel before it was up: the opening machine says
        whether another way is tried (failover, port-80 forwarding: `peeked` holds the
        client's first bytes, none sent yet) or the client is closed with a reset.
        `exc.rejected`: the proxy refused the credentials it had taken (Basic)."""

    def closed(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        reason: CloseReason,
        detail: str,
        reset: bool,
    ) -> None:
        """The connection ended during the opening (client reset, relay stopping, no
        descriptor left)."""

    def fall_back(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        peeker: HostPeeker | None,
        peeked: bytes,
        reauthenticate: bool,
        decision: Decision | None,
        announced: bool,
    ) -> None:
        """Continue on the coroutine path: dial and handshake from scratch.

        `peeker`: a peek still undecided, to go on with; else `peeked` holds its bytes.
        `reauthenticate`: the proxy refused credentials it accepted before. `decision`: the
        route keeps() made, if it ran (a decision is made once per connection: it may
        take an upstream's half-open trial). `announced`: routed() was called already.
        """

    def finish_slowly(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        upstream: socket.socket,
        to_upstream: bytes,
        to_client: bytes,
    ) -> None:
        """The tunnel is open but early bytes did not fit in one send: finish in a Task."""


class Deadlines:
    """The time limits of the openings in progress, checked on one shared tick.

    The tick runs only while some opening is in progress, every `resolution` seconds; a
    limit thus fires up to one tick late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float) -> None:
        self._loop = loop
        self._resolution = resolution
        self.pending: dict[int, Opening] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, opening: Opening) -> None:
        if not self.pending and self._timer is None:
            self._timer = self._loop.call_later(self._resolution, self._tick)
        self.pending[opening.record.id] = opening

    def discard(self, opening: Opening) -> None:
        self.pending.pop(opening.record.id, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        for opening in [o for o in self.pending.values() if o.deadline <= now]:
            opening.on_deadline()
        if self.pending:
            self._timer = self._loop.call_later(self._resolution, self._tick)


class Opening:
    """One connection from accept to an open tunnel, on the fast path: `begin` right after
    the accept, `start` once the engine made the connection's record."""

    __slots__ = (
        "poller",
        "hooks",
        "deadlines",
        "settings",
        "record",
        "conn",
        "upstream",
        "address",
        "header",
        "sock",
        "peeker",
        "peeked",
        "connected",
        "handshake",
        "asked",
        "deadline",
        "peek_deadline",
        "answer_deadline",
        "dialed_at",
        "done",
        "writing",
        "dst",
        "host",
        "setback",
        "spares",
        "spare",
        "requests",
        "decision",
        "early",
        "announced",
        "trust",
        "trial",
        "proving",
    )

    record: ConnectionRecord  # given by start(); begin() runs without it

    def __init__(
        self,
        poller: Poller,
        hooks: Hooks,
        deadlines: Deadlines,
        settings: RelaySettings,
        dst: Address,
        conn: socket.socket,
        upstream: UpstreamProxy,
        address: tuple[int, Address],
        header: tuple[str, str] | None = None,
        spares: Spares | None = None,
        requests: ConnectRequests | None = None,
        trust: EarlyDataTrust | None = None,
    ) -> None:
        """`requests`: the engine's cache of CONNECT bytes, `trust`: its verdicts on early
        data (None: ones of its own)."""
        self.poller = poller
        self.hooks = hooks
        self.deadlines = deadlines
        self.settings = settings
        self.dst = dst
        self.host: str | None = None  # the peek's verdict, once decided
        # What stopped begin() before the record existed: reported by start().
        self.setback: tuple[CloseReason, OSError | None] | None = None
        self.conn = conn
        self.upstream = upstream
        self.address = address
        self.header = header
        self.sock: socket.socket | None = None
        self.peeker: HostPeeker | None = None
        self.peeked = b""
        self.connected = False
        # Made only for an answer that is not one plain 2xx head (see _on_answer).
        self.handshake: ConnectHandshake | None = None
        self.asked = False  # the CONNECT went out; its answer is awaited
        self.deadline = 0.0
        self.peek_deadline = 0.0
        self.answer_deadline = 0.0
        self.dialed_at = 0.0
        self.done = False
        self.writing = False  # the upstream socket's writability is watched (connecting)
        self.spares = spares
        self.spare = False  # the upstream socket is a spare (relay/spares.py)
        self.requests = requests if requests is not None else ConnectRequests()
        self.decision: Decision | None = None  # the router's, set by hooks.keeps()
        self.early = 0  # bytes of the peek that went out right behind the CONNECT
        self.announced = False  # hooks.routed() was called
        self.trust = trust if trust is not None else EarlyDataTrust()
        # Early bytes went to a proxy not known to keep them ("auto"): the tunnel is held
        # after the 200 until the server answers (`proving`), see _established.
        self.trial = False
        self.proving = False

    # -- begin and start: dial, peek and ask at once, then the bookkeeping ---------------

    def begin(self) -> None:
        """The part of the opening that sets its latency, done before the engine makes the
        connection's record: dial the proxy, read the client's first bytes and, when both
        are ready, send the CONNECT (often all within this call: a near proxy has answered
        the SYN before connect() returns, and the client has spoken before the accept).

        Nothing here reports or registers: a failure is kept in `setback`, and `start`
        reports it once the record exists. Each step before the CONNECT costs every
        connection latency; everything else waits for `start`.
        """
        spares = self.spares
        sock = spares.take(self.address) if spares is not None else None
        if sock is not None:
            # Connected already, most likely: _ask finds out (a spare still connecting
            # refuses the send with EAGAIN, like a fresh dial).
            self.sock = sock
            self.spare = True
        elif not self._dial():
            return
        if self.settings.peek_timeout > 0:
            self.peeker = HostPeeker(self.settings.peek_max_bytes)
            try:
                if not self._read_peek():
                    return
            except OSError as exc:
                self.setback = (CloseReason.CLIENT_RESET, exc)
                return
        if not self.hooks.keeps(self):
            self.setback = (CloseReason.NO_UPSTREAM, None)  # start() hands it on
            return
        if self._ask() is None:
            self.setback = (CloseReason.UPSTREAM_UNREACHABLE, None)

    def _dial(self) -> bool:
        """Open the connection to the proxy; False (and a setback) if it failed at once."""
        family, addr = self.address
        try:
            # TCP_NODELAY comes in start(), after the CONNECT left.
            sock = outbound_socket(family, addr[0], nodelay=False)
        except OSError as exc:
            # Out of descriptors or memory: our own shortage, not the client's doing.
            self.setback = (CloseReason.INTERNAL_ERROR, exc)
            return False
        self.sock = sock
        try:
            code = sock.connect_ex(addr)
        except OSError:
            code = -1
        if code == 0:
            self.connected = True
        elif code not in _IN_PROGRESS:
            # Refused at once, or no route: the coroutine path tries the other addresses
            # and says why in its own words.
            self.setback = (CloseReason.UPSTREAM_UNREACHABLE, None)
            return False
        return True

    def start(self, record: ConnectionRecord) -> None:
        """Carry on from where `begin` got, now that the connection has its record."""
        self.record = record
        now = time.monotonic()
        self.dialed_at = now
        record.state = ConnState.PEEKING
        setback = self.setback
        if setback is not None:
            reason, exc = setback
            if reason is CloseReason.INTERNAL_ERROR and exc is not None:
                self._end()
                self.hooks.closed(
                    record,
                    self.conn,
                    reason,
                    f"the relay is out of resources: {exc.strerror or exc}",
                    True,
                )
            elif reason is CloseReason.CLIENT_RESET and exc is not None:
                self._client_gone(exc)
            else:
                self._fall_back()
            return
        sock = self.sock
        assert sock is not None
        if not self.spare:  # a spare has it already
            try:
                # After the CONNECT: it concerns the tunnel's small writes, not the request.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                self._fall_back()
                return
        self.deadlines.add(self)
        peeker = self.peeker
        if peeker is not None:
            self.peek_deadline = now + self.settings.peek_timeout
            if not peeker.decided:
                self.poller.add_reader(self.conn.fileno(), self._on_peek)
                self._watch_connect()
                self._update_deadline()
                return
            self._peek_taken()
        self.announced = True
        self.hooks.routed(record, self.decision)
        if self.asked:
            self._asked()
        else:
            # Still connecting: the request goes out once the socket is writable.
            self._wait_connected()

    def _update_deadline(self) -> None:
        """The nearest limit of what is still outstanding."""
        limits = []
        if self.peeker is not None and not self.peeker.decided:
            limits.append(self.peek_deadline)
        if not self.connected:
            limits.append(self.dialed_at + self.settings.connect_timeout)
        if self.asked:
            limits.append(self.answer_deadline)
        self.deadline = min(limits) if limits else float("inf")

    # -- the client's first bytes ---------------------------------------------------------

    def _read_peek(self) -> bool:
        """Read what the client sent; True when the peek has decided. Raises OSError when
        the client is gone. MSG_DONTWAIT: begin() reads before the client socket is made
        non-blocking."""
        peeker = self.peeker
        assert peeker is not None
        try:
            data = self.conn.recv(_PEEK_RECV, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if peeker.feed(data):
            self.host = peeker.host
            return True
        return False

    def _peek_taken(self) -> None:
        """The peek has decided: its host name goes to the record, its bytes upstream."""
        peeker = self.peeker
        assert peeker is not None
        self.record.host = peeker.host
        self.peeked = peeker.buffered
        self.peeker = None

    def _on_peek(self) -> None:
        if self.done:
            return
        try:
            decided = self._read_peek()
        except OSError as exc:
            self._client_gone(exc)
            return
        if decided:
            self.poller.remove_reader(self.conn.fileno())
            self._peek_done()

    def _peek_done(self) -> None:
        peeker = self.peeker
        assert peeker is not None
        if not peeker.decided:
            peeker.feed(b"")  # time is up: decide on what arrived
            self.host = peeker.host
        self._peek_taken()
        if not self.hooks.keeps(self):
            self._fall_back()
            return
        self.announced = True
        self.hooks.routed(self.record, self.decision)
        # A near proxy has often answered the SYN by now: try to send and spare a wakeup
        # (and the registration to wait for writability). A socket still connecting
        # refuses with EAGAIN.
        self._send_request()

    def _watch_connect(self) -> None:
        """Wait for the connect to finish (writability), unless it has or we do already."""
        if not self.connected and not self.writing:
            sock = self.sock
            assert sock is not None
            self.poller.add_writer(sock.fileno(), self._on_connected)
            self.writing = True

    # -- the upstream ---------------------------------------------------------------------

    def _on_connected(self) -> None:
        if self.done:
            return
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code in _IN_PROGRESS:
            return
        if code != 0:
            self._fall_back()
            return
        self.connected = True
        if self.peeker is not None:
            # Still waiting for the client: nothing to write until then. Watch for the proxy
            # closing on us meanwhile.
            self.poller.switch_to_reader(sock.fileno(), self._on_early_upstream)
            self.writing = False
            self._update_deadline()
            return
        self._send_request()

    def _on_early_upstream(self) -> None:
        """The proxy spoke (or hung up) before our request: let the coroutine path retry."""
        if not self.done:
            self._fall_back()

    def _ask(self) -> bool | None:
        """Send the CONNECT: True once sent, False while the socket is still connecting,
        None when it cannot go (the coroutine path then words why)."""
        sock = self.sock
        assert sock is not None
        request = self._request()
        if request is None:
            return None
        data = request
        mode = self.settings.early_data
        trial = False
        if mode != "off":
            # The client's first bytes ride along (settings.early_data); they stay in the
            # peek's buffer, so any answer but a 2xx redoes the opening without them.
            peeker = self.peeker
            early = self.peeked if peeker is None else peeker.buffered
            if early and mode == "auto":
                # A TLS handshake only (one record, the usual hello, checked without a
                # call), to a proxy not seen dropping it; on trial unless proven.
                address = self.address
                trust = self.trust
                size = len(early)
                if (
                    address in trust.refused
                    or size <= 5
                    or early[0] != _TLS_HANDSHAKE
                    or (size != 5 + (early[3] << 8 | early[4]) and not _handshake_only(early))
                ):
                    early = b""
                else:
                    trial = address not in trust.proven
            if early:
                data = request + early
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return None if self.connected else False
        except OSError as exc:
            return False if exc.errno == errno.ENOTCONN and not self.connected else None
        if sent < len(request):
            return None
        self.early = sent - len(request)
        self.trial = trial
        self.connected = True
        self.asked = True
        return True

    def _send_request(self) -> None:
        """Send the CONNECT now if the socket lets us, else once it is writable."""
        asked = self._ask()
        if asked is None:
            self._fall_back()  # it words the configuration error
        elif asked:
            self._asked()
        else:
            self._wait_connected()

    def _asked(self) -> None:
        """The CONNECT went out: wait for the answer."""
        sock = self.sock
        assert sock is not None
        self.record.state = ConnState.HANDSHAKING
        self.answer_deadline = time.monotonic() + self.settings.handshake_timeout
        self.poller.switch_to_reader(sock.fileno(), self._on_answer)
        self.writing = False
        self.deadline = self.answer_deadline  # the peek is over and the connect done

    def _target(self) -> tuple[str, int]:
        dst = self.dst
        return self.host or dst[0], dst[1]

    def _request(self) -> bytes | None:
        """The CONNECT bytes for this target and header, checked once and then kept;
        None if they cannot be written (ConnectHandshake says why, on the Task path)."""
        requests = self.requests
        kept = requests.by_target
        if requests.header != self.header:
            kept.clear()
            requests.header = self.header
        target = self._target()
        request = kept.get(target)
        if request is None:
            header = self.header
            try:
                request = connect_request(*target, [header] if header is not None else [])
            except UsageError:
                return None
            if len(kept) >= _REQUESTS_KEPT:
                kept.clear()
            kept[target] = request
        return request

    def _wait_connected(self) -> None:
        self.record.state = ConnState.CONNECTING
        self._watch_connect()
        self._update_deadline()

    def _on_answer(self) -> None:
        if self.done:
            return
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(_ANSWER_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self.spare and self.handshake is None:
                self._spare_gone()
                return
            self._fail(dropped(self.upstream, exc))
            return
        handshake = self.handshake
        if handshake is None:
            # The usual answer, one plain 2xx head in one segment, needs no parser object.
            end = plain_2xx_end(data)
            if end is not None:
                self._established(data[end:])
                return
            if not data and self.spare:
                self._spare_gone()
                return
            host, port = self._target()
            handshake = self.handshake = ConnectHandshake(
                host, port, headers=[self.header] if self.header is not None else []
            )
            handshake.data_to_send()  # sent already, as connect_request() wrote them
        try:
            handshake.receive_data(data)
        except HandshakeRefused as exc:
            if exc.status == 407:
                if self.header is not None and _basic_only(exc.headers):
                    # The proxy refused the Basic credentials it took before, and asks for
                    # nothing else: a re-check would only cost the account another failed
                    # login (issue 16 item 7). The engine marks them rejected.
                    self._fail(
                        UpstreamError(
                            CloseReason.UPSTREAM_AUTH_FAILED,
                            f"proxy {self.upstream} rejected the credentials (Basic)",
                            status=407,
                            refusal=exc.reason,
                            rejected=True,
                        )
                    )
                    return
                # The proxy no longer takes what it took before and offers another scheme:
                # the coroutine path re-checks the credentials, one connection at a time.
                self._fall_back(reauthenticate=True)
                return
            self._fail(refused(self.upstream, exc))
            return
        except ProtocolError as exc:
            self._fail(bad_answer(self.upstream, exc))
            return
        if not handshake.done:
            return  # more of the head to come
        self._established(handshake.trailing)

    def _established(self, trailing: bytes, latency: float | None = None) -> None:
        """A 2xx came (`trailing`: what the proxy sent behind it): open the tunnel.
        `latency`: the handshake's, measured at the 2xx (None: now)."""
        sock = self.sock
        assert sock is not None
        if self.trial:
            self.trial = False
            if trailing:
                self.trust.kept(self.address)  # the server's answer came with the 2xx
            elif self.early and self.early == len(self.peeked):
                self._await_server()
                return
            # Else only part of the hello went early: the rest goes now, no verdict.
        self._end()
        self.record.handshake_latency = (
            time.monotonic() - self.dialed_at if latency is None else latency
        )
        to_upstream = self.peeked
        early = self.early
        if early:
            self.record.bytes_up += early
            to_upstream = to_upstream[early:]
        if to_upstream:
            try:
                sent = sock.send(to_upstream)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.poller.remove_reader(sock.fileno())
                self.sock = None
                sock.close()
                self.hooks.failed(
                    self.record,
                    self.conn,
                    first_bytes_lost(exc),
                    b"",
                    None,  # the tunnel was up: no other way
                )
                return
            self.record.bytes_up += sent
            to_upstream = to_upstream[sent:]
        self.sock = None
        if to_upstream or trailing:
            self.poller.remove_reader(sock.fileno())
            self.hooks.finish_slowly(self.record, self.conn, sock, to_upstream, trailing)
            return
        # The tunnel's reader replaces ours.
        self.hooks.opened(self.record, self.conn, sock)

    # -- early data on trial ("auto") -----------------------------------------------------

    def _await_server(self) -> None:
        """A plain 2xx with nothing behind it, from a proxy not known to keep early bytes:
        hold the tunnel until the server answers the ClientHello that went early, for
        _TRIAL_ANSWER_TIMES this CONNECT's answer time (at least _TRIAL_MIN_WAIT, at most
        settings.handshake_timeout). No byte
        reaches the client meanwhile, so a proxy that dropped the hello costs the client
        this wait and nothing else: the coroutine path opens a new tunnel and sends it
        again after the 2xx. The client's further bytes wait in its socket."""
        sock = self.sock
        assert sock is not None
        now = time.monotonic()
        asked_at = self.answer_deadline - self.settings.handshake_timeout
        self.record.handshake_latency = now - self.dialed_at
        self.proving = True
        # Never longer than the CONNECT itself may take (a 9 s answer must not mean 36 s).
        wait = min(_TRIAL_ANSWER_TIMES * (now - asked_at), self.settings.handshake_timeout)
        self.deadline = now + max(_TRIAL_MIN_WAIT, wait)
        self.poller.add_reader(sock.fileno(), self._on_server)  # in place of _on_answer

    def _on_server(self) -> None:
        if self.done:
            return
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(_ANSWER_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.proving = False
        if not data:
            # The tunnel ended before the server said anything: a strike too (see lost).
            self._early_lost()
            return
        self.trust.kept(self.address)
        self._established(data, self.record.handshake_latency)

    def _early_lost(self) -> None:
        """No answer to the early bytes: drop this tunnel (nothing of it reached the
        client) and redo the opening on the coroutine path, which sends the peek's bytes
        after the 2xx."""
        self.proving = False
        self.record.handshake_latency = None
        self.trust.lost(self.address, self.upstream)
        self._fall_back()

    # -- endings --------------------------------------------------------------------------

    def on_deadline(self) -> None:
        if self.done:
            return
        now = time.monotonic()
        if self.proving:
            if now >= self.deadline:
                self._early_lost()
            return
        if self.peeker is not None and not self.peeker.decided and now >= self.peek_deadline:
            self.poller.remove_reader(self.conn.fileno())
            self._peek_done()
            if self.done:
                return
        if not self.connected and now >= self.dialed_at + self.settings.connect_timeout:
            self._fail(connect_timeout(self.address[1], self.settings.connect_timeout))
            return
        if self.asked and now >= self.answer_deadline:
            self._fail(handshake_timeout(self.upstream, self.settings.handshake_timeout))
            return
        self._update_deadline()

    def abort(self, reason: CloseReason, detail: str) -> None:
        """The engine stops: end this opening now."""
        if self.done:
            return
        self._end()
        self._close_upstream()
        self.hooks.closed(self.record, self.conn, reason, detail, True)

    def _client_gone(self, exc: OSError) -> None:
        self._end()
        self._close_upstream()
        self.hooks.closed(
            self.record,
            self.conn,
            CloseReason.CLIENT_RESET,
            f"client side: {os.strerror(exc.errno) if exc.errno else exc}",
            False,
        )

    def _fail(self, exc: UpstreamError) -> None:
        self._end()
        self._close_upstream()
        # No decision yet (the peek undecided): no other way to try.
        self.hooks.failed(self.record, self.conn, exc, self.peeked, self.decision)

    def _spare_gone(self) -> None:
        """The proxy closed a spare before answering our request: it had timed the idle
        connection out just as we wrote to it. Nothing of the client went upstream yet, so
        the coroutine path dials afresh."""
        spares = self.spares
        if spares is not None:
            spares.stats["spare_stale"] += 1
        self._fall_back()

    def _fall_back(self, reauthenticate: bool = False) -> None:
        self._end()
        self._close_upstream()
        self.hooks.fall_back(
            self.record,
            self.conn,
            self.peeker,
            self.peeked,
            reauthenticate,
            self.decision,
            self.announced,
        )

    def _end(self) -> None:
        """Stop every callback of this opening (the sockets stay open)."""
        self.done = True
        self.deadlines.discard(self)
        if self.peeker is not None and not self.peeker.decided:
            self.poller.remove_reader(self.conn.fileno())

    def _close_upstream(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        fd = sock.fileno()
        if fd >= 0:
            self.poller.remove_reader(fd)
            self.poller.remove_writer(fd)
        sock.close()
