"""Changes to the settings the user makes from the app and `tray-proxy setup`: which upstream
is active, and one upstream's address and login. Pure functions over `Config`, beside
config.py; the controller and setup_flow load, save and restart what must restart.

Must not import PySide6, qasync, the relay engine or the controller.
"""

from __future__ import annotations

from dataclasses import replace

from tray_proxy.config import Config
from tray_proxy.errors import UserError
from tray_proxy.relay.settings import UpstreamProxy

__all__ = ["with_active_upstream", "with_upstream"]


def with_active_upstream(config: Config, name: str) -> Config:
    """`config` with `name` as the active upstream; UserError when there is none by that name."""
    if name not in {u.name for u in config.upstreams}:
        raise UserError(f"There is no upstream named {name!r} in the settings.")
    return replace(config, relay=replace(config.relay, upstream=name))


def with_upstream(config: Config, upstream: UpstreamProxy) -> tuple[Config, UpstreamProxy | None]:
    """`config` with `upstream` replacing the one of its name (or added last), and the one
    it replaced (None when it is new)."""
    old = next((u for u in config.upstreams if u.name == upstream.name), None)
    upstreams = tuple(upstream if u.name == upstream.name else u for u in config.upstreams)
    if old is None:
        upstreams += (upstream,)
    return replace(config, upstreams=upstreams), old
