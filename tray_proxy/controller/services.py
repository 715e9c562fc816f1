"""What the controller needs of the world, as protocols: the relay (`RelayHandle`, started by
a `RelayFactory`), the redirect's root helper (`RedirectService`), the keyring
(`CredentialRefresher`), the settings file (`ConfigStore`; `ConfigFile` is the real one), name
resolution and the upstream probe. The app and `tray-proxy run` inject the real ones; tests
inject small fakes.

Must not import PySide6, qasync or the relay engine (engine_relay.py adapts it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, Protocol

from tray_proxy.config import Config, load_config, save_config
from tray_proxy.controller.managed_redirect import HelperControl
from tray_proxy.firewall.ruleset import IPAddress
from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.events import Observer
from tray_proxy.relay.probe import ProbeResult, probe_upstream
from tray_proxy.relay.records import Address
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import UpstreamProxy

__all__ = [
    "PROBE_TARGET",
    "PROBE_TIMEOUT",
    "ConfigFile",
    "ConfigStore",
    "HistoryOutput",
    "CredentialRefresher",
    "Probe",
    "RedirectService",
    "RelayFactory",
    "RelayHandle",
    "Resolver",
    "Traffic",
    "connect_probe",
]

# Where Test connection (and the credentials dialog's Test) asks the proxy to connect.
PROBE_TARGET: Final = ("pypi.org", 443)
PROBE_TIMEOUT: Final = 10.0

# The open connections' (bytes up, bytes down) by id, and the bytes up and down since the
# relay started, closed connections included.
Traffic = tuple[dict[int, tuple[int, int]], int, int]


class RelayHandle(Protocol):
    """A running relay. Every method may be called from any thread; `stop`, `traffic` and
    `close_connections` block until the relay's loop answered (call them off the UI loop)."""

    @property
    def addresses(self) -> tuple[Address, ...]: ...

    def stop(self, timeout: float) -> None: ...

    def retry_credentials(self, upstream: str) -> None:
        """The user entered `upstream`'s password again, maybe the same one: the relay
        tries the credentials its source has now at once (one verification), whatever the
        proxy said of them before. Returns without waiting."""
        ...

    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        """From now on the relay uses `credentials` for `upstream` (None: it has no
        password), over what its CredentialSource has: the next connection uses them after
        one verification (a wrong password costs one failed login). Returns without
        waiting. For a password changed while the relay runs (issue 14 bug 1)."""
        ...

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        """Listen also on these addresses (container bridges'), on the relay's port; stop
        listening on extra addresses no longer given. Returns the extra addresses listened
        on; one that cannot be is an event (ListenerError), not an exception."""
        ...

    def close_connections(self, ids: Iterable[int]) -> int:
        """Close these connections (CloseReason.CLOSED_BY_USER); returns how many were open."""
        ...

    def traffic(self) -> Traffic: ...

    def reload_routing(self, config: Config) -> None:
        """New upstreams, rules, default and PAC for new connections; open tunnels and
        each upstream's health stay (issue 15 section 6). Returns without waiting."""
        ...

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        """An active probe's outcome, fed to the upstream's health like a real handshake
        (a change is an UpstreamHealthChanged event). Returns without waiting."""
        ...


class RelayFactory(Protocol):
    """Starts a relay for `config` whose events go to `observer`; blocks; raises on failure."""

    def __call__(self, config: Config, observer: Observer) -> RelayHandle: ...


# What the controller needs of `firewall.client.RedirectController` is what a
# ManagedRedirect drives: one protocol, named for the controller's side.
RedirectService = HelperControl


class CredentialRefresher(Protocol):
    """Re-reads the relay's passwords (`credentials.KeyringCredentialSource`); raises
    CredentialStoreError when the keyring cannot be used."""

    async def refresh(self, names: Iterable[str]) -> None: ...


class HistoryOutput(Protocol):
    """Where closed connections are kept (monitor/history.py's HistoryWriter): `submit`
    never blocks; `error` is the last failure, written for the user (None: all well)."""

    @property
    def error(self) -> str | None: ...

    def submit(self, rows: Sequence[ConnectionRow]) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class ConfigStore(Protocol):
    """Reads and writes the settings file (tray_proxy.config underneath)."""

    def load(self) -> Config: ...

    def save(self, config: Config) -> None: ...


class ConfigFile:
    """ConfigStore on the TOML settings file (a missing file is an empty configuration)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Config:
        return load_config(self.path, missing_ok=True)

    def save(self, config: Config) -> None:
        save_config(config, self.path)


Resolver = Callable[[Iterable[tuple[str, int]]], Awaitable[tuple[tuple[IPAddress, int], ...]]]
Probe = Callable[[UpstreamProxy, Credentials | None], Awaitable[ProbeResult]]


async def connect_probe(upstream: UpstreamProxy, credentials: Credentials | None) -> ProbeResult:
    """A real CONNECT (or SOCKS5) through the proxy to PROBE_TARGET, with the login."""
    return await probe_upstream(upstream, credentials, PROBE_TARGET, PROBE_TIMEOUT)
