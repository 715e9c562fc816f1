"""How the engine gets an upstream's password: the Secret type and CredentialSource.

Must not import PySide6. Secrets never go into repr, str, logs or exceptions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Secret:
    """A password in memory. Its repr and str are redacted; `reveal()` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: Secret


class CredentialSource(Protocol):
    """Looks up the credentials of one upstream by its name. Returns None when it has none."""

    def get(self, upstream: str, username: str | None) -> Credentials | None: ...


class SystemdCredentialSource:
    """systemd credentials: the password of upstream NAME is `$CREDENTIALS_DIRECTORY/NAME`.

    A trailing newline in the file is not part of the password. The file is read again only
    when its size or modification time changes (a stat per connection, not a read), and the
    same Credentials object is handed out until then.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        if directory is None:
            env = os.environ.get("CREDENTIALS_DIRECTORY")
            directory = env if env else None
        self._dir = Path(directory) if directory is not None else None
        self._cache: dict[str, tuple[tuple[int, int, int], Credentials]] = {}
        self._paths: dict[str, str] = {}

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        if self._dir is None or username is None:
            return None
        if "/" in upstream or upstream in ("", ".", ".."):
            return None
        path = self._paths.get(upstream)
        if path is None:
            path = self._paths[upstream] = str(self._dir / upstream)
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get(upstream)
            if cached is not None and cached[0] == stamp and cached[1].username == username:
                return cached[1]
            with open(path, encoding="utf-8") as handle:
                raw = handle.read()
            password = raw.removesuffix("\n").removesuffix("\r")
            found = Credentials(username, Secret(password))
            self._cache[upstream] = (stamp, found)
        except (OSError, UnicodeDecodeError, ValueError):  # ValueError: NUL in the name
            self._cache.pop(upstream, None)
            return None
        return found


class ChainedCredentialSource:
    """Asks each source in order; the first that has credentials wins."""

    def __init__(self, *sources: CredentialSource) -> None:
        self._sources = sources

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        for source in self._sources:
            found = source.get(upstream, username)
            if found is not None:
                return found
        return None


class StaticCredentialSource:
    """Credentials held in memory (tests, and the app after the keyring lookup)."""

    def __init__(self, entries: dict[str, Credentials] | None = None) -> None:
        self._entries = dict(entries or {})

    def set(self, upstream: str, credentials: Credentials) -> None:
        self._entries[upstream] = credentials

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        return self._entries.get(upstream)
