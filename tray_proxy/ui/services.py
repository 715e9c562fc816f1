"""What the views may ask of the app: the `AppServices` protocol (implemented in app.py).

Must not import keyring, socket or subprocess. Tests pass a small fake of this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tray_proxy.controller import Status
from tray_proxy.monitor.query import HistoryCursor, HistoryFilter, HistoryPage
from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.probe import ProbeResult
from tray_proxy.relay.secrets import Credentials, Secret
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

    def close_connections(self, ids: Sequence[int]) -> None:
        """Close these connections (the engine ends them with CLOSED_BY_USER); ids that
        have closed meanwhile are skipped. Returns at once: the rows move to Closed when
        the engine's events arrive."""
        ...

    def test_upstream(self, name: str) -> None:
        """Probe the upstream `name` now ("Test now"); the result arrives in the health
        snapshot (UpstreamHealth.last_probe) and as a notice."""
        ...

    def open_rows(self) -> Sequence[ConnectionRow]:
        """The connections open now (seeds the Active table when the window is built)."""
        ...

    def history(self) -> HistoryReader | None:
        """The connection history, or None when it is switched off ([log] enabled = false)."""
        ...


class HistoryReader(Protocol):
    """What the Log tab reads (monitor/history.py's HistoryStore behind it).

    `page` is called on the UI thread (one page of about 200 rows: an index lookup);
    `export` is called from a worker thread, so an implementation must not share one
    sqlite3 connection between the two (open one per thread or per call). Both raise
    exceptions whose text is written for the user (HistoryError).
    """

    def page(
        self, filter: HistoryFilter, *, after: HistoryCursor | None = None, limit: int = 200
    ) -> HistoryPage:
        """The newest `limit` rows matching `filter` that are older than `after`."""
        ...

    def export(self, filter: HistoryFilter, path: Path, fmt: str) -> int:
        """Write every row matching `filter` to `path` as "csv" or "json"; returns how
        many rows were written."""
        ...


class KeyringService(Protocol):
    """The part of `tray_proxy.keyring_store.CredentialStore` the credentials dialog uses.

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
