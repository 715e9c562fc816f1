"""Shared pieces of the doctor tests: run the real CLI (`python -m tray_proxy doctor`) with a
chosen environment, check its `--json` document against the documented schema, and pick
results by check id.

Must not import PySide6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "warn", "fail", "skip"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxy variables, D-Bus or keyring settings (each
    test adds back what it is about), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy")
        and k not in ("DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND", "CREDENTIALS_DIRECTORY")
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_doctor(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    prefix: Sequence[str] = (),
    timeout: float = 90.0,
) -> subprocess.CompletedProcess[str]:
    """`[*prefix, python, -m, tray_proxy, doctor, *args]`; `prefix` e.g. `ip netns exec NS`."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tray_proxy", "doctor", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def parse_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `--json` document, checked against the schema (docs/doctor.md, "JSON")."""
    assert "Traceback" not in result.stderr, result.stderr
    doc = json.loads(result.stdout)
    check_schema(doc)
    return doc


def check_schema(doc: Any) -> None:
    """Schema version 1, field by field (docs/doctor.md documents the same)."""
    assert isinstance(doc, dict)
    assert set(doc) == {"schema_version", "tray_proxy_version", "blocking", "counts", "checks"}
    assert doc["schema_version"] == 1
    assert isinstance(doc["tray_proxy_version"], str) and doc["tray_proxy_version"]
    assert isinstance(doc["blocking"], bool)
    assert set(doc["counts"]) == STATUSES
    assert all(isinstance(n, int) and n >= 0 for n in doc["counts"].values())
    assert isinstance(doc["checks"], list)
    for item in doc["checks"]:
        assert set(item) == {"id", "subject", "status", "summary", "fix", "details"}, item
        assert isinstance(item["id"], str) and item["id"]
        assert item["subject"] is None or isinstance(item["subject"], str)
        assert item["status"] in STATUSES
        assert isinstance(item["summary"], str) and item["summary"]
        assert "\n" not in item["summary"]
        assert item["fix"] is None or (isinstance(item["fix"], str) and item["fix"])
        assert isinstance(item["details"], list)
        assert all(isinstance(d, str) for d in item["details"])
        if item["status"] in ("fail", "warn"):
            assert item["fix"], f"{item['id']}: a fail/warn needs a fix: {item}"
    for status in STATUSES:
        assert doc["counts"][status] == sum(1 for c in doc["checks"] if c["status"] == status)
    assert doc["blocking"] == (doc["counts"]["fail"] > 0)


def results(doc: Mapping[str, Any], check: str) -> list[dict[str, Any]]:
    return [c for c in doc["checks"] if c["id"] == check]


def one(doc: Mapping[str, Any], check: str) -> dict[str, Any]:
    found = results(doc, check)
    assert len(found) == 1, f"{check}: {found}"
    return found[0]


def write_config(path: Path, upstreams: Sequence[Mapping[str, str]] = (), extra: str = "") -> Path:
    """A settings file with these [[upstream]] tables (name, url, username)."""
    lines = [extra] if extra else []
    for upstream in upstreams:
        lines.append("[[upstream]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in upstream.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
