"""A closed connection's failure in words: one sentence saying what happened, then what to do.

Built from the row (destination, upstream name, the engine's `detail`) and the upstream's
settings (the proxy's host:port, the user name). The engine's details are technical and fixed
in wording (relay/upstream.py, relay/opening.py, relay/engine.py, relay/pipe.py); this module
reads them to pick the right sentence, and falls back to the detail itself when it does not
recognise one, so a new engine wording degrades to a plainer message, never to a wrong one.

A sentence names only controls the user can find: the "Credentials…" dialog (which also sets
up a new proxy), "Test connection", the dashboard's Upstreams tab, the tray's "Switch off" /
"Switch on", and `tray-proxy credentials set NAME`. The detail never holds a header or a
password (the engine keeps them out); nothing here adds one.

Pure: no I/O. Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

__all__ = ["failure_words", "proxy_authority"]

# "proxy answered 403 Forbidden" (HandshakeRefused.__str__), inside the engine's detail.
_ANSWERED = re.compile(r"proxy answered (\d+)\s*(.*)$")
_WITHIN = re.compile(r"(?:within|over|waited) (\d+(?:\.\d+)?)\s?s\b")
# "cannot connect to 10.0.0.1:8080: Connection refused" (Dialer.connect)
_CANNOT_CONNECT = re.compile(r"cannot connect to (.+?): (.+)$")
_CANNOT_RESOLVE = re.compile(r"cannot resolve (\S+): (.+)$")
_RESOLVING = re.compile(r"resolving (\S+) took over")
_DROPPED = re.compile(r"dropped the connection: (.+)$")
_SIDE = re.compile(r"(?:upstream|client) side: (.+?)(?: while forwarding the first bytes)?$")
_BAD_ANSWER = re.compile(r"sent a bad answer: (.+)$")
_CANNOT_BE_USED = re.compile(r"cannot be used: (.+)$")
# "proxy corp (http://h:p): <why> (407)" (upstream.py, a 407 we cannot answer)
_PROXY_SAYS = re.compile(r"^proxy .+? \(\S+\): (.*?)(?: \(407\))?\.?$")
_OUT_OF = re.compile(r"out of resources: (.+)$")

_CREDENTIALS = "Open Credentials to fix it."
_TEST = "Use Test connection to check the proxy."


def proxy_authority(upstream: UpstreamProxy) -> str:
    """host:port of a proxy as the user typed it (IPv6 in brackets)."""
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return f"{host}:{upstream.port}"


def failure_words(
    row: ConnectionRow,
    upstreams: Mapping[str, UpstreamProxy],
    usernames: Mapping[str, str] | None = None,
) -> str:
    """The failure of `row` in words, with what to do; "" when the row did not fail.

    `upstreams`: the configured proxies by name (for host:port, kind and user name).
    `usernames`: user names found elsewhere (the keyring's own entry), by upstream name;
    they win over the config's, which may be unset.

    One normal end gets words too: a program that closed its connection without sending a
    byte, which the user otherwise sees only as a program failing for no reason.
    """
    reason = row.close_reason
    if reason is None:
        return ""
    speak = _SPEAKERS.get(reason)
    if speak is None:
        return ""
    upstream = upstreams.get(row.upstream) if row.upstream is not None else None
    username = None
    if row.upstream is not None and usernames is not None:
        username = usernames.get(row.upstream)
    if username is None and upstream is not None:
        username = upstream.username
    return speak(_Context(row, upstream, username))


class _Context:
    """What a sentence is built from."""

    __slots__ = ("row", "upstream", "username", "detail")

    def __init__(self, row: ConnectionRow, upstream: UpstreamProxy | None, user: str | None):
        self.row = row
        self.upstream = upstream
        self.username = user
        self.detail = row.detail.strip()

    @property
    def proxy(self) -> str:
        """The proxy's host:port, or its name when the settings no longer have it."""
        if self.upstream is not None:
            return proxy_authority(self.upstream)
        if self.row.upstream is not None:
            return f"the proxy {self.row.upstream}"
        return "the proxy"

    @property
    def name(self) -> str:
        return self.row.upstream or (self.upstream.name if self.upstream else "NAME")

    @property
    def socks(self) -> bool:
        return self.upstream is not None and self.upstream.kind is UpstreamKind.SOCKS5

    @property
    def seconds(self) -> str:
        found = _WITHIN.search(self.detail)
        return f"{found.group(1)} s" if found else ""

    def said(self) -> str:
        """The detail, for a sentence that quotes it: without the trailing period."""
        return self.detail.rstrip(".")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _auth_failed(c: _Context) -> str:
    code = "" if c.socks else " (407)"
    user = c.username
    if "closed the connection after each 407" in c.detail:
        return (
            f"{c.proxy} closed the connection after each 407, so the login could not finish "
            f"(it needs the connection kept open). Choose Basic in Credentials, or ask the "
            f"proxy's administrators."
        )
    if "rejected the credentials" in c.detail:
        if user is None:
            return f"{c.proxy} refused the login{code}. {_CREDENTIALS}"
        again = ""
        if "not sent again" in c.detail or "not tried again" in c.detail:
            again = (
                " The relay holds it back: it tries it once more every few minutes, and at"
                " once when you enter it again."
            )
        return f"{c.proxy} refused the password for {user}{code}.{again} {_CREDENTIALS}"
    found = _PROXY_SAYS.search(c.detail)
    why = found.group(1) if found else c.said()
    if user is None or "no password is set up" in why:
        whose = f" for {user}" if user is not None else ""
        return (
            f"{c.proxy} asks for a user name and password{code}, and none{whose} is set up. "
            f"Open Credentials to enter them."
        )
    return f"{c.proxy} asks for a login the relay cannot give{code}: {why}. {_CREDENTIALS}"


def _refused(c: _Context) -> str:
    dest = c.row.destination
    found = _ANSWERED.search(c.detail)
    status = int(found.group(1)) if found else None
    phrase = found.group(2).strip() if found else ""
    forbidden = status == 2 if c.socks else status == 403
    if forbidden:
        code = f"SOCKS5 reply {status}" if c.socks else f"{status}"
        return (
            f"{dest}: the proxy forbids this destination ({code}). "
            f"Only the proxy's administrators can allow it."
        )
    if status is None:
        return f"{c.proxy} refused the connection to {dest}: {c.said()}."
    what = f"SOCKS5 reply {status}" if c.socks else f"{status}"
    if phrase:
        what = f"{what} {phrase}"
    return f"{c.proxy} could not reach {dest} ({what}). If every destination fails, {_lower(_TEST)}"


def _timeout(c: _Context) -> str:
    limit = c.seconds
    within = f" within {limit}" if limit else " in time"
    if "did not complete the handshake" in c.detail:
        return f"No answer from {c.proxy}{within}. {_TEST}"
    if c.detail.startswith("connecting to"):
        return (
            f"{c.proxy} did not accept the connection{within}. Check your network; {_lower(_TEST)}"
        )
    resolving = _RESOLVING.search(c.detail)
    if resolving:
        over = f" over {limit}" if limit else " too long"
        return (
            f"Looking up the proxy's name {resolving.group(1)} took{over}. "
            f"Check your network and DNS."
        )
    if "NTLM/Negotiate step" in c.detail:
        return (
            f"The login to {c.proxy} did not finish{within} (with Kerberos: is the domain "
            f"controller reachable?). {_TEST}"
        )
    if "to check the credentials" in c.detail:
        user = f" of {c.username}" if c.username else ""
        waited = f" {limit}" if limit else ""
        return f"Waited{waited} for {c.proxy} to check the password{user}, in vain. {_TEST}"
    return f"No answer from {c.proxy}{within}. {_TEST}"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _unreachable(c: _Context) -> str:
    resolve = _CANNOT_RESOLVE.search(c.detail)
    if resolve:
        return (
            f"The proxy's name {resolve.group(1)} could not be looked up ({resolve.group(2)}). "
            f"Check the proxy's address in Credentials and your network."
        )
    found = _CANNOT_CONNECT.search(c.detail)
    why = found.group(2) if found else c.said()
    if "refused" in why.lower():
        return (
            f"{c.proxy} refused the connection: nothing listens there. "
            f"Check the proxy's address and port in Credentials."
        )
    return f"Cannot reach {c.proxy} ({why}). Check your network; {_lower(_TEST)}"


def _protocol_error(c: _Context) -> str:
    found = _BAD_ANSWER.search(c.detail)
    kind = "a SOCKS5 proxy" if c.socks else "an HTTP proxy"
    if found:
        return (
            f"{c.proxy} sent an answer the relay cannot read ({found.group(1).rstrip('.')}). "
            f"Check in Credentials that it is {kind} and the port is right."
        )
    return f"{_capital(c.said())}. Check in Credentials that {c.proxy} is {kind}."


def _upstream_reset(c: _Context) -> str:
    dest = c.row.destination
    dropped = _DROPPED.search(c.detail)
    if dropped:
        return (
            f"{c.proxy} dropped the connection to {dest} before the tunnel opened "
            f"({dropped.group(1)}). If it keeps happening, {_lower(_TEST)}"
        )
    side = _SIDE.search(c.detail)
    why = side.group(1) if side else c.said()
    if "while forwarding the first bytes" in c.detail:
        return (
            f"The proxy's side of the connection to {dest} failed as the first bytes went out "
            f"({why}). The program may retry; nothing to fix unless it keeps happening."
        )
    return (
        f"The connection to {dest} was cut on the proxy's side ({why}). "
        f"The program may retry; nothing to fix unless it keeps happening."
    )


def _client_reset(c: _Context) -> str:
    side = _SIDE.search(c.detail)
    why = side.group(1) if side else c.said()
    return (
        f"The program reset its connection to {c.row.destination} ({why}). "
        f"Usually it gave up or was stopped; nothing to fix here."
    )


def _not_redirected(c: _Context) -> str:
    ip = c.row.client[0]
    return (
        f"A program at {ip} connected to the relay's port directly, not through the redirect, "
        f"so the relay closed it. Programs need no proxy setting: remove one that points at "
        f"the relay."
    )


def _no_original_dst(c: _Context) -> str:
    return (
        f"The relay could not tell where a connection from {c.row.client[0]} was going "
        f"(no redirect record): it was made to the relay's port directly. Programs need no "
        f"proxy setting: remove one that points at the relay."
    )


def _no_upstream(c: _Context) -> str:
    return (
        f"No proxy is set up, so {c.row.destination} could not be reached. "
        f"Open Credentials to add one."
    )


def _loop(c: _Context) -> str:
    return (
        f"The redirect caught the relay's own connection to {c.proxy} (its address changed). "
        f"Switch off and on again to exclude the new address."
    )


def _blocked(c: _Context) -> str:
    # The detail names what decided: "blocked by rule[2] (ads.example -> block)" or a PAC answer.
    what = c.detail.removeprefix("blocked by ").strip() or "a rule"
    host = c.row.host or c.row.destination
    return (
        f"Blocked by tray-proxy's settings ({what}): the connection to {host} was reset at "
        f"once. To let it through, change that [[rule]] in the settings file "
        f"(`tray-proxy rules test {host}` shows which rule decides)."
    )


def _config_error(c: _Context) -> str:
    found = _CANNOT_BE_USED.search(c.detail)
    why = found.group(1).rstrip(".") if found else c.said()
    return f"The proxy {c.name} cannot be used as set up: {why}. {_CREDENTIALS}"


def _internal(c: _Context) -> str:
    found = _OUT_OF.search(c.detail)
    if found:
        return (
            f"The relay ran out of resources ({found.group(1)}) and dropped the connection to "
            f"{c.row.destination}. Close some programs or connections; if it keeps happening, "
            f"raise the open-files limit."
        )
    what = f" ({c.said()})" if c.detail else ""
    return (
        f"The relay hit an internal error{what} on the connection to {c.row.destination}. "
        f"Please report it with Copy diagnostics."
    )


def _done(c: _Context) -> str:
    """A normal end: words only for a program that sent nothing at all."""
    row = c.row
    if row.bytes_up or row.bytes_down:
        return ""
    port = row.original_dst[1] if row.original_dst is not None else None
    what = {443: "no TLS ClientHello", 80: "no HTTP request"}.get(port or 0, "no data")
    duration = row.duration
    if duration is not None and duration >= 1.0:
        what = f"{what} within {math.floor(duration)} s"
    return f"The program closed the connection before sending anything ({what})."


_SPEAKERS: dict[CloseReason, Callable[[_Context], str]] = {
    CloseReason.UPSTREAM_AUTH_FAILED: _auth_failed,
    CloseReason.UPSTREAM_REFUSED: _refused,
    CloseReason.UPSTREAM_TIMEOUT: _timeout,
    CloseReason.UPSTREAM_UNREACHABLE: _unreachable,
    CloseReason.UPSTREAM_PROTOCOL_ERROR: _protocol_error,
    CloseReason.UPSTREAM_RESET: _upstream_reset,
    CloseReason.CLIENT_RESET: _client_reset,
    CloseReason.NOT_REDIRECTED: _not_redirected,
    CloseReason.NO_ORIGINAL_DST: _no_original_dst,
    CloseReason.NO_UPSTREAM: _no_upstream,
    CloseReason.LOOP: _loop,
    CloseReason.BLOCKED: _blocked,
    CloseReason.CONFIG_ERROR: _config_error,
    CloseReason.INTERNAL_ERROR: _internal,
    CloseReason.DONE: _done,
}
