"""What the views may ask of the app: the `AppServices` protocol (implemented in app.py).

Must not import keyring, socket or subprocess. Tests pass a small fake of this protocol.
"""

from __future__ import annotations

from typing import Protocol

from tray_proxy.controller import Status


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
