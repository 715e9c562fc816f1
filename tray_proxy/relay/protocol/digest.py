"""HTTP Digest access authentication for a proxy (RFC 7616), client side, sans-IO.

Supported: algorithms MD5, MD5-sess, SHA-256, SHA-256-sess; qop "auth" (or no qop, the
RFC 2069 form some old proxies still send); ``userhash``; ``stale=true``. Not supported:
qop "auth-int" alone (it would hash a request body; CONNECT has none, but we do not guess
how a proxy computes it) and SHA-512-256 (not in every OpenSSL build).

The password only enters ``HA1``; nothing here puts it, or any hash of it, into an exception.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from .challenge import Challenge
from .errors import UsageError

__all__ = ["ALGORITHMS", "DigestChallenge", "DigestSession", "digest_authorization"]

# Strongest first: when a proxy offers several Digest challenges we answer the strongest.
ALGORITHMS: dict[str, Callable[[bytes], str]] = {
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
}


@dataclass(frozen=True)
class DigestChallenge:
    """The parts of a Digest challenge a response depends on."""

    realm: str
    nonce: str
    algorithm: str  # as the proxy wrote it, e.g. "MD5-sess"; matched case-insensitively
    qop: str | None  # "auth", or None for the RFC 2069 form
    opaque: str | None = None
    stale: bool = False
    userhash: bool = False

    @property
    def base_algorithm(self) -> str:
        return self.algorithm.upper().removesuffix("-SESS")

    @property
    def session(self) -> bool:
        return self.algorithm.upper().endswith("-SESS")

    @property
    def strength(self) -> int:
        """Higher is stronger; used to pick among several Digest challenges."""
        return len(ALGORITHMS) - list(ALGORITHMS).index(self.base_algorithm)

    @classmethod
    def parse(cls, challenge: Challenge) -> DigestChallenge | None:
        """The challenge as Digest parameters, or None when we cannot answer it."""
        if challenge.scheme != "digest" or challenge.token68 is not None:
            return None
        params = challenge.params
        realm, nonce = params.get("realm"), params.get("nonce")
        if realm is None or not nonce:
            return None
        # We echo these back in our header, which carries printable ASCII only.
        if not all(_plain(v) for v in (realm, nonce, params.get("opaque", ""))):
            return None
        algorithm = params.get("algorithm", "MD5")
        if algorithm.upper().removesuffix("-SESS") not in ALGORITHMS:
            return None
        qop: str | None = None
        if "qop" in params:
            offered = {q.strip().lower() for q in params["qop"].split(",")}
            if "auth" not in offered:
                return None
            qop = "auth"
        elif algorithm.upper().endswith("-SESS"):
            # RFC 7616 section 3.4.2: the -sess variants need a cnonce, which only exists
            # with a qop.
            return None
        return cls(
            realm=realm,
            nonce=nonce,
            algorithm=algorithm,
            qop=qop,
            opaque=params.get("opaque"),
            stale=params.get("stale", "").lower() == "true",
            userhash=params.get("userhash", "").lower() == "true",
        )


class DigestSession:
    """The challenge last answered for one proxy, and its nonce count (RFC 7616 section 3.4).

    Kept per upstream so a later tunnel can answer preemptively with the same nonce and the
    next count, saving a round trip; a proxy that dislikes the old nonce says ``stale=true``.
    """

    def __init__(self, challenge: DigestChallenge) -> None:
        self.challenge = challenge
        self._count = 0

    def next_count(self) -> int:
        self._count += 1
        return self._count


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _plain(value: str) -> bool:
    return value.isascii() and all(0x20 <= ord(c) < 0x7F for c in value)


def _utf8(text: str) -> bytes | None:
    # A UnicodeEncodeError keeps the whole string (password included): it dies here.
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None


def digest_authorization(
    challenge: DigestChallenge,
    username: str,
    password: str,
    *,
    method: str,
    uri: str,
    cnonce: str,
    count: int,
) -> tuple[str, str]:
    """The ``Proxy-Authorization`` header answering `challenge` (RFC 7616 section 3.4)."""
    if not 1 <= count <= 0xFFFFFFFF:
        raise UsageError("the Digest nonce count must be 1 to 2**32-1")
    if not cnonce or not _plain(cnonce) or '"' in cnonce:
        raise UsageError("the Digest cnonce must be printable ASCII without quotes")
    hash_ = ALGORITHMS[challenge.base_algorithm]
    user_bytes, secret = _utf8(username), _utf8(password)
    if user_bytes is None or secret is None:
        raise UsageError("the user name or password is not valid Unicode text")
    realm = challenge.realm.encode()
    ha1 = hash_(user_bytes + b":" + realm + b":" + secret)
    nc = f"{count:08x}"
    if challenge.session:
        ha1 = hash_(f"{ha1}:{challenge.nonce}:{cnonce}".encode())
    ha2 = hash_(f"{method}:{uri}".encode())
    if challenge.qop is None:
        response = hash_(f"{ha1}:{challenge.nonce}:{ha2}".encode())
    else:
        response = hash_(f"{ha1}:{challenge.nonce}:{nc}:{cnonce}:{challenge.qop}:{ha2}".encode())
    fields: list[str] = []
    if challenge.userhash:
        # RFC 7616 section 3.4.4: the user name travels hashed with the realm.
        fields.append(f"username={_quote(hash_(user_bytes + b':' + realm))}")
    elif _plain(username):
        fields.append(f"username={_quote(username)}")
    else:
        # RFC 7616 section 3.4.4 / RFC 8187: a non-ASCII user name as username*.
        fields.append(f"username*=UTF-8''{quote(username, safe='')}")
    fields += [
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
        f"algorithm={challenge.algorithm}",
        f"response={_quote(response)}",
    ]
    if challenge.opaque is not None:
        fields.append(f"opaque={_quote(challenge.opaque)}")
    if challenge.qop is not None:
        fields += [f"qop={challenge.qop}", f"nc={nc}", f"cnonce={_quote(cnonce)}"]
    if challenge.userhash:
        fields.append("userhash=true")
    return ("Proxy-Authorization", "Digest " + ", ".join(fields))
