"""What `tray-proxy doctor` reports: one `CheckResult` per check (and per upstream for the
upstream checks), gathered in a `Report` with a stable JSON form (`SCHEMA_VERSION`).

Pure data: frozen dataclasses and an enum. Must not import PySide6, asyncio, the relay or
anything that does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["CHECK_IDS", "SCHEMA_VERSION", "CheckResult", "CheckStatus", "Report"]

# The checks, in the order they run and are shown (runner.CHECKS follows it; docs/doctor.md
# explains each). Stable: scripts match on them.
CHECK_IDS: Final = (
    "config",
    "nft",
    "nat-redirect",
    "helper",
    "privilege",
    "dbus",
    "keyring",
    "upstream",
    "tls-inspection",
    "redirect",
    "relay",
    "ipv6",
    "exclusions",
    "wsl-version",
    "wsl-networking",
    "wsl-settings",
    "wsl-tray",
    "wsl-docker",
)

# Bump when a field is removed or changes meaning; adding a field or a check id keeps it.
SCHEMA_VERSION: Final = 1


class CheckStatus(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but something will surprise the user; never blocks
    FAIL = "fail"  # blocks: web traffic through tray-proxy will not work until fixed
    SKIP = "skip"  # not applicable or not checkable here; the summary says why


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One finding. `check` is the stable id; `subject` names the upstream for per-upstream
    checks (None otherwise); `summary` is one line; `fix` the exact command or setting that
    fixes it (None when there is nothing to do); `details` further lines (facts, no advice)."""

    check: str
    status: CheckStatus
    summary: str
    fix: str | None = None
    subject: str | None = None
    details: tuple[str, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.status is CheckStatus.FAIL

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.check,
            "subject": self.subject,
            "status": self.status.value,
            "summary": self.summary,
            "fix": self.fix,
            "details": list(self.details),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Every result, in the order the checks are listed (docs/doctor.md)."""

    results: tuple[CheckResult, ...]
    version: str = ""

    @property
    def blocking(self) -> bool:
        return any(r.blocking for r in self.results)

    def count(self, status: CheckStatus) -> int:
        return sum(1 for r in self.results if r.status is status)

    def to_dict(self) -> dict[str, object]:
        """The `--json` document (docs/doctor.md, "JSON")."""
        return {
            "schema_version": SCHEMA_VERSION,
            "tray_proxy_version": self.version,
            "blocking": self.blocking,
            "counts": {s.value: self.count(s) for s in CheckStatus},
            "checks": [r.to_dict() for r in self.results],
        }
