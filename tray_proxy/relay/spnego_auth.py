"""NTLM and Negotiate tokens from pyspnego, shaped as protocol/proxy_auth's ``TokenContext``.

pyspnego imports ``socket`` (NTLM asks for the host name) and Kerberos talks to the KDC to get
a service ticket (once per proxy: it is kept in the ticket cache), so the glue lives here and
not in the sans-IO protocol package. The relay runs these steps in a worker thread
(relay/upstream.py), so a slow KDC never stalls the loop. Kerberos needs pyspnego's GSSAPI
backend, the ``gssapi`` and ``krb5`` modules (the ``kerberos`` extra); without them Negotiate
can only wrap NTLM.

Kerberos uses the user's ticket cache (``KRB5CCNAME``, else the system default) when it holds
a live ticket: Negotiate then goes without the stored password, which is kept for NTLM, Digest
and Basic. With no ticket and no password, Negotiate cannot start, and the error says to run
kinit.

pyspnego's exceptions are turned into our own with fixed words: theirs are not ours to vet for
secrets. Must not import PySide6.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from typing import Any

import spnego

from tray_proxy.relay.protocol.errors import ProtocolError
from tray_proxy.relay.protocol.proxy_auth import (
    MechanismUnavailable,
    TokenContext,
    TokenContextFactory,
)

__all__ = [
    "NO_GSSAPI",
    "NO_TICKET",
    "SpnegoContext",
    "forget_ticket_check",
    "gssapi_installed",
    "kerberos_available",
    "token_contexts",
]


# A ticket appears (kinit) or expires while the relay runs, but asking the cache for every
# tunnel would repeat the same file read: the answer is kept this many seconds.
_TICKET_CHECK_TTL = 5.0
_ticket_checked: tuple[float, bool] | None = None

# Shown in a 407 failure whose reason is capped at 80 characters: the advice comes first.
NO_GSSAPI = "Kerberos needs the gssapi and krb5 modules: pip install 'tray-proxy[kerberos]'"
NO_TICKET = "no Kerberos ticket: run kinit (klist lists tickets) or store a password"


@functools.cache
def gssapi_installed() -> bool:
    """Can pyspnego use Kerberos at all? Its GSSAPI backend needs both the ``gssapi`` and
    the ``krb5`` modules (pyspnego's ``kerberos`` extra); with only one it falls back to NTLM.

    Cached: find_spec searches sys.path, and the answer cannot change while we run.
    """
    return all(importlib.util.find_spec(name) is not None for name in ("gssapi", "krb5"))


def _live_ticket() -> bool:
    # Optional module, imported only once gssapi_installed() found it; untyped on purpose so
    # type checks do not depend on whether the extra is installed.
    gssapi: Any = importlib.import_module("gssapi")
    try:
        # The default initiator credentials are the ticket-granting ticket of the cache.
        return bool(gssapi.Credentials(usage="initiate").lifetime > 0)
    except gssapi.raw.GSSError:  # no cache, empty cache, expired ticket
        return False


def kerberos_available(*, now: float | None = None) -> bool:
    """Is there a Kerberos ticket Negotiate can use here (gssapi and a live TGT)?"""
    global _ticket_checked
    if not gssapi_installed():
        return False
    at = time.monotonic() if now is None else now
    if _ticket_checked is not None and 0 <= at - _ticket_checked[0] < _TICKET_CHECK_TTL:
        return _ticket_checked[1]
    found = _live_ticket()
    _ticket_checked = (at, found)
    return found


def forget_ticket_check() -> None:
    """Look at the ticket cache again on the next question (after kinit, in tests)."""
    global _ticket_checked
    _ticket_checked = None


class SpnegoContext:
    """One pyspnego client context for one tunnel's connection."""

    def __init__(self, context: Any, scheme: str) -> None:
        self._context = context
        self._scheme = scheme

    def __repr__(self) -> str:
        return f"<SpnegoContext {self._scheme}>"

    def step(self, token: bytes | None) -> bytes | None:
        try:
            out = self._context.step(token)
        except Exception as exc:
            if token is None:
                raise MechanismUnavailable(
                    f"{self._scheme} cannot start here ({type(exc).__name__})"
                ) from None
            raise ProtocolError(
                f"the proxy's {self._scheme} challenge could not be answered ({type(exc).__name__})"
            ) from None
        return bytes(out) if out is not None else None


def token_contexts(
    username: str | None, password: str | None, proxy_host: str
) -> TokenContextFactory:
    """A factory of contexts for ``ProxyAuth``: scheme ("ntlm"/"negotiate") -> context.

    Negotiate with a live ticket uses the ticket cache and not the password (pyspnego would
    otherwise ask the KDC for a new ticket with it). Negotiate with neither raises
    ``MechanismUnavailable`` saying why, which ProxyAuth shows if nothing else fits.
    """

    def make(scheme: str) -> TokenContext:
        user, secret = username, password
        if scheme == "negotiate":
            if kerberos_available():
                user = secret = None
            elif secret is None:
                raise MechanismUnavailable(NO_TICKET if gssapi_installed() else NO_GSSAPI)
        try:
            context = spnego.client(
                user,
                secret,
                hostname=proxy_host,
                service="HTTP",
                protocol=scheme,
            )
        except Exception as exc:
            raise MechanismUnavailable(
                f"{scheme} is not available ({type(exc).__name__})"
            ) from None
        return SpnegoContext(context, scheme)

    return make
