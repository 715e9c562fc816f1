"""The one base class of failures whose message is written for the user.

A `UserError`'s text says what happened and what to do, naming only controls the user can
find; the controller, the CLI and the app show it as it is. Any other exception is a bug or
an unforeseen failure: shown as "Unexpected ..." and logged with its traceback.

Config, redirect, relay start-up and keyring failures subclass it (config.ConfigError,
firewall.client.RedirectError, relay.engine.RelayStartError,
credentials.CredentialStoreError). firewall.helper.SpecError cannot: the root helper is
standalone and imports nothing of tray_proxy.

Must not import anything of tray_proxy (everything imports it), PySide6 or asyncio.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A failure whose message is written for the user: what happened and what to do."""
