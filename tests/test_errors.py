"""Which failures count as written for the user: chosen by type (tray_proxy.errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tray_proxy.config import ConfigError
from tray_proxy.controller.managed_redirect import RedirectSetupError
from tray_proxy.errors import UserError
from tray_proxy.firewall.client import AuthorizationDismissedError, RedirectError
from tray_proxy.instance import ControlError
from tray_proxy.keyring_store import CredentialStoreError, KeyringLockedError
from tray_proxy.relay.engine import RelayStartError


@pytest.mark.parametrize(
    "kind",
    [
        ConfigError,
        ControlError,
        CredentialStoreError,
        KeyringLockedError,
        RedirectError,
        AuthorizationDismissedError,
        RedirectSetupError,
        RelayStartError,
    ],
)
def test_core_failures_are_user_errors(kind: type[Exception]) -> None:
    assert issubclass(kind, UserError)


def test_the_root_helper_stays_standalone() -> None:
    """firewall/helper.py runs as root on its own: it must not import tray_proxy.errors."""
    import tray_proxy.firewall.helper as helper

    source = Path(helper.__file__).read_text(encoding="utf-8")
    assert "tray_proxy" not in "".join(
        line for line in source.splitlines() if line.startswith(("import ", "from "))
    )
