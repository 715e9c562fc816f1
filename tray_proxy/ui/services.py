"""What the views may ask of the app: the `AppServices` protocol (implemented in app.py).

Must not import keyring, socket or subprocess. Tests pass a small fake of this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tray_proxy.controller import Status
from tray_proxy.relay.credentials import Credentials, Secret
from tray_proxy.relay.probe import ProbeResult
from tray_proxy.relay.settings import UpstreamProxy


class AppServices(Protocol):
    def status(self) -> Status: ...

    def toggle(self) -> None: ...

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def select_upstream(self, name: str) -> None: ...

    def test_connection(self) -> None: ...

    def diagnostics(self) -> str: ...

    def autostart_enabled(self) -> bool: ...

    def set_autostart(self, enabled: bool) -> None:
        """Raises OSError when the autostart entry cannot be written or removed."""
        ...

    def quit(self) -> None: ...


class KeyringService(Protocol):
    """The part of `tray_proxy.credentials.CredentialStore` the credentials dialog uses.

    Every call is a coroutine that runs the keyring off the UI thread; failures raise
    `CredentialStoreError`, whose text is written for the user.
    """

    async def backend_description(self) -> str: ...

    async def get(self, name: str) -> Credentials | None: ...

    async def set(self, name: str, username: str, password: Secret) -> None: ...


class UpstreamEditor(Protocol):
    """Reading, testing and saving upstream proxies (implemented in app.py)."""

    def upstreams(self) -> tuple[UpstreamProxy, ...]: ...

    def active_upstream(self) -> str | None: ...

    async def probe(self, upstream: UpstreamProxy, credentials: Credentials | None) -> ProbeResult:
        """One real CONNECT / SOCKS5 handshake through `upstream`; never raises for a
        failure of the proxy (that is the result), only for a bug."""
        ...

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        """Write `upstream` into the settings (replacing the one of the same name), then let
        the relay pick up the new credentials. Raises ConfigError when the file cannot be
        written; returns a warning for the user (e.g. the keyring could not be re-read) or
        None."""
        ...


@dataclass(frozen=True)
class CredentialsServices:
    """What the credentials dialog is given: the keyring and the upstream editor."""

    store: KeyringService
    editor: UpstreamEditor
