"""Parse ``Proxy-Authenticate`` headers into challenges (RFC 9110 section 11.6.1 and 11.2).

A proxy may send several headers, and one header may hold several challenges separated by
commas, which also separate the parameters of one challenge and may appear inside quoted
strings::

    Proxy-Authenticate: Negotiate, NTLM
    Proxy-Authenticate: Digest realm="corp, west", qop="auth,auth-int", nonce="abc", Basic realm=x

Every header of a 407 is read; malformed input raises ``ProtocolError`` quoting little of it.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import ProtocolError, peer_excerpt

__all__ = ["MAX_CHALLENGES", "Challenge", "parse_challenges"]

# A real proxy offers a handful; a cap keeps a hostile header list cheap to walk.
MAX_CHALLENGES = 64

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = frozenset("-._~+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WS = " \t"


@dataclass(frozen=True)
class Challenge:
    """One challenge: the scheme in lower case, and either a token68 or named parameters.

    Parameter names are lower case (they are case-insensitive); values are unquoted.
    """

    scheme: str
    token68: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        # A token68 may be an NTLM/Negotiate blob: long and of no use in a log line.
        token = f" token68[{len(self.token68)}]" if self.token68 is not None else ""
        names = f" {sorted(self.params)}" if self.params else ""
        return f"<Challenge {self.scheme}{token}{names}>"


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """All challenges of the given ``Proxy-Authenticate`` header values, in order."""
    found: list[Challenge] = []
    for value in values:
        _Scanner(value, found).run()
    return found


class _Scanner:
    def __init__(self, text: str, out: list[Challenge]) -> None:
        self.text = text
        self.pos = 0
        self.out = out

    def fail(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"proxy sent a malformed Proxy-Authenticate header ({what}): {peer_excerpt(self.text)}"
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek() and self.peek() in _WS:
            self.pos += 1

    def skip_separators(self) -> None:
        # RFC 9110 section 5.6.1: empty list elements are allowed and ignored.
        while self.peek() and self.peek() in _WS + ",":
            self.pos += 1

    def token(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in _TCHAR:
            self.pos += 1
        return self.text[start : self.pos]

    def run(self) -> None:
        self.skip_separators()
        while self.pos < len(self.text):
            self.challenge()
            self.skip_separators()

    def challenge(self) -> None:
        scheme = self.token()
        if not scheme:
            raise self.fail("expected an authentication scheme")
        if len(self.out) >= MAX_CHALLENGES:
            raise self.fail(f"more than {MAX_CHALLENGES} challenges")
        if not self.peek() or self.peek() == ",":
            self.out.append(Challenge(scheme.lower()))
            return
        if self.peek() not in _WS:
            raise self.fail("expected a space after the scheme")
        self.skip_ws()
        if not self.peek() or self.peek() == ",":
            self.out.append(Challenge(scheme.lower()))
            return
        token68 = self.try_token68()
        if token68 is not None:
            self.out.append(Challenge(scheme.lower(), token68=token68))
            return
        params: dict[str, str] = {}
        while True:
            name, value = self.param()
            if name in params:
                # RFC 9110 section 11.2: each parameter name occurs once per challenge; two
                # realms or nonces would leave us guessing which one the proxy means.
                raise self.fail(f"parameter {peer_excerpt(name, 20)} appears twice")
            params[name] = value
            self.skip_ws()
            if not self.peek():
                break
            if self.peek() != ",":
                raise self.fail("expected ',' between parameters")
            mark = self.pos
            self.skip_separators()
            if not self.peek() or not self.param_follows():
                self.pos = mark
                break
        self.out.append(Challenge(scheme.lower(), params=params))

    def try_token68(self) -> str | None:
        """A token68 here (followed by the end or a comma), else None and nothing consumed."""
        start = self.pos
        while self.peek() and self.peek() in _TOKEN68:
            self.pos += 1
        if self.pos == start:
            return None
        while self.peek() == "=":
            self.pos += 1
        end = self.pos
        self.skip_ws()
        if self.peek() in ("", ","):
            return self.text[start:end]
        self.pos = start
        return None

    def param_follows(self) -> bool:
        """Does `name BWS =` start here (a parameter) rather than a new challenge's scheme?"""
        mark = self.pos
        name = self.token()
        self.skip_ws()
        follows = bool(name) and self.peek() == "="
        self.pos = mark
        return follows

    def param(self) -> tuple[str, str]:
        name = self.token()
        if not name:
            raise self.fail("expected a parameter name")
        self.skip_ws()
        if self.peek() != "=":
            raise self.fail("expected '=' after a parameter name")
        self.pos += 1
        self.skip_ws()
        if self.peek() == '"':
            return name.lower(), self.quoted()
        value = self.token()
        if not value:
            raise self.fail("expected a parameter value")
        return name.lower(), value

    def quoted(self) -> str:
        # RFC 9110 section 5.6.4: quoted-string with backslash quoted-pairs.
        self.pos += 1
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\":
                char = self.peek()
                if not char:
                    raise self.fail("unterminated quoted string")
                self.pos += 1
            if char != "\t" and (ord(char) < 0x20 or ord(char) == 0x7F):
                raise self.fail("control character in a quoted string")
            out.append(char)
