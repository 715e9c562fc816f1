"""The doctor's two outputs: lines for a person, and the `--json` document.

Pure functions of a Report. Must not import PySide6 or do I/O.
"""

from __future__ import annotations

import json

from tray_proxy.doctor.model import CheckStatus, Report

__all__ = ["render_json", "render_text"]

_LABELS = {
    CheckStatus.OK: "ok",
    CheckStatus.WARN: "warn",
    CheckStatus.FAIL: "FAIL",
    CheckStatus.SKIP: "skip",
}


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


def render_text(report: Report) -> str:
    names = [r.check + (f" {r.subject}" if r.subject else "") for r in report.results]
    width = max((len(n) for n in names), default=0)
    lines = [f"tray-proxy doctor (tray-proxy {report.version})"]
    pad = " " * (width + 10)  # under the summary: "  FAIL  " + name + "  "
    for name, result in zip(names, report.results, strict=True):
        lines.append(f"  {_LABELS[result.status]:<4}  {name:<{width}}  {result.summary}")
        lines.extend(f"{pad}{detail}" for detail in result.details)
        if result.fix and result.status in (CheckStatus.FAIL, CheckStatus.WARN):
            lines.append(f"{pad}fix: {result.fix}")
    fails = report.count(CheckStatus.FAIL)
    warns = report.count(CheckStatus.WARN)
    if fails:
        verdict = f"{fails} problem(s) block tray-proxy (FAIL above); fix them first"
    else:
        verdict = "nothing blocks tray-proxy"
    if warns:
        verdict += f"; {warns} warning(s)"
    lines.append(verdict + ".")
    return "\n".join(lines) + "\n"
