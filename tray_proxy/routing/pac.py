"""PAC results as data: parse what `FindProxyForURL` returned, map it to upstreams, and the
per-host cache and refetch schedule. Pure: no JavaScript, no I/O, time passed in.

What the relay asks the PAC script: the URL `https://HOST/` for port 443 (the path is
encrypted), the request's URL for port 80 (`http://HOST[:PORT]/path`), and HOST. Results are
cached per (host, port) for `ttl` seconds, so a script that routes on the path of plain-HTTP
URLs is honoured for the first request to a host only (documented in docs/routing.md).

Mapping: `PROXY h:p` (and `HTTP h:p`) is the configured HTTP upstream at that host and port,
`SOCKS h:p` / `SOCKS5 h:p` the configured SOCKS5 one (host compared case-insensitively, no
DNS). A proxy the settings do not have becomes an ad-hoc upstream named `pac-HOST-PORT` with
the user name and keyring entry of a configured upstream on the same host (same host, same
login), else no login. `HTTPS h:p` (TLS to the proxy) and `SOCKS4` are not supported and are
skipped, as are entries that do not parse; a result with nothing usable left is a failure.

Must not import PySide6, asyncio, socket, pypac or the relay engine.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy

__all__ = [
    "PacCache",
    "PacChoice",
    "PacChoiceKind",
    "PacFailure",
    "PacRoute",
    "PacSchedule",
    "map_choices",
    "pac_url_for",
    "parse_pac_result",
]

_MAX_RESULT = 4096
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class PacChoiceKind(enum.Enum):
    DIRECT = "DIRECT"
    PROXY = "PROXY"  # HTTP CONNECT (PAC's PROXY and Chrome's HTTP)
    HTTPS = "HTTPS"  # HTTP CONNECT over TLS to the proxy: not supported
    SOCKS4 = "SOCKS4"  # not supported
    SOCKS5 = "SOCKS5"  # PAC's SOCKS and SOCKS5


_KEYWORDS = {
    "DIRECT": PacChoiceKind.DIRECT,
    "PROXY": PacChoiceKind.PROXY,
    "HTTP": PacChoiceKind.PROXY,
    "HTTPS": PacChoiceKind.HTTPS,
    "SOCKS": PacChoiceKind.SOCKS5,
    "SOCKS5": PacChoiceKind.SOCKS5,
    "SOCKS4": PacChoiceKind.SOCKS4,
}


@dataclass(frozen=True, slots=True)
class PacChoice:
    kind: PacChoiceKind
    host: str = ""
    port: int = 0

    @property
    def text(self) -> str:
        if self.kind is PacChoiceKind.DIRECT:
            return "DIRECT"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind.value} {host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PacFailure:
    """The PAC script could not decide: not fetched, does not parse, threw, ran too long, or
    returned nothing usable. `words` is for the user (an event, the log), never a secret."""

    words: str


@dataclass(frozen=True, slots=True)
class PacRoute:
    """A PAC result mapped to upstreams: try `upstreams` in order, then DIRECT when
    `then_direct`; `direct_first` when DIRECT came before any usable proxy."""

    upstreams: tuple[str, ...]
    then_direct: bool
    adhoc: tuple[tuple[UpstreamProxy, str | None], ...] = ()  # (upstream, credentials of)

    @property
    def direct_first(self) -> bool:
        return not self.upstreams and self.then_direct


def pac_url_for(host: str, port: int, url: str | None) -> str:
    """The URL handed to FindProxyForURL: the request's own URL on plain HTTP when known,
    else `https://host/` (443) or a URL built from the host and port."""
    if url is not None:
        return url
    shown = f"[{host}]" if ":" in host else host
    if port == 443:
        return f"https://{shown}/"
    if port == 80:
        return f"http://{shown}/"
    return f"https://{shown}:{port}/"


def parse_pac_result(text: object) -> tuple[PacChoice, ...] | PacFailure:
    """`"PROXY a:3128; SOCKS b:1080; DIRECT"` as choices in order; unknown or malformed
    entries are left out. A failure when the value is not a string or holds no entry."""
    if not isinstance(text, str):
        return PacFailure(f"FindProxyForURL returned {type(text).__name__}, not a string")
    if len(text) > _MAX_RESULT:
        return PacFailure(f"FindProxyForURL returned {len(text)} characters; too long")
    choices: list[PacChoice] = []
    for entry in text.split(";"):
        parts = entry.split()
        if not parts:
            continue
        kind = _KEYWORDS.get(parts[0].upper())
        if kind is PacChoiceKind.DIRECT and len(parts) == 1:
            choices.append(PacChoice(kind))
        elif kind is not None and kind is not PacChoiceKind.DIRECT and len(parts) == 2:
            address = _host_port(parts[1])
            if address is not None:
                choices.append(PacChoice(kind, *address))
    if not choices:
        return PacFailure(f"FindProxyForURL returned no usable entry: {text[:80]!r}")
    return tuple(choices)


def _host_port(text: str) -> tuple[str, int] | None:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            return None
    if not host or not port_text.isascii() or not port_text.isdigit():
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    return host.lower().rstrip("."), port


def map_choices(
    choices: Sequence[PacChoice], upstreams: Sequence[UpstreamProxy]
) -> PacRoute | PacFailure:
    """Choices as upstream names (configured or ad-hoc) up to the first DIRECT."""
    by_address = {(u.kind, u.host.lower().rstrip("."), u.port): u for u in upstreams}
    by_host: dict[str, UpstreamProxy] = {}
    for u in upstreams:
        by_host.setdefault(u.host.lower().rstrip("."), u)
    names: list[str] = []
    adhoc: list[tuple[UpstreamProxy, str | None]] = []
    skipped: list[str] = []
    for choice in choices:
        if choice.kind is PacChoiceKind.DIRECT:
            return PacRoute(tuple(names), True, tuple(adhoc))
        if choice.kind is PacChoiceKind.PROXY:
            kind = UpstreamKind.HTTP
        elif choice.kind is PacChoiceKind.SOCKS5:
            kind = UpstreamKind.SOCKS5
        else:
            skipped.append(choice.text)
            continue
        known = by_address.get((kind, choice.host, choice.port))
        if known is not None:
            name = known.name
        else:
            same_host = by_host.get(choice.host)
            name = _NAME_SAFE.sub("_", f"pac-{choice.host}-{choice.port}")[:64]
            upstream = UpstreamProxy(
                name=name,
                kind=kind,
                host=choice.host,
                port=choice.port,
                username=same_host.username if same_host is not None else None,
                auth=same_host.auth if same_host is not None else AuthScheme.AUTO,
            )
            adhoc.append((upstream, same_host.name if same_host is not None else None))
        if name not in names:
            names.append(name)
    if not names:
        return PacFailure(f"no supported proxy in the PAC result (skipped {', '.join(skipped)})")
    return PacRoute(tuple(names), False, tuple(adhoc))


class PacCache:
    """Mapped PAC results per (host, port), each kept `ttl` seconds, at most `size` entries
    (the whole cache is dropped when full: simpler than LRU and rare at this size)."""

    def __init__(self, ttl: float = 300.0, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[tuple[str, int], tuple[float, PacRoute | PacFailure]] = {}

    def get(self, host: str, port: int, now: float) -> PacRoute | PacFailure | None:
        entry = self.entry(host, port, now)
        return None if entry is None else entry[1]

    def entry(self, host: str, port: int, now: float) -> tuple[float, PacRoute | PacFailure] | None:
        """(when it expires, the answer), or None when there is none still valid."""
        entry = self._entries.get((host, port))
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[(host, port)]
            return None
        return entry

    def put(
        self,
        host: str,
        port: int,
        value: PacRoute | PacFailure,
        now: float,
        ttl: float | None = None,
    ) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[(host, port)] = (now + (self.ttl if ttl is None else ttl), value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class PacSchedule:
    """When to check the PAC source again: every `interval` seconds after a check that worked,
    sooner (`retry`, doubling up to `interval`) after a failed one. The caller's timer asks
    `due(now)` and reports each check with `checked(now, ok)`."""

    interval: float = 600.0
    retry: float = 30.0
    next_check: float = 0.0
    _failures: int = 0

    def due(self, now: float) -> bool:
        return now >= self.next_check

    def checked(self, now: float, ok: bool) -> None:
        if ok:
            self._failures = 0
            self.next_check = now + self.interval
        else:
            delay = min(self.interval, self.retry * 2.0**self._failures)
            self._failures += 1
            self.next_check = now + delay
