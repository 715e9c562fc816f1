"""The list of doctor checks, in the order they are shown, and the runner.

Every check runs concurrently with the others (the upstream probes take seconds), each
bounded by `env.check_timeout`; a check that raises or overruns becomes that check's own
failure, never a traceback and never another check's problem.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tray_proxy import __version__
from tray_proxy.doctor import checks_network, checks_session, checks_system, checks_wsl
from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import CHECK_IDS, CheckResult, CheckStatus, Report

__all__ = ["CHECKS", "CHECK_IDS", "Check", "run_checks"]

CheckFunc = Callable[[DoctorEnv], Awaitable[CheckResult | Sequence[CheckResult]]]


@dataclass(frozen=True)
class Check:
    """`probes`: the check opens tunnels through the proxies (up to two per upstream, each
    bounded by the probe timeout), so its time limit grows with that timeout."""

    id: str
    run: CheckFunc
    probes: bool = False


CHECKS: tuple[Check, ...] = (
    Check("config", checks_network.check_config),
    Check("nft", checks_system.check_nft),
    Check("nat-redirect", checks_system.check_nat_redirect),
    Check("helper", checks_system.check_helper),
    Check("privilege", checks_system.check_privilege),
    Check("dbus", checks_session.check_dbus),
    Check("keyring", checks_session.check_keyring),
    Check("upstream", checks_network.check_upstreams, probes=True),
    Check("tls-inspection", checks_network.check_tls, probes=True),
    Check("redirect", checks_network.check_redirect),
    Check("relay", checks_network.check_relay),
    Check("ipv6", checks_network.check_ipv6),
    Check("exclusions", checks_network.check_exclusions),
    Check("wsl-version", checks_wsl.check_wsl_version),
    Check("wsl-networking", checks_wsl.check_wsl_networking),
    Check("wsl-settings", checks_wsl.check_wsl_settings),
    Check("wsl-tray", checks_wsl.check_wsl_tray),
    Check("wsl-docker", checks_wsl.check_wsl_docker),
)
assert tuple(c.id for c in CHECKS) == CHECK_IDS, "model.CHECK_IDS lists the checks in order"

_BUG = "this is a bug in tray-proxy doctor: report it with the output of `tray-proxy doctor --json`"


async def _run_one(check: Check, env: DoctorEnv) -> tuple[CheckResult, ...]:
    limit = env.check_timeout + (4 * env.timeout() if check.probes else 0.0)
    try:
        found = await asyncio.wait_for(check.run(env), limit)
    except asyncio.TimeoutError:
        return (
            CheckResult(
                check.id,
                CheckStatus.FAIL,
                f"the check did not finish within {limit:g} s",
                fix="run it again; if it keeps hanging, " + _BUG,
            ),
        )
    except Exception as exc:  # one broken check must not hide the others' results
        return (
            CheckResult(
                check.id,
                CheckStatus.FAIL,
                f"the check itself failed: {type(exc).__name__}: {exc}",
                fix=_BUG,
            ),
        )
    return (found,) if isinstance(found, CheckResult) else tuple(found)


async def run_checks(
    env: DoctorEnv, only: Sequence[str] = (), checks: Sequence[Check] = CHECKS
) -> Report:
    """Run `checks` (only those named in `only`, when given) and gather their results in
    the order of `checks`."""
    selected = [c for c in checks if not only or c.id in only]
    found = await asyncio.gather(*(_run_one(c, env) for c in selected))
    return Report(tuple(r for group in found for r in group), __version__)
