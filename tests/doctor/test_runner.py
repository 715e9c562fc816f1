"""The doctor's runner and renderers: a crashing or hanging check is that check's failure,
results keep the listed order, and the `--json` document matches a frozen example of
schema version 1 (a change to it must be deliberate: update docs/doctor.md too).

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.doctor.support import check_schema
from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import SCHEMA_VERSION, CheckResult, CheckStatus, Report
from tray_proxy.doctor.render import render_json, render_text
from tray_proxy.doctor.runner import CHECKS, Check, run_checks

GOLDEN = Path(__file__).with_name("golden") / "report-v1.json"


def example_report() -> Report:
    return Report(
        (
            CheckResult("config", CheckStatus.OK, "/home/alice/.config/tray-proxy/config.toml"),
            CheckResult(
                "upstream",
                CheckStatus.FAIL,
                "proxy.corp:8080 rejected the password for alice (407)",
                fix="`tray-proxy credentials set corp`",
                subject="corp",
            ),
            CheckResult(
                "exclusions",
                CheckStatus.WARN,
                "connections to 10.0.0.0/8 go direct",
                fix="remove its range from `exclude` under [redirect]",
                details=("direct: 10.0.0.0/8 (private network 10.x.x.x)",),
            ),
            CheckResult("wsl-version", CheckStatus.SKIP, "not WSL"),
        ),
        "1.2.3",
    )


def test_json_matches_the_frozen_example() -> None:
    text = render_json(example_report())
    assert json.loads(text) == json.loads(GOLDEN.read_text(encoding="utf-8"))
    check_schema(json.loads(text))
    assert SCHEMA_VERSION == 1


def test_text_output() -> None:
    text = render_text(example_report())
    assert text.splitlines() == [
        "tray-proxy doctor (tray-proxy 1.2.3)",
        "  ok    config         /home/alice/.config/tray-proxy/config.toml",
        "  FAIL  upstream corp  proxy.corp:8080 rejected the password for alice (407)",
        "                       fix: `tray-proxy credentials set corp`",
        "  warn  exclusions     connections to 10.0.0.0/8 go direct",
        "                       direct: 10.0.0.0/8 (private network 10.x.x.x)",
        "                       fix: remove its range from `exclude` under [redirect]",
        "  skip  wsl-version    not WSL",
        "1 problem(s) block tray-proxy (FAIL above); fix them first; 1 warning(s).",
    ]


def test_a_crashing_check_fails_alone_and_a_hanging_one_times_out(tmp_path: Path) -> None:
    async def crashes(env: DoctorEnv) -> CheckResult:
        raise RuntimeError("boom")

    async def hangs(env: DoctorEnv) -> CheckResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def fine(env: DoctorEnv) -> list[CheckResult]:
        return [
            CheckResult("fine", CheckStatus.OK, "one", subject="a"),
            CheckResult("fine", CheckStatus.OK, "two", subject="b"),
        ]

    env = DoctorEnv(config_path=tmp_path / "config.toml", check_timeout=0.5)
    checks = [Check("crashes", crashes), Check("hangs", hangs), Check("fine", fine)]
    report = asyncio.run(run_checks(env, checks=checks))
    assert [(r.check, r.status) for r in report.results] == [
        ("crashes", CheckStatus.FAIL),
        ("hangs", CheckStatus.FAIL),
        ("fine", CheckStatus.OK),
        ("fine", CheckStatus.OK),
    ]
    assert report.results[0].summary == "the check itself failed: RuntimeError: boom"
    assert "did not finish within 0.5 s" in report.results[1].summary
    assert report.blocking


def test_only_runs_the_named_checks(tmp_path: Path) -> None:
    env = DoctorEnv(config_path=tmp_path / "absent.toml")
    report = asyncio.run(run_checks(env, only=("wsl-docker", "config")))
    # The listed order, not the order asked for.
    assert [r.check for r in report.results] == ["config", "wsl-docker"]
    assert [c.id for c in CHECKS][0] == "config"
