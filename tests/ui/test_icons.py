"""Each state has its own icon, and the icons differ by shape, not only by colour."""

from __future__ import annotations

import itertools

from PySide6.QtGui import QImage
from pytestqt.qtbot import QtBot

from tray_proxy.controller import State
from tray_proxy.ui.icons import icon_path, state_icon

SIZE = 32


def _alpha_mask(state: State) -> list[bool]:
    image = state_icon(state).pixmap(SIZE, SIZE).toImage()
    image = image.convertToFormat(QImage.Format.Format_ARGB32)
    return [image.pixelColor(x, y).alpha() > 128 for y in range(SIZE) for x in range(SIZE)]


def test_every_state_has_an_svg_that_loads(qtbot: QtBot) -> None:
    for state in State:
        path = icon_path(state)
        assert path is not None and path.is_file(), f"resources/icons/{state.value}.svg missing"
        assert not state_icon(state).isNull()
        assert not state_icon(state).pixmap(22, 22).isNull()


def test_shapes_differ_between_states(qtbot: QtBot) -> None:
    masks = {state: _alpha_mask(state) for state in State}
    for a, b in itertools.combinations(State, 2):
        differing = sum(x != y for x, y in zip(masks[a], masks[b], strict=True))
        # Compared on opacity alone: a colour-blind user (or a monochrome panel) still
        # sees a different outline.
        assert differing >= SIZE * SIZE * 0.04, f"{a.value} and {b.value} look alike"
