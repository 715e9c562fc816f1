"""`tray-proxy doctor` through the real CLI (`python -m tray_proxy doctor`): exit codes, the
`--json` schema and the human output, on the settings file a test writes.

Must not import PySide6.
"""

from __future__ import annotations

from pathlib import Path

from tests.doctor.support import clean_env, one, parse_report, run_doctor, write_config

CORP = {"name": "corp", "url": "http://127.0.0.1:9", "username": "alice"}


def test_nothing_blocking_exits_0_even_with_warnings(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", [CORP])
    result = run_doctor(
        ["--json", "--config", str(config), "--check", "config", "--check", "exclusions"],
        clean_env(),
    )
    doc = parse_report(result)
    assert result.returncode == 0, result.stderr
    assert [c["id"] for c in doc["checks"]] == ["config", "exclusions"]
    assert one(doc, "config")["status"] == "ok"
    # The default exclusions keep 10/8 & co. direct: a warning, which never blocks.
    exclusions = one(doc, "exclusions")
    assert exclusions["status"] == "warn"
    assert "10.0.0.0/8" in exclusions["summary"]
    assert "exclude" in exclusions["fix"] and str(config) in exclusions["fix"]
    assert doc["blocking"] is False


def test_a_blocking_problem_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_doctor(["--json", "--config", str(missing), "--check", "config"], clean_env())
    doc = parse_report(result)
    assert result.returncode == 1
    config = one(doc, "config")
    assert config["status"] == "fail"
    assert str(missing) in config["summary"] and "does not exist" in config["summary"]
    assert doc["blocking"] is True


def test_malformed_settings_name_the_field_and_skip_what_needs_them(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[relay]\nport = "eighty"\n', encoding="utf-8")
    result = run_doctor(
        ["--json", "--config", str(config), "--check", "config", "--check", "exclusions"],
        clean_env(),
    )
    doc = parse_report(result)
    assert result.returncode == 1
    assert "relay.port" in one(doc, "config")["summary"]
    exclusions = one(doc, "exclusions")
    assert exclusions["status"] == "skip" and "see config" in exclusions["summary"]


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    unknown = run_doctor(["--check", "no-such-check"], clean_env())
    assert unknown.returncode == 2
    assert "invalid choice" in unknown.stderr and "Traceback" not in unknown.stderr
    target = run_doctor(["--target", "pypi.org"], clean_env())
    assert target.returncode == 2
    assert "--target must be HOST:PORT" in target.stderr


def test_human_output_has_one_line_per_check_and_the_fix(tmp_path: Path) -> None:
    result = run_doctor(
        ["--config", str(tmp_path / "absent.toml"), "--check", "config", "--check", "wsl-tray"],
        clean_env(),
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tray-proxy doctor (tray-proxy ")
    assert lines[1].split()[:2] == ["FAIL", "config"]
    assert lines[2].strip().startswith("fix: start the tray app")
    assert lines[3].split()[:2] == ["skip", "wsl-tray"]
    assert lines[-1] == "1 problem(s) block tray-proxy (FAIL above); fix them first."


def test_every_check_answers_in_a_stripped_environment(tmp_path: Path) -> None:
    """The whole doctor with nothing set up: no settings, no D-Bus, no keyring, PATH of an
    empty directory, HOME and XDG dirs of its own. Every check answers (no traceback), the
    document follows the schema, and the verdict is "blocked"."""
    empty = tmp_path / "bin"
    empty.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(
        PATH=str(empty),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_RUNTIME_DIR=str(tmp_path),
    )
    result = run_doctor(["--json", "--target", "127.0.0.1:9"], env)
    doc = parse_report(result)
    assert result.returncode == 1
    ids = [c["id"] for c in doc["checks"]]
    from tray_proxy.doctor.model import CHECK_IDS

    assert ids == list(CHECK_IDS)
    assert one(doc, "config")["status"] == "fail"
    assert one(doc, "dbus")["status"] in ("warn", "fail")
    for check in doc["checks"]:
        assert not check["summary"].startswith("the check itself failed"), check


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`tray-proxy doctor | head -1`: no BrokenPipeError traceback, the exit status stays."""
    import subprocess
    import sys

    from tests.doctor.support import REPO

    argv = [sys.executable, "-m", "tray_proxy", "doctor", "--config",
            str(tmp_path / "absent.toml")]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stderr:
        proc.stdout.close()  # the reader is gone before the doctor writes anything
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
