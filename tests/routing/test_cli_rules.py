"""`tray-proxy rules` as a user runs it: `python -m tray_proxy rules ...` in a subprocess over a
real settings file (and a real PAC file evaluated by pypac)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tray_proxy.config import load_config

SETTINGS = """\
[relay]
upstream = "corp"

[[rule]]
match = ["*.intra.example", "10.0.0.0/8"]
action = "direct"

[[rule]]
match = ["ads.example"]
action = "block"

[[upstream]]
name = "corp"
url = "http://proxy.corp.example:3128"
username = "alice"

[[upstream]]
name = "backup"
url = "http://proxy2.corp.example:3128"
"""


def rules(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    base["HOME"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "tray_proxy", "rules", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(SETTINGS)
    return path


def test_list(tmp_path: Path, config: Path) -> None:
    done = rules(tmp_path, "list", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "rule[0]  *.intra.example, 10.0.0.0/8 -> direct",
        "rule[1]  ads.example -> block",
        "default: proxy corp, backup",
        "when every upstream is down: direct; order: priority",
    ]
    config.write_text('[routing]\ndefault = "direct"\n')
    done = rules(tmp_path, "list", "--config", str(config))
    assert done.stdout.splitlines()[:2] == [
        "No rules: every connection follows the default.",
        "default: direct",
    ]
    config.write_text('[routing]\ndefault = "pac"\npac_url = "/etc/p.pac"\n')
    done = rules(tmp_path, "list", "--config", str(config))
    assert "default: the PAC script /etc/p.pac (when it fails: direct (no upstream" in done.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["git.intra.example"], "direct (rule[0]: *.intra.example, 10.0.0.0/8 -> direct)"),
        (
            ["pypi.org", "--ip", "10.1.2.3"],
            "direct (rule[0]: *.intra.example, 10.0.0.0/8 -> direct)",
        ),
        (["ADS.example:80"], "block (rule[1]: ads.example -> block)"),
        (["pypi.org"], "proxy corp, backup (default)"),
        (["[2001:db8::1]:443"], "proxy corp, backup (default)"),
        (["[2001:db8::1]"], "proxy corp, backup (default)"),
        (["10.0.0.1"], "direct (rule[0]: *.intra.example, 10.0.0.0/8 -> direct)"),
    ],
)
def test_test(tmp_path: Path, config: Path, args: list[str], line: str) -> None:
    done = rules(tmp_path, "test", "--config", str(config), *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == line


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("host:0", "is not HOST or HOST:PORT"),
        ("host:x", "is not HOST or HOST:PORT"),
        ("[::1", "is not HOST or HOST:PORT"),
        ("[::1]x", "is not HOST or HOST:PORT"),
        (":443", "is not HOST or HOST:PORT"),
        ("a..b", "is not a host name or address"),
    ],
)
def test_test_refuses_bad_targets(tmp_path: Path, config: Path, target: str, words: str) -> None:
    done = rules(tmp_path, "test", "--config", str(config), target)
    assert done.returncode == 2
    assert words in done.stderr


def test_test_with_a_pac_script(tmp_path: Path, config: Path) -> None:
    pac = tmp_path / "proxy.pac"
    pac.write_text(
        "function FindProxyForURL(url, host) {\n"
        '  if (shExpMatch(host, "*.lab.example")) return "DIRECT";\n'
        '  return "PROXY proxy2.corp.example:3128; PROXY proxy.corp.example:8080";\n'
        "}\n"
    )
    config.write_text(f'[routing]\ndefault = "pac"\npac_url = "{pac}"\n' + SETTINGS)
    done = rules(tmp_path, "test", "--config", str(config), "www.lab.example")
    assert done.stdout.strip() == "direct (pac: DIRECT)"
    done = rules(tmp_path, "test", "--config", str(config), "pypi.org")
    assert done.stdout.splitlines() == [
        "proxy backup, pac-proxy.corp.example-8080 (pac: PROXY backup; PROXY "
        "pac-proxy.corp.example-8080)",
        "  pac-proxy.corp.example-8080: http://proxy.corp.example:8080 (from the PAC script, "
        "login of corp)",
    ]
    pac.write_text('function FindProxyForURL(url, host) { return "PROXY other.example:1"; }\n')
    done = rules(tmp_path, "test", "--config", str(config), "pypi.org")
    assert "(from the PAC script, no login)" in done.stdout
    pac.write_text("function FindProxyForURL(url, host) { return ")
    done = rules(tmp_path, "test", "--config", str(config), "pypi.org")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("PAC script: the PAC script does not work")
    assert lines[1].startswith("proxy corp, backup (default; PAC failed: ")


def test_import_shows_then_writes(tmp_path: Path, config: Path) -> None:
    no_proxy = "localhost,127.0.0.1,.corp.example,10.*,*foo*,[::1]:8080"
    done = rules(tmp_path, "import-no-proxy", "--config", str(config), env={"NO_PROXY": no_proxy})
    assert done.returncode == 0, done.stderr
    rule = "[[rule]]  .localhost, 127.0.0.1, .corp.example, 10.0.0.0/8, [::1]:8080 -> direct"
    assert done.stdout.splitlines() == [
        rule,
        "(not written; add --write to put it in the settings file)",
    ]
    assert "skipped '*foo*': wildcards other than a leading *." in done.stderr
    assert config.read_text() == SETTINGS  # untouched without --write

    # $no_proxy wins over $NO_PROXY, as in curl.
    done = rules(
        tmp_path,
        "import-no-proxy",
        "--config",
        str(config),
        "--write",
        env={"NO_PROXY": "ignored.example", "no_proxy": no_proxy},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"written to {config} as rule[2]"
    loaded = load_config(config)
    assert [r.text for r in loaded.routing.rules][2] == rule.removeprefix("[[rule]]  ")
    assert loaded.upstreams[0].username == "alice"  # the rest is kept
    assert oct(config.stat().st_mode & 0o777) == "0o600"

    done = rules(tmp_path, "import-no-proxy", "--config", str(config), "--write", no_proxy)
    assert "already has this rule (rule[2]); nothing changed" in done.stdout

    done = rules(
        tmp_path, "import-no-proxy", "--config", str(config), "--write", "--first", "pypi.org"
    )
    assert done.stdout.splitlines()[-1] == f"written to {config} as rule[0]"
    assert load_config(config).routing.rules[0].text == ".pypi.org -> direct"


def test_import_problems(tmp_path: Path, config: Path) -> None:
    done = rules(tmp_path, "import-no-proxy", "--config", str(config))
    assert done.returncode == 2
    assert "no_proxy and NO_PROXY are not set" in done.stderr
    done = rules(tmp_path, "import-no-proxy", "--config", str(config), "*foo*")
    assert done.returncode == 2 and "nothing to import" in done.stderr
    done = rules(
        tmp_path, "import-no-proxy", "--config", str(tmp_path / "none.toml"), "--write", "a.example"
    )
    assert done.returncode == 2 and "tray-proxy setup" in done.stderr
    # A directory the settings cannot be saved in: read-only for a user; immutable for root,
    # whom permissions do not stop (chattr +i, on the test's own directory only).
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "config.toml"
    target.write_text(SETTINGS)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True, timeout=10)
    else:
        locked.chmod(0o500)
    try:
        done = rules(tmp_path, "import-no-proxy", "--config", str(target), "--write", "a.example")
        assert done.returncode == 1
        assert "cannot save it" in done.stderr
        assert target.read_text() == SETTINGS
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True, timeout=10)
        locked.chmod(0o700)


def test_bad_settings_are_a_usage_error(tmp_path: Path, config: Path) -> None:
    config.write_text('[[rule]]\nmatch = ["a..b"]\naction = "direct"\n')
    done = rules(tmp_path, "list", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith(f"tray-proxy rules: {config}: rule[0].match[0]: ")
    done = rules(tmp_path)
    assert done.returncode == 2 and "ACTION" in done.stderr
