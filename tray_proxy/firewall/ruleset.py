"""The redirect's ruleset as data: `RuleSpec -> nft text`, a pure function.

The renderer and the validator live in `helper.py`, the standalone root helper, because root
must render from data it validated itself and cannot import this package. This module is the
face the rest of tray-proxy uses, so there is exactly one renderer and the golden tests check
the very text root applies. Nothing here does I/O. `MAX_SOURCE_PORTS` is the helper's limit
on `relay_source_ports`, so the settings file can be held to the same limit when it loads.

Must not import PySide6 or tray_proxy.relay.
"""

from __future__ import annotations

from tray_proxy.firewall.helper import (
    CAPTURE_MODES,
    DEFAULT_CAPTURE,
    DEFAULT_CONTAINER_INTERFACES,
    DEFAULT_EXCLUDED_NETWORKS,
    DEFAULT_REDIRECT_PORTS,
    DEFAULT_RELAY_SOURCE_PORTS,
    MAX_SOURCE_PORTS,
    POLICY_PATH,
    SYSTEM_UID_LIMIT,
    TABLE_FAMILY,
    TABLE_NAME,
    Bridge,
    IPAddress,
    IPNetwork,
    RuleSpec,
    SpecError,
    render,
    render_delete,
    spec_from_wire,
    spec_to_wire,
)

__all__ = [
    "CAPTURE_MODES",
    "DEFAULT_CAPTURE",
    "DEFAULT_CONTAINER_INTERFACES",
    "DEFAULT_EXCLUDED_NETWORKS",
    "DEFAULT_REDIRECT_PORTS",
    "DEFAULT_RELAY_SOURCE_PORTS",
    "MAX_SOURCE_PORTS",
    "POLICY_PATH",
    "SYSTEM_UID_LIMIT",
    "TABLE_FAMILY",
    "TABLE_NAME",
    "IPAddress",
    "Bridge",
    "IPNetwork",
    "RuleSpec",
    "SpecError",
    "render",
    "render_delete",
    "spec_from_wire",
    "spec_to_wire",
]
