"""Issue 14 bug 1: a password changed outside the running instance (`tray-proxy credentials
set NAME`) is read again at every switch-on and when the control socket says so, and the
relay is told to try it at once. The keyring here is an in-memory stand-in for what
`credentials.KeyringCredentialSource` does (refresh from the store, answer from memory);
tests/integration/test_new_user_bugs_lab.py runs the same with gnome-keyring and Squid."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from tests.controller.fakes import Rig, run, until
from tray_proxy.controller import State
from tray_proxy.controller.commands import INSTANCE_RUN, answer_command
from tray_proxy.errors import UserError
from tray_proxy.keyring_store import KeyringLockedError
from tray_proxy.relay.events import UpstreamFailed
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret


class Keyring:
    """The stored entries (`stored`) and what the relay sees (`get`: the last read)."""

    def __init__(self) -> None:
        self.stored: dict[str, Credentials] = {}
        self.cache: dict[str, Credentials] = {}
        self.reads: list[tuple[str, ...]] = []
        self.locked = False

    async def refresh(self, names: Iterable[str]) -> None:
        wanted = tuple(names)
        self.reads.append(wanted)
        if self.locked:
            raise KeyringLockedError("the keyring is locked")
        self.cache = {n: self.stored[n] for n in wanted if n in self.stored}

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        return self.cache.get(upstream)


def _rig(keyring: Keyring) -> Rig:
    return Rig(credentials=keyring, credential_source=keyring)


def test_every_switch_on_reads_the_keyring_again() -> None:
    keyring = Keyring()
    keyring.stored["corp"] = Credentials("alice", Secret("old"))
    rig = _rig(keyring)

    async def scenario() -> None:
        assert (await rig.controller.enable()).state is State.ON
        assert keyring.get("corp", "alice") == Credentials("alice", Secret("old"))
        await rig.controller.disable()
        keyring.stored["corp"] = Credentials("alice", Secret("new"))  # credentials set
        assert (await rig.controller.enable()).state is State.ON
        assert keyring.get("corp", "alice") == Credentials("alice", Secret("new"))
        await rig.controller.shutdown()

    run(scenario())
    assert keyring.reads == [("corp", "backup"), ("corp", "backup")]


def test_credentials_changed_reads_it_and_lets_the_relay_try_it_at_once() -> None:
    keyring = Keyring()
    keyring.stored["corp"] = Credentials("alice", Secret("old"))
    rig = _rig(keyring)

    async def scenario() -> None:
        await rig.controller.enable()
        keyring.stored["corp"] = Credentials("alice", Secret("new"))
        answer = await answer_command(
            rig.controller, "credentials-changed corp", instance=INSTANCE_RUN, quit=lambda: None
        )
        assert answer == {"upstream": "corp", "in_use": True}
        assert keyring.get("corp", "alice") == Credentials("alice", Secret("new"))
        # A spare proxy: read, and the relay forgets its rejection too, but it is not in use.
        answer = await answer_command(
            rig.controller, "credentials-changed backup", instance=INSTANCE_RUN, quit=lambda: None
        )
        assert answer == {"upstream": "backup", "in_use": False}
        with pytest.raises(ValueError, match="needs an upstream name"):
            await answer_command(
                rig.controller, "credentials-changed ../x", instance=INSTANCE_RUN, quit=lambda: None
            )
        await rig.controller.shutdown()

    run(scenario())
    assert [c for c in rig.log.calls if c.startswith("relay.retry")] == [
        "relay.retry corp",
        "relay.retry backup",
    ]


def test_credentials_changed_for_a_proxy_added_meanwhile_reads_that_name_too() -> None:
    keyring = Keyring()
    rig = _rig(keyring)

    async def scenario() -> None:
        answer = await rig.controller.credentials_changed("added-by-setup")
        assert answer == {"upstream": "added-by-setup", "in_use": False}

    run(scenario())
    assert keyring.reads == [("corp", "backup", "added-by-setup")]


def test_a_keyring_that_fails_is_said_to_the_sender_and_in_the_status() -> None:
    keyring = Keyring()
    keyring.locked = True
    rig = _rig(keyring)

    async def scenario() -> None:
        with pytest.raises(UserError, match="the keyring is locked"):
            await rig.controller.credentials_changed("corp")

    run(scenario())
    assert "the keyring is locked" in (rig.controller.status().last_error or "")


def test_a_failing_keyring_at_switch_on_is_quiet_while_the_password_is_known() -> None:
    """A headless service reads $CREDENTIALS_DIRECTORY and has no keyring: a failed re-read
    is no error while the active proxy's password is known."""
    keyring = Keyring()
    keyring.stored["corp"] = Credentials("alice", Secret("pw"))
    rig = _rig(keyring)

    async def scenario() -> None:
        await rig.controller.enable()
        await rig.controller.disable()
        keyring.locked = True
        assert (await rig.controller.enable()).state is State.ON
        assert rig.controller.status().last_errors == ()
        assert not rig.notices()
        await rig.controller.shutdown()

    run(scenario())


def test_headless_advice_names_commands_not_the_apps_controls() -> None:
    """`tray-proxy run` has no Credentials window (issue 14 bug 6)."""
    keyring = Keyring()
    keyring.stored["corp"] = Credentials("alice", Secret("pw"))
    rig = Rig(credentials=keyring, credential_source=keyring, headless=True)

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(UpstreamFailed("corp", CloseReason.UPSTREAM_AUTH_FAILED, "407"))
        await until(lambda: rig.controller.state is State.DEGRADED, "degraded")
        keyring.locked = True
        with pytest.raises(UserError):
            await rig.controller.credentials_changed("corp")
        await rig.controller.shutdown()

    run(scenario())
    rejected, keyring_failed = rig.notices()
    assert "`tray-proxy credentials set corp`" in rejected.text
    assert "`tray-proxy disable`, `tray-proxy enable`" in keyring_failed.text
    assert all("Credentials" not in n.text for n in rig.notices())
