"""The control socket's commands as the tray app and headless `run` answer them."""

from __future__ import annotations

import pytest

from tests.controller.fakes import Rig, run
from tray_proxy.controller import State
from tray_proxy.controller.commands import INSTANCE_RUN, answer_command


def test_commands_switch_the_controller_and_say_who_answered() -> None:
    rig = Rig()
    quits: list[str] = []
    raised: list[str] = []

    async def scenario() -> None:
        async def ask(command: str) -> dict[str, object]:
            return await answer_command(
                rig.controller,
                command,
                instance=INSTANCE_RUN,
                quit=lambda: quits.append(command),
                raise_window=lambda: raised.append(command),
            )

        status = await ask("status")
        assert status["instance"] == "run"
        assert status["status"] == rig.controller.status().to_dict()
        on = await ask("enable")
        assert on["status"]["state"] == "on"  # type: ignore[index]
        off = await ask("disable")
        assert off["status"]["state"] == "off"  # type: ignore[index]
        assert await ask("raise") == {"instance": "run"}
        assert await ask("quit") == {}
        with pytest.raises(ValueError, match="unknown command"):
            await ask("reboot")

    run(scenario())
    assert quits == ["quit"] and raised == ["raise"]
    assert rig.controller.state is State.OFF


def test_reload_answers_what_was_applied_and_the_status() -> None:
    rig = Rig()

    async def scenario() -> dict[str, object]:
        return await answer_command(
            rig.controller, "reload", instance=INSTANCE_RUN, quit=lambda: None
        )

    answer = run(scenario())
    assert answer["applied"] == [] and answer["restart"] == []
    assert answer["message"] == "The settings were reloaded."
    assert answer["status"] == rig.controller.status().to_dict()
