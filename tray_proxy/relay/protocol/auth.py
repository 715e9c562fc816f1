"""Builders for proxy authentication headers.

The Basic scheme's header (RFC 7617), sent preemptively or in answer to a challenge; Digest is
digest.py, and proxy_auth.py picks and runs every scheme (Basic, Digest, NTLM, Negotiate).
Secrets pass through here and must never reach an exception message or a log line.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import base64

from .errors import UsageError

__all__ = ["basic_proxy_authorization"]


def basic_proxy_authorization(username: str, password: str) -> tuple[str, str]:
    """The ``Proxy-Authorization`` header for the Basic scheme (RFC 7617), UTF-8 encoded.

    RFC 7617 section 2 forbids a colon in the user-id: the proxy would split there and read
    the rest as part of the password.
    """
    if ":" in username:
        raise UsageError("a Basic-auth user name cannot contain ':' (RFC 7617)")
    raw = _utf8(f"{username}:{password}")
    if raw is None:
        raise UsageError("the user name or password is not valid Unicode text")
    token = base64.b64encode(raw).decode("ascii")
    return ("Proxy-Authorization", f"Basic {token}")


def _utf8(text: str) -> bytes | None:
    # The UnicodeEncodeError keeps the whole string (password included) in `.object`; it must
    # not become the __context__ of an exception we raise, so it dies here.
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None
