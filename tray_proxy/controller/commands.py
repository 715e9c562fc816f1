"""The control socket's commands (tray_proxy.instance), answered by the running instance:
the tray app and headless `tray-proxy run` answer them alike.

`status` and `raise` also say which kind of instance answered ("tray" or "run"), so a
second start can tell the user what is already running. `credentials-changed NAME` (sent by
`tray-proxy credentials set NAME` after it stored a password) makes the instance read that
proxy's password again; only the name travels on the socket, never a secret. `reload` reads
the settings file again and applies it (the answer says what needs a switch off and on).

Must not import PySide6 or qasync.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, Protocol

from tray_proxy.controller.status import Status

__all__ = [
    "CREDENTIALS_CHANGED",
    "INSTANCE_RUN",
    "INSTANCE_TRAY",
    "RELOAD",
    "CommandTarget",
    "answer_command",
    "credentials_changed_command",
]

INSTANCE_TRAY: Final = "tray"
INSTANCE_RUN: Final = "run"
CREDENTIALS_CHANGED: Final = "credentials-changed"
# Read the settings file again and apply it without dropping open tunnels (issue 15 section 6).
RELOAD: Final = "reload"
# An upstream's name as the config allows it (tray_proxy.config); nothing else is accepted.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def credentials_changed_command(name: str) -> str:
    """The command line `tray-proxy credentials set NAME` sends; ValueError for a name no
    config can hold."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an upstream name")
    return f"{CREDENTIALS_CHANGED} {name}"


class CommandTarget(Protocol):
    """What the commands need of ProxyController."""

    def status(self) -> Status: ...

    async def enable(self) -> Status: ...

    async def disable(self) -> Status: ...

    async def credentials_changed(self, name: str) -> dict[str, object]: ...

    async def reload(self) -> dict[str, object]: ...


def immediate_answer(
    controller: CommandTarget | None, command: str, *, instance: str
) -> dict[str, Any] | None:
    """The answer to a command that needs no waiting (`status`), given in the control
    socket's own pass of the loop; None for the others (`answer_command` answers them)."""
    if command == "status" and controller is not None:
        return {"status": controller.status().to_dict(), "instance": instance}
    return None


async def answer_command(
    controller: CommandTarget,
    command: str,
    *,
    instance: str,
    quit: Callable[[], None],
    raise_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One control-socket command; raises ValueError for an unknown one."""
    now = immediate_answer(controller, command, instance=instance)
    if now is not None:
        return now
    if command == "enable":
        return {"status": (await controller.enable()).to_dict()}
    if command == "disable":
        return {"status": (await controller.disable()).to_dict()}
    if command == "quit":
        quit()
        return {}
    if command == RELOAD:
        answer = await controller.reload()
        return {**answer, "status": controller.status().to_dict()}
    if command == "raise":
        if raise_window is not None:
            raise_window()
        return {"instance": instance}
    verb, _, name = command.partition(" ")
    if verb == CREDENTIALS_CHANGED:
        if not _NAME.fullmatch(name):
            raise ValueError(f"{CREDENTIALS_CHANGED} needs an upstream name")
        return await controller.credentials_changed(name)
    raise ValueError(f"unknown command {command!r}")
