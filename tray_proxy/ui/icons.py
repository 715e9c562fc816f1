"""One icon per controller state, from resources/icons/<state>.svg.

The states differ by shape, not only colour (ring, arc, disc with check, triangle, octagon),
and every shape has a white halo under a dark outline, so it reads on light and dark panels
and for colour-blind users. Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from PySide6.QtGui import QIcon

from tray_proxy.controller import State

log = logging.getLogger(__name__)

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "resources" / "icons",  # source tree
    Path(sys.prefix) / "share" / "tray-proxy" / "icons",  # installed data files
    Path("/usr/share/tray-proxy/icons"),
)


def icon_dir() -> Path | None:
    for candidate in _CANDIDATES:
        if (candidate / "on.svg").is_file():
            return candidate
    return None


def icon_path(state: State) -> Path | None:
    directory = icon_dir()
    return None if directory is None else directory / f"{state.value}.svg"


@functools.cache
def state_icon(state: State) -> QIcon:
    path = icon_path(state)
    if path is None or not path.is_file():
        log.warning("icon for %s not found (looked in %s)", state.value, _CANDIDATES)
        return QIcon.fromTheme("network-wired")
    return QIcon(str(path))


def app_icon() -> QIcon:
    return state_icon(State.ON)
