"""Words for the user that are not state: the plain-text diagnostics report (for bug
reports) and the advice after a failed upstream test.

Holds no password: none is known here. Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping

from tray_proxy import __version__
from tray_proxy.config import Config
from tray_proxy.controller.status import Status
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult

__all__ = ["diagnostics_report", "probe_advice"]


def diagnostics_report(
    status: Status,
    config: Config | None,
    helper_running: bool,
    extra: Mapping[str, str] | None = None,
) -> str:
    s = status
    lines = [
        f"tray-proxy {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        *(f"{k} {v}" for k, v in (extra or {}).items()),
        f"state: {s.state.value} ({s.message})",
        f"config: {config.path if config is not None else 'not loaded'}",
        f"relay: {', '.join(f'{h}:{p}' for h, p in s.relay_addresses) or 'not running'}",
        f"redirect helper running: {'yes' if helper_running else 'no'}",
        f"connections: {s.active_connections} open, {s.total_connections} since switched on",
        "upstreams:",
    ]
    by_name = {u.name: u for u in config.upstreams} if config is not None else {}
    for u in s.upstreams:
        latency = "-" if u.latency is None else f"{u.latency * 1000:.0f} ms"
        known = by_name.get(u.name)
        login = "login set" if known is not None and known.username else "no login"
        mark = "*" if u.active else " "
        lines.append(
            f" {mark} {u.name} {u.url} {login}, handshake {latency}"
            f"{', failing' if u.failing else ''}"
        )
    if not s.upstreams:
        lines.append("   (none)")
    lines.append("last errors:")
    for e in s.last_errors:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e.at))} {e.display}")
    if not s.last_errors:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"


def probe_advice(result: ProbeResult) -> str:
    """What to do after a failed test, in the user's words."""
    if result.outcome is ProbeOutcome.AUTH_FAILED:
        return "Open Credentials to fix the login."
    answered = result.outcome is ProbeOutcome.FORBIDDEN or (
        result.outcome is ProbeOutcome.UNREACHABLE and result.status is not None
    )
    if answered:  # the proxy works; it refused or could not reach the test site
        return "Ask the proxy's administrators, or see the log."
    return "Check the address and your network."
