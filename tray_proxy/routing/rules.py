"""Match patterns and the ordered rule table: which rule, if any, applies to a connection.

A rule's `match` is a list of patterns; any one matching is enough, and the first rule with a
match wins. A pattern is one of:

- `host.example`     exactly that name
- `.corp.example`    that name and every name under it (as NO_PROXY writes it)
- `*.corp.example`   only names under it, not `corp.example` itself
- `*`                everything
- `<local>`          a name without a dot (Windows' ProxyOverride "bypass local names")
- `10.0.0.0/8`, `fd00::/8`, `192.0.2.7`, `2001:db8::1`   destination address in that network
- `:8443`            destination port
- any of the above but `:PORT` followed by `:PORT` (IPv6 in brackets: `[fd00::/8]:443`):
  both must match

Names compare case-insensitively, IDNA-normalised (`bücher.example` is `xn--bcher-kva.example`),
a trailing dot ignored. A name pattern needs the connection's name (SNI on 443, `Host:` on 80);
when none is known (no SNI, HTTP/1.0 without Host), only address, port and `*` patterns can
match. An address pattern matches the connection's destination address, and also a name that
is an address literal.

Must not import PySide6, asyncio, socket or the relay engine.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Action",
    "MatchTable",
    "Pattern",
    "PatternError",
    "PatternKind",
    "canonical_host",
    "normalise_host",
    "parse_pattern",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class Action(enum.Enum):
    """What a rule does; PROXY rules name their upstream separately."""

    PROXY = "proxy"
    DIRECT = "direct"
    BLOCK = "block"


class PatternError(ValueError):
    """A pattern that cannot be used; `str()` says what is wrong and what is expected."""


class PatternKind(enum.Enum):
    EXACT = "exact"  # host.example
    DOMAIN = "domain"  # .corp.example: itself and below
    SUBDOMAIN = "subdomain"  # *.corp.example: below only
    ANY = "any"  # *
    LOCAL = "local"  # <local>: a name without a dot
    NETWORK = "network"  # an address or CIDR
    PORT = "port"  # :PORT alone


@dataclass(frozen=True, slots=True)
class Pattern:
    """One parsed pattern. `name` holds the normalised name (EXACT, DOMAIN, SUBDOMAIN),
    `network` the network (NETWORK), `port` the port (PORT, or any kind with `:PORT`)."""

    kind: PatternKind
    name: str = ""
    network: IPNetwork | None = None
    port: int | None = None

    @property
    def text(self) -> str:
        """The pattern as written in the settings, normalised (parses back to itself)."""
        if self.kind is PatternKind.PORT:
            return f":{self.port}"
        if self.kind is PatternKind.NETWORK:
            assert self.network is not None
            net = self.network
            full = net.prefixlen == net.max_prefixlen
            body = str(net.network_address) if full else str(net)
            if self.port is not None and net.version == 6:
                body = f"[{body}]"
        else:
            body = {
                PatternKind.EXACT: self.name,
                PatternKind.DOMAIN: "." + self.name,
                PatternKind.SUBDOMAIN: "*." + self.name,
                PatternKind.ANY: "*",
                PatternKind.LOCAL: "<local>",
            }[self.kind]
        return body if self.port is None else f"{body}:{self.port}"


def normalise_host(name: str) -> str | None:
    """`name` lowercased, IDNA-encoded, without its trailing dot; None when it is not a name
    (empty, an empty label, a label over 63 characters, characters no host name has)."""
    if name.endswith("."):
        name = name[:-1]
    if not name:
        return None
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return None
    if len(name) > 253:
        return None
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return None
    return name


def canonical_host(name: str) -> str | None:
    """A connection's name as the rules compare it: an address literal in its canonical form
    (`[2001:DB8::1]` is `2001:db8::1`), else `normalise_host`; None when it is neither."""
    literal = _literal(name) if name else None
    if literal is not None:
        return str(literal)
    return normalise_host(name)


def _port(text: str, whole: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise PatternError(f"the port must be a number 1-65535, got {whole!r}")
    return int(text)


def _network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def parse_pattern(text: str) -> Pattern:
    """One pattern from its text (see the module docstring); PatternError otherwise."""
    whole = text
    text = text.strip()
    if not text:
        raise PatternError("must not be empty")
    port: int | None = None
    if text.startswith(":") and text.count(":") == 1:
        return Pattern(PatternKind.PORT, port=_port(text[1:], whole))
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise PatternError(f'has "[" without "]": {whole!r}')
        if rest:
            if not rest.startswith(":"):
                raise PatternError(f'only ":PORT" may follow "]": {whole!r}')
            port = _port(rest[1:], whole)
        net = _network(inner)
        if net is None or net.version != 6:
            raise PatternError(f"only an IPv6 address or network goes in [...]: {whole!r}")
        return Pattern(PatternKind.NETWORK, network=net, port=port)
    if text.count(":") >= 2:
        net = _network(text)
        if net is None:
            raise PatternError(
                f"is not an IPv6 address or network (with a port, write [2001:db8::1]:443): "
                f"{whole!r}"
            )
        return Pattern(PatternKind.NETWORK, network=net)
    body, colon, port_text = text.partition(":")
    if colon:
        port = _port(port_text, whole)
    if body == "*":
        return Pattern(PatternKind.ANY, port=port)
    if body.lower() == "<local>":
        return Pattern(PatternKind.LOCAL, port=port)
    if "/" in body or re.fullmatch(r"[0-9.]+", body):
        net = _network(body)
        if net is None or net.version != 4:
            raise PatternError(f"is not an IPv4 address or network like 10.0.0.0/8: {whole!r}")
        return Pattern(PatternKind.NETWORK, network=net, port=port)
    kind = PatternKind.EXACT
    if body.startswith("*."):
        kind, body = PatternKind.SUBDOMAIN, body[2:]
    elif body.startswith("."):
        kind, body = PatternKind.DOMAIN, body[1:]
    name = normalise_host(body)
    # All digits after IDNA ("²" is "2"): an address typo, not a name.
    if name is None or "*" in body or re.fullmatch(r"[0-9.]+", name):
        raise PatternError(
            "must be a host name (host.example, .suffix, *.suffix), an address or network, "
            f"a :PORT, * or <local>; got {whole!r}"
        )
    return Pattern(kind, name=name, port=port)


class MatchTable:
    """The patterns of an ordered rule list, indexed so that finding the first matching rule
    costs a few dict lookups per label of the name plus a scan of the address patterns,
    whatever the number of name rules.

    `patterns[i]` are rule i's patterns; `first_match` returns the lowest i that matches.
    """

    __slots__ = ("_any", "_domain", "_exact", "_local", "_networks", "_ported", "_ports", "_sub")

    def __init__(self, patterns: Sequence[Sequence[Pattern]]) -> None:
        self._exact: dict[str, int] = {}
        self._domain: dict[str, int] = {}
        self._sub: dict[str, int] = {}
        self._ports: dict[int, int] = {}
        self._any: int | None = None
        self._local: int | None = None
        # Address rules by (IP version, prefix length): {network bits: first rule}. A lookup
        # costs one dict probe per prefix length in use, whatever the number of networks.
        self._networks: dict[tuple[int, int], dict[int, int]] = {}
        # Patterns with a :PORT besides their host/address part: rare, scanned in order.
        self._ported: list[tuple[int, Pattern]] = []
        for index, rule in enumerate(patterns):
            for p in rule:
                self._add(index, p)

    def _add(self, index: int, p: Pattern) -> None:
        if p.kind is PatternKind.PORT:
            assert p.port is not None
            self._ports.setdefault(p.port, index)
        elif p.port is not None:
            self._ported.append((index, p))
        elif p.kind is PatternKind.NETWORK:
            assert p.network is not None
            net = p.network
            shift = net.max_prefixlen - net.prefixlen
            by_bits = self._networks.setdefault((net.version, shift), {})
            by_bits.setdefault(int(net.network_address) >> shift, index)
        elif p.kind is PatternKind.ANY:
            if self._any is None:
                self._any = index
        elif p.kind is PatternKind.LOCAL:
            if self._local is None:
                self._local = index
        else:
            table = {
                PatternKind.EXACT: self._exact,
                PatternKind.DOMAIN: self._domain,
                PatternKind.SUBDOMAIN: self._sub,
            }[p.kind]
            table.setdefault(p.name, index)

    def first_match(self, host: str | None, ip: IPAddress | None, port: int) -> int | None:
        """The index of the first rule matching a connection to `host` (normalised, or None
        when no name is known), address `ip` (None when unknown) and `port`."""
        best: int | None = None
        addresses: list[IPAddress] = []
        if ip is not None:
            addresses.append(ip)
        if host is not None:
            literal = _literal(host)
            if literal is not None:
                addresses.append(literal)
            else:
                best = self._name_match(host)
        if self._any is not None and (best is None or self._any < best):
            best = self._any
        hit = self._ports.get(port)
        if hit is not None and (best is None or hit < best):
            best = hit
        if self._networks:
            for a in addresses:
                value = int(a)
                for (version, shift), by_bits in self._networks.items():
                    if version == a.version:
                        hit = by_bits.get(value >> shift)
                        if hit is not None and (best is None or hit < best):
                            best = hit
        for index, p in self._ported:
            if best is not None and index >= best:
                break
            if p.port == port and _matches(p, host, addresses):
                best = index
                break
        return best

    def _name_match(self, host: str) -> int | None:
        best = self._exact.get(host)
        if self._local is not None and "." not in host and (best is None or self._local < best):
            best = self._local
        if not self._domain and not self._sub:
            return best
        hit = self._domain.get(host)
        if hit is not None and (best is None or hit < best):
            best = hit
        # Each proper suffix of the name, at label boundaries: a.b.c -> b.c, c.
        dot = host.find(".")
        while dot != -1:
            suffix = host[dot + 1 :]
            for table in (self._domain, self._sub):
                hit = table.get(suffix)
                if hit is not None and (best is None or hit < best):
                    best = hit
            dot = host.find(".", dot + 1)
        return best


def _literal(host: str) -> IPAddress | None:
    # Cheap test first: most names start with a letter and are no address.
    if not (host[0].isdigit() or ":" in host):
        return None
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _matches(p: Pattern, host: str | None, addresses: Sequence[IPAddress]) -> bool:
    """Whether the host/address part of a ported pattern matches (its port already did)."""
    if p.kind is PatternKind.ANY:
        return True
    if p.kind is PatternKind.NETWORK:
        net = p.network
        assert net is not None
        return any(a.version == net.version and a in net for a in addresses)
    if host is None or _literal(host) is not None:
        return False
    if p.kind is PatternKind.LOCAL:
        return "." not in host
    if p.kind is PatternKind.EXACT:
        return host == p.name
    if p.kind is PatternKind.DOMAIN and host == p.name:
        return True
    return host.endswith("." + p.name)
