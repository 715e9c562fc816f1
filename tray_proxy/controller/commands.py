"""The control socket's commands (tray_proxy.control), answered by the running instance:
the tray app and headless `tray-proxy run` answer them alike.

`status` and `raise` also say which kind of instance answered ("tray" or "run"), so a
second start can tell the user what is already running.

Must not import PySide6 or qasync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from tray_proxy.controller.status import Status

__all__ = ["INSTANCE_RUN", "INSTANCE_TRAY", "CommandTarget", "answer_command"]

INSTANCE_TRAY: Final = "tray"
INSTANCE_RUN: Final = "run"


class CommandTarget(Protocol):
    """What the commands need of ProxyController."""

    def status(self) -> Status: ...

    async def enable(self) -> Status: ...

    async def disable(self) -> Status: ...


async def answer_command(
    controller: CommandTarget,
    command: str,
    *,
    instance: str,
    quit: Callable[[], None],
    raise_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One control-socket command; raises ValueError for an unknown one."""
    if command == "status":
        return {"status": controller.status().to_dict(), "instance": instance}
    if command == "enable":
        return {"status": (await controller.enable()).to_dict()}
    if command == "disable":
        return {"status": (await controller.disable()).to_dict()}
    if command == "quit":
        quit()
        return {}
    if command == "raise":
        if raise_window is not None:
            raise_window()
        return {"instance": instance}
    raise ValueError(f"unknown command {command!r}")
