"""The upstream form without Qt: what the user typed -> an `UpstreamProxy` or one message per
field, and Save in its one order (the password into the keyring, then the settings file).

The credentials dialog (ui/credentials_dialog.py) shows the fields and the messages and calls
`save_upstream` with the services it was given; it never parses settings, touches the file
or the keyring itself (import-linter: "The views do no settings file or keyring I/O").
Validation uses the settings file's own rules for an [[upstream]] (`config.parse_upstream`),
so the dialog can never save something the file would refuse on the next start.

Must not import PySide6, keyring or socket; the I/O is the injected services'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from tray_proxy.config import ConfigError, parse_upstream
from tray_proxy.keyring_store import CredentialStoreError
from tray_proxy.relay.secrets import Secret
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy

log = logging.getLogger(__name__)

__all__ = [
    "FieldValues",
    "PasswordWriter",
    "SaveOutcome",
    "UpstreamWriter",
    "full_stop",
    "save_upstream",
    "validate",
]


@dataclass(frozen=True)
class FieldValues:
    """What the user typed, before validation."""

    name: str
    kind: UpstreamKind
    host: str
    port: str
    username: str
    auth: AuthScheme
    has_password: bool
    new: bool = False
    taken_names: frozenset[str] = frozenset()
    stored_username: str | None = None  # whose password the keyring already holds


def _problem(
    name: str, url: str, username: str | None = None, auth: str | None = None
) -> ConfigError | None:
    """What the file's rules for one [[upstream]] table say of these fields, if anything."""
    try:
        parse_upstream(name, url, username, "dialog", auth=auth)
    except ConfigError as exc:
        return exc
    return None


def _sentence(text: str, subject: str) -> str:
    # The settings file's problems read "must ..." after the field's name.
    if text.startswith("must"):
        text = f"{subject} {text}"
    return full_stop(text[:1].upper() + text[1:])


def full_stop(text: str) -> str:
    """`text` ending in a full stop (or the ! or ? it has)."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _url(kind: UpstreamKind, host: str, port: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{kind.value}://{host}:{port}"


def validate(values: FieldValues) -> tuple[dict[str, str], UpstreamProxy | None]:
    """Field name -> message for each invalid field, and the upstream when all are valid.

    Each field is checked on its own, with the others set to known-good values, so every
    wrong field gets its message at once (the parser stops at the first problem).
    Field names: name, host, port, username, password.
    """
    errors: dict[str, str] = {}
    good_url = f"{values.kind.value}://proxy.invalid:1"

    if values.new:
        if not values.name:
            errors["name"] = "Enter a name for this proxy, like corp."
        elif values.name in values.taken_names:
            errors["name"] = f"There already is a proxy named {values.name}; choose another name."
        else:
            found = _problem(values.name, good_url)
            if found is not None:
                errors["name"] = _sentence(found.problem, "the name")

    host = values.host
    if not host:
        errors["host"] = "Enter the proxy's host name or address."
    elif "://" in host or "/" in host:
        errors["host"] = "Enter only the host name or address; choose the type above."
    else:
        found = _problem("x", _url(values.kind, host, "1"))
        if found is not None:
            errors["host"] = _sentence(found.problem, "the host")

    port = values.port
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        errors["port"] = "The port must be a number 1-65535."

    auth = values.auth if values.kind is UpstreamKind.HTTP else AuthScheme.AUTO
    if values.username:
        found = _problem("x", good_url, values.username, auth.value)
        if found is not None:
            errors["username"] = _sentence(found.problem, "the user name")
        elif not values.has_password and values.stored_username != values.username:
            errors["password"] = (
                "Enter the password; it goes into the keyring, never into the settings file."
            )
    elif values.has_password:
        errors["username"] = "Enter the user name that goes with this password."

    if errors:
        return errors, None
    upstream = parse_upstream(
        values.name,
        _url(values.kind, host, port),
        values.username or None,
        "dialog",
        auth=auth.value,
    )
    return errors, upstream


# --------------------------------------------------------------------------- Save


class PasswordWriter(Protocol):
    """The keyring's part in Save (keyring_store.CredentialStore): raises
    CredentialStoreError, whose text is written for the user."""

    async def set(self, name: str, username: str, password: Secret) -> None: ...


class UpstreamWriter(Protocol):
    """The settings' part in Save (the app's controller): raises ConfigError when the file
    cannot be written; returns a warning for the user, or None."""

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None: ...


@dataclass(frozen=True)
class SaveOutcome:
    """What Save did: `error` (for the user) when nothing or only the password was saved;
    otherwise saved, with the settings' `warning`, if any."""

    error: str | None = None
    warning: str | None = None

    @property
    def saved(self) -> bool:
        return self.error is None


async def save_upstream(
    passwords: PasswordWriter,
    settings: UpstreamWriter,
    upstream: UpstreamProxy,
    secret: Secret | None,
) -> SaveOutcome:
    """The password first (when one was typed and the upstream has a user name), then the
    settings: a settings file naming a login whose password failed to reach the keyring
    would only earn 407s. Failures are returned in words, never raised (cancellation is)."""
    try:
        if secret is not None and upstream.username:
            await passwords.set(upstream.name, upstream.username, secret)
        warning = await settings.save_upstream(upstream)
    except CredentialStoreError as exc:
        return SaveOutcome(error=full_stop(f"The password was not saved: {exc}"))
    except ConfigError as exc:
        return SaveOutcome(error=full_stop(f"The settings were not saved: {exc}"))
    except Exception as exc:
        log.exception("saving %s failed", upstream)
        return SaveOutcome(error=f"Saving failed ({type(exc).__name__}: {exc}); see the log.")
    return SaveOutcome(warning=warning)
