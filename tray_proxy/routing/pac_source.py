"""Fetching the PAC script: from an http(s):// URL with a conditional request (ETag,
Last-Modified), or from a file (a path, `~/path` or a file:// URL) compared by mtime and size.

Blocking I/O with a timeout: the caller runs it off the relay's loop, on its own timer
(`pac.PacSchedule`). Environment proxy variables are ignored (the script says which proxy to
use; fetching it through one would be circular); pass `opener` to fetch some other way.

Must not import PySide6, asyncio or the relay engine.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tray_proxy.routing.pac import PacFailure

__all__ = ["MAX_PAC_BYTES", "PacText", "Unchanged", "fetch_pac"]

MAX_PAC_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PacText:
    """A fetched script and what identifies this version of it (ETag / Last-Modified, or the
    file's mtime and size)."""

    text: str
    validator: str


@dataclass(frozen=True, slots=True)
class Unchanged:
    """The source still has the version identified by the validator passed in."""


def fetch_pac(
    location: str,
    validator: str | None = None,
    *,
    timeout: float = 10.0,
    opener: urllib.request.OpenerDirector | None = None,
) -> PacText | Unchanged | PacFailure:
    """The script at `location`, Unchanged when `validator` still matches, or a failure."""
    if location.startswith(("/", "~/")):
        return _read_file(Path(location).expanduser(), validator)
    scheme = location.partition("://")[0].lower()
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(location).path)
        return _read_file(Path(path), validator)
    return _fetch_http(location, validator, timeout, opener)


def _read_file(path: Path, validator: str | None) -> PacText | Unchanged | PacFailure:
    try:
        st = path.stat()
        version = f"file:{st.st_mtime_ns}:{st.st_size}"
        if version == validator:
            return Unchanged()
        if st.st_size > MAX_PAC_BYTES:
            return PacFailure(f"PAC file {path} is larger than {MAX_PAC_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        return PacFailure(f"cannot read the PAC file {path}: {exc.strerror or exc}")
    return _decode(data, version, str(path))


def _fetch_http(
    url: str, validator: str | None, timeout: float, opener: urllib.request.OpenerDirector | None
) -> PacText | Unchanged | PacFailure:
    shown = _without_query(url)
    request = urllib.request.Request(url, headers={"User-Agent": "tray-proxy"})
    if validator is not None:
        kind, _, value = validator.partition(":")
        if kind == "etag":
            request.add_header("If-None-Match", value)
        elif kind == "modified":
            request.add_header("If-Modified-Since", value)
    if opener is None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(MAX_PAC_BYTES + 1)
            etag = response.headers.get("ETag")
            modified = response.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 304 and validator is not None:
            return Unchanged()
        return PacFailure(f"fetching the PAC script {shown} failed: HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return PacFailure(f"fetching the PAC script {shown} failed: {reason}")
    if len(data) > MAX_PAC_BYTES:
        return PacFailure(f"the PAC script {shown} is larger than {MAX_PAC_BYTES} bytes")
    if etag:
        version = f"etag:{etag}"
    elif modified:
        version = f"modified:{modified}"
    else:
        # No validator from the server: compare the content itself.
        version = f"content:{hashlib.sha256(data).hexdigest()}"
        if version == validator:
            return Unchanged()
    return _decode(data, version, shown)


def _decode(data: bytes, version: str, shown: str) -> PacText | PacFailure:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # PAC files predate UTF-8 everywhere; Latin-1 never fails and keeps ASCII code intact.
        text = data.decode("latin-1")
    if "FindProxyForURL" not in text:
        return PacFailure(f"{shown} is not a PAC script (it defines no FindProxyForURL)")
    return PacText(text, version)


def _without_query(url: str) -> str:
    # A PAC URL may carry a token in its query; the words never show it.
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
