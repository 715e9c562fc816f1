"""The upstream form model (tray_proxy/upstream_form.py): fields -> UpstreamProxy or one
message per field, and Save's order (keyring first, then the settings file).

No Qt. Save runs with the real CredentialStore over an in-memory keyring backend (as
tests/test_keyring_store.py) and a settings writer that writes a real file with
config.save_config; the dialog around it is tested in tests/ui/test_credentials_dialog.py and,
with the real Secret Service, tests/integration/test_credentials_dialog_real.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_keyring_store import MemoryKeyring, store_with
from tray_proxy.config import ConfigError, load_config, save_config
from tray_proxy.config_edits import with_upstream
from tray_proxy.keyring_store import SERVICE
from tray_proxy.relay.secrets import Secret
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.upstream_form import FieldValues, full_stop, save_upstream, validate

PASSWORD = "c0rrect-Horse:battery staple"

FILLED = FieldValues(
    name="corp",
    kind=UpstreamKind.HTTP,
    host="proxy.corp.example",
    port="3128",
    username="alice",
    auth=AuthScheme.DIGEST,
    has_password=True,
    new=True,
    taken_names=frozenset({"home"}),
)


def test_valid_fields_make_the_upstream() -> None:
    errors, upstream = validate(FILLED)
    assert errors == {}
    assert upstream == UpstreamProxy(
        "corp", UpstreamKind.HTTP, "proxy.corp.example", 3128, "alice", AuthScheme.DIGEST
    )


def test_every_wrong_field_gets_its_message_at_once() -> None:
    values = replace(FILLED, name="home", host="http://proxy", port="70000", username="")
    errors, upstream = validate(values)
    assert upstream is None
    assert errors == {
        "name": "There already is a proxy named home; choose another name.",
        "host": "Enter only the host name or address; choose the type above.",
        "port": "The port must be a number 1-65535.",
        "username": "Enter the user name that goes with this password.",
    }


def test_the_settings_files_own_rules_become_sentences() -> None:
    errors, _ = validate(replace(FILLED, name="a b", auth=AuthScheme.BASIC, username="d:alice"))
    assert errors["name"].startswith("The name must be 1-64 characters")
    assert errors["username"] == (
        'The user name must not contain ":" (HTTP Basic authentication cannot carry it).'
    )
    # Digest carries a colon in the user name: the file allows it, so the form does.
    assert validate(replace(FILLED, username="d:alice"))[0] == {}


def test_ipv6_host_is_bracketed_in_the_url() -> None:
    errors, upstream = validate(replace(FILLED, host="2001:db8::1"))
    assert errors == {}
    assert upstream is not None and upstream.host == "2001:db8::1"


def test_socks5_ignores_the_http_scheme() -> None:
    _, upstream = validate(replace(FILLED, kind=UpstreamKind.SOCKS5, port="1080"))
    assert upstream is not None and upstream.auth is AuthScheme.AUTO


def test_password_needed_unless_the_keyring_holds_this_users() -> None:
    without = replace(FILLED, has_password=False)
    assert set(validate(without)[0]) == {"password"}
    assert validate(replace(without, stored_username="alice"))[0] == {}
    assert set(validate(replace(without, stored_username="bob"))[0]) == {"password"}


def test_full_stop() -> None:
    assert full_stop("done ") == "done."
    assert full_stop("done?") == "done?"


class FileSettings:
    """The settings' part of Save as the app does it: the upstream into a real file."""

    def __init__(self, path: Path, keyring: MemoryKeyring, fail: bool = False) -> None:
        self.path = path
        self.keyring = keyring
        self.fail = fail
        self.keyring_entries_seen: list[int] = []

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        self.keyring_entries_seen.append(len(self.keyring.entries))
        if self.fail:
            raise ConfigError(str(self.path), "", "cannot save it: No space left on device")
        config, _old = with_upstream(load_config(self.path, missing_ok=True), upstream)
        save_config(config, self.path)
        return "the keyring could not be read again"


def upstream_with(username: str | None) -> UpstreamProxy:
    return UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 3128, username)


def test_save_puts_the_password_into_the_keyring_before_the_settings(tmp_path: Path) -> None:
    keyring = MemoryKeyring()
    settings = FileSettings(tmp_path / "config.toml", keyring)
    outcome = asyncio.run(
        save_upstream(store_with(keyring), settings, upstream_with("alice"), Secret(PASSWORD))
    )
    assert outcome.saved and outcome.warning == "the keyring could not be read again"
    assert settings.keyring_entries_seen == [1]  # the password was there first
    entry = json.loads(keyring.entries[(SERVICE, "corp")])
    assert (entry["username"], entry["password"]) == ("alice", PASSWORD)
    assert load_config(settings.path).upstreams == (upstream_with("alice"),)
    assert PASSWORD not in settings.path.read_text() and PASSWORD not in repr(outcome)


@pytest.mark.parametrize(("username", "secret"), [("alice", None), (None, Secret(PASSWORD))])
def test_save_without_a_login_to_store_leaves_the_keyring_alone(
    tmp_path: Path, username: str | None, secret: Secret | None
) -> None:
    keyring = MemoryKeyring()
    settings = FileSettings(tmp_path / "config.toml", keyring)
    outcome = asyncio.run(
        save_upstream(store_with(keyring), settings, upstream_with(username), secret)
    )
    assert outcome.saved and keyring.entries == {}
    assert load_config(settings.path).upstreams == (upstream_with(username),)


class RefusingKeyring(MemoryKeyring):
    def set_password(self, service: str, username: str, password: str) -> None:
        raise RuntimeError("the collection is read-only")


def test_a_password_that_did_not_reach_the_keyring_leaves_the_settings_alone(
    tmp_path: Path,
) -> None:
    keyring = RefusingKeyring()
    settings = FileSettings(tmp_path / "config.toml", keyring)
    outcome = asyncio.run(
        save_upstream(store_with(keyring), settings, upstream_with("alice"), Secret(PASSWORD))
    )
    assert not outcome.saved
    assert outcome.error is not None and outcome.error.startswith("The password was not saved: ")
    assert settings.keyring_entries_seen == [] and not settings.path.exists()
    assert PASSWORD not in outcome.error


def test_a_settings_file_that_cannot_be_written_is_said_in_words(tmp_path: Path) -> None:
    keyring = MemoryKeyring()
    settings = FileSettings(tmp_path / "config.toml", keyring, fail=True)
    outcome = asyncio.run(
        save_upstream(store_with(keyring), settings, upstream_with("alice"), Secret(PASSWORD))
    )
    assert outcome.error == (
        f"The settings were not saved: {settings.path}: cannot save it: No space left on device."
    )
