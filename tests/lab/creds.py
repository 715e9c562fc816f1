"""Proxy credentials made up for one lab run: user name, password (redacted in repr), and a
0600 file holding the password for consumers that must not see it in argv or env.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProxyCredentials:
    username: str
    password: str = field(repr=False)
    password_file: Path

    @classmethod
    def generate(cls, username: str, directory: Path) -> ProxyCredentials:
        password = secrets.token_urlsafe(15)
        path = directory / f"{username}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
        return cls(username, password, path)

    def wrong(self) -> ProxyCredentials:
        """Same user, a password that is certainly wrong (file not written)."""
        return ProxyCredentials(self.username, self.password + "-wrong", Path(os.devnull))
