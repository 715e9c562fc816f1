"""In-memory fakes of the keyring and the upstream editor, the two services behind the
credentials dialog (`CredentialsServices`). A fake because the dialog's tests drive each
outcome (locked keyring, failing save, a probe's every result) on demand, which a real
keyring and proxy give only in the lab (tests/integration/test_credentials_dialog_real.py);
every MainWindow in the UI tests is built with them, as app.py always passes the real ones.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from tray_proxy.relay.probe import ProbeResult
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.ui.services import CredentialsServices


class FakeStore:
    """The keyring: entries in a dict; `set` records what it was given."""

    def __init__(self, entries: dict[str, Credentials] | None = None) -> None:
        self.entries = dict(entries or {})
        self.set_calls: list[tuple[str, str, Any]] = []
        self.fail_set: Exception | None = None
        self.fail_get: Exception | None = None
        self.description = "Secret Service (GNOME Keyring)"

    async def backend_description(self) -> str:
        await asyncio.sleep(0)
        return self.description

    async def get(self, name: str) -> Credentials | None:
        await asyncio.sleep(0)
        if self.fail_get is not None:
            raise self.fail_get
        return self.entries.get(name)

    async def set(self, name: str, username: str, password: Secret) -> None:
        await asyncio.sleep(0)
        self.set_calls.append((name, username, password))
        if self.fail_set is not None:
            raise self.fail_set
        self.entries[name] = Credentials(username, password)


class FakeEditor:
    def __init__(self, upstreams: Iterable[UpstreamProxy] = (), active: str | None = None):
        self._upstreams = tuple(upstreams)
        self._active = active
        self.results: list[ProbeResult] = []
        self.probes: list[tuple[UpstreamProxy, Credentials | None]] = []
        self.gate: asyncio.Event | None = None
        self.saved: list[UpstreamProxy] = []
        self.save_error: Exception | None = None

    def upstreams(self) -> tuple[UpstreamProxy, ...]:
        return self._upstreams

    def active_upstream(self) -> str | None:
        return self._active

    async def probe(self, upstream: UpstreamProxy, credentials: Credentials | None) -> ProbeResult:
        self.probes.append((upstream, credentials))
        if self.gate is not None:
            await self.gate.wait()
        return self.results.pop(0)

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        await asyncio.sleep(0)
        if self.save_error is not None:
            raise self.save_error
        self.saved.append(upstream)
        return None


def fake_credentials(
    upstreams: Iterable[UpstreamProxy] = (), active: str | None = None
) -> CredentialsServices:
    """What a MainWindow is given in a test that does not look at the credentials dialog."""
    return CredentialsServices(FakeStore(), FakeEditor(upstreams, active))
