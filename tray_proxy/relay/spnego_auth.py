"""NTLM and Negotiate tokens from pyspnego, shaped as protocol/proxy_auth's ``TokenContext``.

pyspnego does no network I/O for these, but it imports ``socket`` (NTLM asks for the host
name), so the glue lives here and not in the sans-IO protocol package. Kerberos (Negotiate with
no password: the user's ticket cache) needs pyspnego's GSSAPI backend, the ``gssapi`` module;
without it Negotiate can only wrap NTLM.

pyspnego's exceptions are turned into our own with fixed words: theirs are not ours to vet for
secrets. Must not import PySide6.
"""

from __future__ import annotations

import functools
import importlib.util
from functools import cache
from typing import Any

import spnego

from tray_proxy.relay.protocol.errors import ProtocolError
from tray_proxy.relay.protocol.proxy_auth import (
    MechanismUnavailable,
    TokenContext,
    TokenContextFactory,
)

__all__ = ["SpnegoContext", "kerberos_available", "token_contexts"]


@cache
@functools.cache
def kerberos_available() -> bool:
    """Can pyspnego use Kerberos here? (Its GSSAPI backend is the ``gssapi`` module.)

    Cached: find_spec searches sys.path, and this is asked once per tunnel.
    """
    return importlib.util.find_spec("gssapi") is not None


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
    """A factory of contexts for ``ProxyAuth``: scheme ("ntlm"/"negotiate") -> context."""

    def make(scheme: str) -> TokenContext:
        try:
            context = spnego.client(
                username,
                password,
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
