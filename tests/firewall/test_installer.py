"""The polkit and sudoers files name exactly the helper path and action the client uses."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tray_proxy.firewall.client import INSTALLED_HELPER_PATH, POLKIT_ACTION_ID

INSTALLER = Path(__file__).resolve().parents[2] / "installer"
POLICY = INSTALLER / "polkit" / "org.trayproxy.redirect.policy"
RULES = INSTALLER / "polkit" / "50-tray-proxy.rules"
SUDOERS = INSTALLER / "sudoers" / "tray-proxy"


def _children(parent: ET.Element, tag: str) -> list[ET.Element]:
    found = parent.find(tag)
    assert found is not None, f"<{tag}> missing"
    return list(found)


def test_policy_exec_path_is_the_path_the_client_runs() -> None:
    root = ET.parse(POLICY).getroot()
    actions = root.findall("action")
    assert [a.get("id") for a in actions] == [POLKIT_ACTION_ID]
    (action,) = actions
    annotations = {a.get("key"): (a.text or "").strip() for a in action.findall("annotate")}
    assert annotations == {"org.freedesktop.policykit.exec.path": INSTALLED_HELPER_PATH}
    defaults = {d.tag: (d.text or "").strip() for d in _children(action, "defaults")}
    assert defaults == {
        "allow_any": "no",
        "allow_inactive": "no",
        "allow_active": "auth_admin_keep",
    }
    assert (action.findtext("message") or "").strip()


def test_rule_grants_only_this_action_to_the_group() -> None:
    code = "\n".join(
        line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("//")
    )
    assert re.findall(r'action\.id\s*===?\s*"([^"]+)"', code) == [POLKIT_ACTION_ID]
    assert re.findall(r'isInGroup\("([^"]+)"\)', code) == ["tray-proxy"]
    assert code.count("polkit.Result.YES") == 1
    assert code.count("polkit.addRule(") == 1
    # The YES sits inside the condition that checks both the action and the group.
    assert re.search(
        r'if \(action\.id === "[^"]+" && subject\.isInGroup\("tray-proxy"\)\) \{\s*'
        r"return polkit\.Result\.YES;\s*\}",
        code,
    )


def test_sudoers_allows_exactly_the_helper_without_arguments() -> None:
    rules = [
        line
        for line in SUDOERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == [
        f"Defaults!{INSTALLED_HELPER_PATH} env_reset",
        f'%tray-proxy ALL=(root) NOPASSWD: {INSTALLED_HELPER_PATH} ""',
    ]


def test_sudoers_file_parses_with_visudo() -> None:
    visudo = shutil.which("visudo") or (
        "/usr/sbin/visudo" if Path("/usr/sbin/visudo").exists() else None
    )
    if visudo is None:
        pytest.fail("visudo is missing: install the sudo package to check installer/sudoers")
    done = subprocess.run(
        [visudo, "-c", "-f", str(SUDOERS)], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
