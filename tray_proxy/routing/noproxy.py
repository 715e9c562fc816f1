"""NO_PROXY (and Windows' ProxyOverride) as routing patterns for a DIRECT rule.

Items are separated by commas, semicolons (ProxyOverride) or white space:

- `*`                       everything
- `corp.example`            that name and every name under it (what curl, wget, pip and Go do)
- `.corp.example`           the same
- `*.corp.example`          names under it only (ProxyOverride's wildcard)
- `<local>`                 names without a dot (ProxyOverride)
- `10.1.2.3`, `::1`, `[::1]`, `10.0.0.0/8`   an address or network
- `10.*`, `192.168.*`       ProxyOverride's address wildcards, as networks (/8, /16, /24)
- any of them with `:PORT`  only that port

Other wildcards (`*corp*`) have no pattern; they are skipped and reported, never guessed.

Must not import PySide6, asyncio or the relay engine.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tray_proxy.routing.rules import Pattern, PatternError, PatternKind, parse_pattern

__all__ = ["NoProxyImport", "format_no_proxy", "parse_no_proxy"]

_SEPARATORS = re.compile(r"[,;\s]+")
_OCTETS = re.compile(r"((?:\d{1,3}\.){1,3})\*")


@dataclass(frozen=True, slots=True)
class NoProxyImport:
    """The patterns (in order, without duplicates) and the items skipped, with why."""

    patterns: tuple[Pattern, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def parse_no_proxy(text: str) -> NoProxyImport:
    patterns: list[Pattern] = []
    skipped: list[tuple[str, str]] = []
    for item in _SEPARATORS.split(text):
        if not item:
            continue
        try:
            pattern = _item(item)
        except PatternError as exc:
            skipped.append((item, str(exc)))
            continue
        if pattern not in patterns:
            patterns.append(pattern)
    return NoProxyImport(tuple(patterns), tuple(skipped))


def _item(item: str) -> Pattern:
    body, port = _split_port(item)
    wildcard = _OCTETS.fullmatch(body)
    if wildcard is not None:
        octets = wildcard.group(1).rstrip(".").split(".")
        if all(int(o) <= 255 for o in octets):
            bits = 8 * len(octets)
            address = ".".join(octets + ["0"] * (4 - len(octets)))
            net = ipaddress.IPv4Network(f"{address}/{bits}")
            return Pattern(PatternKind.NETWORK, network=net, port=port)
        raise PatternError(f"is not an address wildcard like 10.* : {item!r}")
    if "*" in body and body != "*" and not body.startswith("*.") or body.count("*") > 1:
        raise PatternError(f"wildcards other than a leading *. have no rule pattern: {item!r}")
    pattern = parse_pattern(body)
    if pattern.kind is PatternKind.EXACT:
        # A bare name in NO_PROXY covers the names under it too.
        pattern = Pattern(PatternKind.DOMAIN, name=pattern.name)
    if port is not None:
        pattern = Pattern(pattern.kind, pattern.name, pattern.network, port)
    return pattern


def _split_port(item: str) -> tuple[str, int | None]:
    """`host:port` and `[v6]:port` apart; a bare IPv6 address keeps its colons."""
    if item.startswith("["):
        inner, bracket, rest = item[1:].partition("]")
        if bracket and rest.startswith(":") and rest[1:].isdigit():
            return inner, _port(rest[1:], item)
        if bracket and not rest:
            return inner, None
        raise PatternError(f'has "[" without a matching "]" or port: {item!r}')
    if item.count(":") == 1 and not item.startswith(":"):
        body, _, port_text = item.partition(":")
        return body, _port(port_text, item)
    return item, None


def _port(text: str, item: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise PatternError(f"the port must be a number 1-65535, got {item!r}")
    return int(text)


def format_no_proxy(patterns: tuple[Pattern, ...]) -> str:
    """Patterns back as a NO_PROXY string (a DOMAIN as `.name`)."""
    return ",".join(p.text for p in patterns)
