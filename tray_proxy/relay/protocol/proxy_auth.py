"""Which ``Proxy-Authorization`` to send on each CONNECT of one tunnel, sans-IO.

``ProxyAuth`` is asked for the header of the first request (``first()``), and after each 407
for the next one (``challenged()``). It reads every challenge of the 407, picks the strongest
scheme we can answer (Negotiate > NTLM > Digest > Basic) unless the upstream pins one, runs
the multi-leg NTLM/Negotiate exchange through an injected ``TokenContext``, and tells a
proxy that refused our credentials (``ProxyRejectedCredentials``) from one that merely wants
another leg, a fresh Digest nonce (``stale=true``) or another scheme. It keeps no socket: the
driver in relay/upstream.py sends, reads and reconnects.

A remembered scheme (``AuthMemo``, one per upstream) lets later tunnels answer at once: Basic
preemptively once the proxy has asked for Basic, Digest with the last nonce and the next
count, NTLM/Negotiate starting with their first token.

Must not import asyncio, socket, selectors, ssl or PySide6. The password passes through here
and must never reach an exception message, a repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .auth import basic_proxy_authorization
from .challenge import Challenge, parse_challenges
from .digest import DigestChallenge, DigestSession, digest_authorization
from .errors import HandshakeRefused, ProtocolError, UsageError

__all__ = [
    "CONNECTION_BOUND",
    "MAX_CHALLENGE_ROUNDS",
    "SCHEMES",
    "AuthMemo",
    "AuthStep",
    "ProxyRejectedCredentials",
    "MechanismUnavailable",
    "ProxyAuth",
    "TokenContext",
    "TokenContextFactory",
]

# Strongest first (RFC 9110 section 11.6.1 leaves the choice to the client).
SCHEMES = ("negotiate", "ntlm", "digest", "basic")
# Schemes whose legs must travel on one connection: the proxy keeps the state per socket.
CONNECTION_BOUND = frozenset({"ntlm", "negotiate"})
# 407 answers one tunnel accepts before giving up. NTLM without a remembered scheme needs
# two (no credentials, then the type 2 challenge); a stale Digest nonce may add one.
MAX_CHALLENGE_ROUNDS = 3

_WIRE_NAME = {"basic": "Basic", "digest": "Digest", "ntlm": "NTLM", "negotiate": "Negotiate"}
_NEEDS_PASSWORD = frozenset({"basic", "digest", "ntlm"})


class TokenContext(Protocol):
    """One NTLM or Negotiate security context (pyspnego's client, behind relay glue).

    ``step(None)`` gives the first token; ``step(token)`` answers the proxy's token and
    returns None when there is nothing more to send. ``step`` raises ``ProtocolError`` when
    the proxy's token is unusable and ``MechanismUnavailable`` when no first token can be made.
    """

    def step(self, token: bytes | None) -> bytes | None: ...


class MechanismUnavailable(Exception):
    """An NTLM/Negotiate context cannot run here (no credentials, no Kerberos ticket)."""


TokenContextFactory = Callable[[str], TokenContext]


class ProxyRejectedCredentials(HandshakeRefused):
    """The proxy answered 407 to a request that carried our credentials: they are wrong.

    The engine stops sending these credentials anywhere (directory accounts lock after a
    few failures) until they change or a re-check finds them accepted, and publishes the
    event relay.events.CredentialsRejected (a different thing: what the UI hears).
    """

    def __init__(self, scheme: str, detail: str) -> None:
        super().__init__(407, "Proxy Authentication Required", auth_failed=True)
        self.scheme = scheme
        self.detail = detail

    def __str__(self) -> str:
        return f"proxy answered 407: {self.detail}"


@dataclass(frozen=True)
class AuthStep:
    """What the next CONNECT carries: a header (or none), its scheme, whether it uses the
    password (the engine lets only one unverified attempt at a time do that)."""

    header: tuple[str, str] | None = None
    scheme: str | None = None
    sends_credentials: bool = False

    def __repr__(self) -> str:
        return f"<AuthStep {self.scheme or 'none'} credentials={self.sends_credentials}>"


class AuthMemo:
    """What worked last time with one upstream; shared by its tunnels. Written on the
    relay loop only; an NTLM/Negotiate step in a worker thread may read it."""

    def __init__(self) -> None:
        self.scheme: str | None = None
        self.digest: DigestSession | None = None

    def forget(self) -> None:
        self.scheme = None
        self.digest = None

    def __repr__(self) -> str:
        return f"<AuthMemo {self.scheme or 'none'}>"


def _offered(challenges: Sequence[Challenge]) -> str:
    names = dict.fromkeys(_WIRE_NAME.get(c.scheme, c.scheme) for c in challenges)
    return ", ".join(names) if names else "no scheme at all"


class ProxyAuth:
    """The authentication side of the CONNECT requests of one tunnel."""

    def __init__(
        self,
        *,
        authority: str,
        username: str | None = None,
        password: str | None = None,
        pinned: str | None = None,
        memo: AuthMemo | None = None,
        contexts: TokenContextFactory | None = None,
        kerberos: bool = False,
        cnonce: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        """`authority` is the CONNECT target (Digest hashes it). `kerberos`: a Kerberos
        ticket can be used, so Negotiate beats NTLM; without one, Negotiate would only wrap
        NTLM, and a proxy offering both gets plain NTLM."""
        if pinned is not None and pinned not in SCHEMES:
            raise UsageError(f"unknown authentication scheme {pinned!r}")
        if (username is None) != (password is None):
            raise UsageError("user name and password must be given together")
        self.authority = authority
        self._username = username
        self._password = password
        self._pinned = pinned
        self._memo = memo if memo is not None else AuthMemo()
        self._contexts = contexts
        self._kerberos = kerberos
        self._cnonce = cnonce
        self._last = AuthStep()
        self._context: TokenContext | None = None
        self._answered_token = False  # we answered a proxy token (NTLM type 3)
        self._digest: DigestSession | None = None
        self._refused: set[str] = set()
        # Why the last NTLM/Negotiate context could not start ("no Kerberos ticket: ..."):
        # fixed words from the glue, shown if no scheme fits.
        self._unavailable: str | None = None
        self.rounds = 0
        self.credentials_sent = False

    def __repr__(self) -> str:
        return f"<ProxyAuth {self.authority} last={self._last!r} rounds={self.rounds}>"

    @property
    def scheme(self) -> str | None:
        """The scheme of the last request (None: it carried no Proxy-Authorization)."""
        return self._last.scheme

    @property
    def _has_password(self) -> bool:
        return self._password is not None

    # -- the driver's calls --------------------------------------------------------------

    def first(self) -> AuthStep:
        """The first request: preemptive only for a scheme pinned or seen before."""
        scheme = self._pinned or self._memo.scheme
        step = AuthStep()
        if scheme == "basic" and self._has_password:
            step = self._basic()
        elif scheme == "digest" and self._has_password and self._memo.digest is not None:
            self._digest = self._memo.digest
            step = self._digest_step()
        elif scheme in CONNECTION_BOUND:
            step = self._start_token(scheme) or AuthStep()
        return self._sent(step)

    def challenged(self, headers: Sequence[tuple[str, str]], *, same_connection: bool) -> AuthStep:
        """The next request after a 407 with these headers (names in any case).

        `same_connection`: the next request goes on the connection that carried the 407.
        Raises ``ProxyRejectedCredentials`` when the proxy refused our credentials,
        ``HandshakeRefused`` (auth_failed) when we cannot answer it, ``ProtocolError`` when
        its challenge is malformed.
        """
        self.rounds += 1
        if self.rounds > MAX_CHALLENGE_ROUNDS:
            raise HandshakeRefused(
                407,
                f"still asked to authenticate after {MAX_CHALLENGE_ROUNDS} rounds",
                auth_failed=True,
            )
        challenges = parse_challenges(v for n, v in headers if n.lower() == "proxy-authenticate")
        last = self._last
        mine = [c for c in challenges if c.scheme == last.scheme]
        if last.scheme in CONNECTION_BOUND:
            token = mine[0].token68 if mine else None
            if token is not None and same_connection:
                return self._sent(self._continue_token(last.scheme, token))
            if token is None and mine and self._answered_token:
                raise ProxyRejectedCredentials(last.scheme, f"{_WIRE_NAME[last.scheme]} failed")
            if token is None and mine:
                # It refused our first token (say, a Kerberos ticket it cannot use): no
                # password was checked, so another scheme may be tried.
                self._refused.add(last.scheme)
        elif last.scheme == "digest":
            fresh = self._best_digest(mine)
            if fresh is not None and fresh.stale:
                # RFC 7616 section 3.3: the password was right, only the nonce expired.
                self._digest = DigestSession(fresh)
                return self._sent(self._digest_step())
            if mine:
                raise ProxyRejectedCredentials("digest", "Digest credentials refused")
        elif last.scheme == "basic" and mine:
            raise ProxyRejectedCredentials("basic", "Basic credentials refused")
        # No credentials sent yet, or the proxy stopped offering what we used: choose anew.
        return self._sent(self._choose(challenges))

    def steps_token(self, headers: Sequence[tuple[str, str]] | None = None) -> bool:
        """Could the next call step an NTLM or Negotiate context? `headers` None: `first()`
        (a pinned or remembered token scheme starts at once) or `restart()` (it repeats
        the last scheme); else `challenged(headers)` (the last request used a token scheme,
        or the proxy offers one). The driver runs such a step off the loop (a Kerberos step
        may ask the KDC); a Basic or Digest step is computation."""
        if self._last.scheme in CONNECTION_BOUND:
            return True
        if headers is None:
            # Before first() nothing was sent and no challenge came; restart() follows one.
            first = self.rounds == 0 and self._last.scheme is None
            return first and (self._pinned or self._memo.scheme) in CONNECTION_BOUND
        try:
            challenges = parse_challenges(
                v for n, v in headers if n.lower() == "proxy-authenticate"
            )
        except ProtocolError:
            return False  # challenged() raises the same error, on the loop
        return any(c.scheme in CONNECTION_BOUND for c in challenges)

    def restart(self) -> AuthStep:
        """The connection ended between two requests: the next one goes on a new connection."""
        scheme = self._last.scheme
        if scheme is None:
            return self._sent(AuthStep())
        if scheme == "basic":
            return self._sent(self._basic())
        if scheme == "digest":
            return self._sent(self._digest_step())
        return self._sent(self._start_token(scheme) or AuthStep())

    def succeeded(self) -> None:
        """The tunnel opened: remember the scheme for this upstream's next tunnels."""
        scheme = self._last.scheme
        if scheme is None:
            return
        self._memo.scheme = scheme
        if scheme == "digest":
            self._memo.digest = self._digest

    # -- choosing --------------------------------------------------------------------------

    def _choose(self, challenges: Sequence[Challenge]) -> AuthStep:
        offered = {c.scheme for c in challenges}
        order = (self._pinned,) if self._pinned else SCHEMES
        for scheme in order:
            if scheme not in offered or scheme in self._refused:
                continue
            if scheme in _NEEDS_PASSWORD and not self._has_password:
                continue
            if scheme == "basic":
                return self._basic()
            if scheme == "digest":
                best = self._best_digest([c for c in challenges if c.scheme == "digest"])
                if best is None:
                    continue
                self._digest = DigestSession(best)
                return self._digest_step()
            if (
                scheme == "negotiate"
                and not self._pinned
                and not self._kerberos
                and "ntlm" in offered
                and self._has_password
            ):
                # Without a Kerberos ticket Negotiate would only wrap NTLM: say NTLM plainly.
                continue
            step = self._start_token(scheme)
            if step is not None:
                return step
        raise self._cannot_answer(challenges)

    def _cannot_answer(self, challenges: Sequence[Challenge]) -> HandshakeRefused:
        offers = _offered(challenges)
        if self._pinned and self._pinned not in {c.scheme for c in challenges}:
            why = (
                f"auth is set to {self._pinned} but the proxy offers {offers}; "
                'set auth = "auto" for this upstream'
            )
        elif self._unavailable is not None:
            # Its words first: HandshakeRefused caps the reason's length.
            why = f"{self._unavailable} (the proxy offers {offers})"
        elif not self._has_password:
            why = f"the proxy asks for authentication ({offers}) and no password is set up"
        else:
            why = f"the proxy offers no authentication scheme we can use ({offers})"
        return HandshakeRefused(407, why, auth_failed=True)

    @staticmethod
    def _best_digest(challenges: Sequence[Challenge]) -> DigestChallenge | None:
        parsed = [d for d in map(DigestChallenge.parse, challenges) if d is not None]
        # max() keeps the first of equals: the proxy's own order breaks ties.
        return max(parsed, key=lambda d: d.strength, default=None)

    # -- building headers ------------------------------------------------------------------

    def _sent(self, step: AuthStep) -> AuthStep:
        self._last = step
        self.credentials_sent = self.credentials_sent or step.sends_credentials
        return step

    def _basic(self) -> AuthStep:
        assert self._username is not None and self._password is not None
        header = basic_proxy_authorization(self._username, self._password)
        return AuthStep(header, "basic", sends_credentials=True)

    def _digest_step(self) -> AuthStep:
        assert self._username is not None and self._password is not None
        assert self._digest is not None
        header = digest_authorization(
            self._digest.challenge,
            self._username,
            self._password,
            method="CONNECT",
            uri=self.authority,
            cnonce=self._cnonce(),
            count=self._digest.next_count(),
        )
        return AuthStep(header, "digest", sends_credentials=True)

    def _start_token(self, scheme: str) -> AuthStep | None:
        if self._contexts is None:
            return None
        try:
            context = self._contexts(scheme)
            token = context.step(None)
        except MechanismUnavailable as exc:
            self._unavailable = str(exc)
            return None
        if not token:
            return None
        self._context = context
        self._answered_token = False
        return self._token_step(scheme, token)

    def _continue_token(self, scheme: str, token68: str) -> AuthStep:
        assert self._context is not None
        try:
            incoming = base64.b64decode(token68, validate=True)
        except binascii.Error:
            raise ProtocolError(
                f"proxy sent a {_WIRE_NAME[scheme]} challenge that is not base64"
            ) from None
        out = self._context.step(incoming)
        if not out:
            raise HandshakeRefused(
                407,
                f"the proxy wants more {_WIRE_NAME[scheme]} legs than the exchange has",
                auth_failed=True,
            )
        self._answered_token = True
        return self._token_step(scheme, out)

    def _token_step(self, scheme: str, token: bytes) -> AuthStep:
        value = f"{_WIRE_NAME[scheme]} {base64.b64encode(token).decode('ascii')}"
        return AuthStep(("Proxy-Authorization", value), scheme, self._has_password)
