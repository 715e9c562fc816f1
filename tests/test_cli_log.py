"""`tray-proxy log` as a user runs it: a subprocess of the installed entry point over a real
history file in a temporary XDG state dir. Filters, formats, --follow and Ctrl+C, bad
arguments, a missing history, a closed pipe, and the settings' [log] path.

Must not import PySide6.
"""

from __future__ import annotations

import csv
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tray_proxy.cli_log import parse_when
from tray_proxy.monitor.history import EXPORT_FIELDS, HistoryStore
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowState
from tray_proxy.relay.records import CloseReason

TRAY_PROXY = Path(sys.executable).with_name("tray-proxy")
KNOWN_PASSWORD = "Tr4y-pr0xy-cli-password-51e0"
# The rows' times are relative to when a test writes them (`fresh_now`), not to when this
# module was imported: a full run reaches these tests minutes after the import, and a
# "--since 5m" would then miss rows written "4.5 minutes ago".
NOW = time.time()


@pytest.fixture(autouse=True)
def fresh_now() -> None:
    global NOW
    NOW = time.time()


def row(i: int, **changes: object) -> ConnectionRow:
    failed = i % 5 == 4
    base = ConnectionRow(
        conn_id=i,
        started=NOW - 60 * (10 - i) + 30,  # one a minute, the last 9.5 minutes
        client=("127.0.0.1", 50_000 + i),
        original_dst=("93.184.216.34", 443),
        host=("pypi.org", "files.pythonhosted.org", "github.com")[i % 3],
        upstream=("corp", "backup")[i % 2],
        state=RowState.FAILED if failed else RowState.CLOSED,
        handshake_latency=None if failed else 0.025,
        bytes_up=1000 * i,
        bytes_down=5000 * i,
        ended=NOW - 60 * (10 - i) + 31,
        close_reason=CloseReason.UPSTREAM_REFUSED if failed else CloseReason.DONE,
        detail="HTTP/1.1 403 Forbidden" if failed else "",
        words="github.com:443: the proxy forbids this destination (403)." if failed else "",
        process=ProcessInfo(pid=3000 + i, name=("curl", "pip")[i % 2]),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e.pop("PYTHONWARNINGS", None)
    return e


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(tmp_path / "state" / "tray-proxy" / "history.sqlite3")
    store.write([row(i) for i in range(10)])
    store.write([row(100, started=NOW - 3 * 86400, ended=NOW - 3 * 86400 + 1)])  # 3 days ago
    yield store
    store.close()


def log(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRAY_PROXY), "log", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_human_output_newest_last_with_words_for_failures(
    env: dict[str, str], history: HistoryStore
) -> None:
    result = log(env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 11
    assert "files.pythonhosted.org:443" in lines[0]  # the 3-day-old one first
    assert "pip (3009)  pypi.org:443  via backup  FAILED" in lines[-1]
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 2
    assert all("upstream-refused" in f and "forbids this destination (403)" in f for f in failed)
    ok = lines[1]
    assert "curl (3000)" in ok and "pypi.org:443" in ok and "via corp" in ok
    assert "done" in ok and "25 ms" in ok
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "conn_ids"),
    [
        (["--host", "github.com"], [2, 5, 8]),
        (["--host", "*.pythonhosted.org"], [100, 1, 4, 7]),
        (["--host", "%python%"], [100, 1, 4, 7]),
        (["--process", "PIP"], [1, 3, 5, 7, 9]),
        (["--upstream", "backup"], [1, 3, 5, 7, 9]),
        (["--failed"], [4, 9]),
        (["--since", "1h"], list(range(10))),
        (["--since", "5m"], [5, 6, 7, 8, 9]),
        (["--until", "1d"], [100]),
        (["--limit", "3"], [7, 8, 9]),
        (["--limit", "0", "--failed", "--upstream", "corp"], [4]),
    ],
)
def test_filters(
    env: dict[str, str], history: HistoryStore, args: list[str], conn_ids: list[int]
) -> None:
    result = log(env, "--json", *args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    pids = [r["pid"] - 3000 for r in records]
    assert pids == conn_ids


def test_since_accepts_a_date(env: dict[str, str], history: HistoryStore) -> None:
    day = time.strftime("%Y-%m-%d", time.localtime(NOW - 86400))
    result = log(env, "--json", "--since", day)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 10
    assert parse_when("2026-01-02T03:04:05+00:00", "--since", NOW) == 1767323045.0


def test_json_and_csv_carry_every_field(env: dict[str, str], history: HistoryStore) -> None:
    as_json = [json.loads(line) for line in log(env, "--json").stdout.splitlines()]
    assert list(as_json[-1]) == list(EXPORT_FIELDS)
    last = as_json[-1]
    assert (last["host"], last["upstream"], last["state"]) == ("pypi.org", "backup", "failed")
    assert (last["bytes_up"], last["bytes_down"], last["close_reason"]) == (
        9000,
        45000,
        "upstream-refused",
    )
    result = log(env, "--csv", "--failed")
    records = list(csv.DictReader(io.StringIO(result.stdout)))
    assert result.stdout.splitlines()[0] == ",".join(EXPORT_FIELDS)
    assert [r["pid"] for r in records] == ["3004", "3009"]
    assert records[0]["words"].endswith("(403).")
    for text in (result.stdout, log(env, "--json", "--limit", "0").stdout):
        assert KNOWN_PASSWORD not in text


DIRECT_ROUTE = "direct (rule[0]: .corp.example -> direct)"
BLOCK_ROUTE = "block (rule[1]: *.ads.example -> block)"
PROXY_ROUTE = "proxy corp, backup (default)"


def test_the_route_decision_in_every_format_and_as_a_filter(
    env: dict[str, str], history: HistoryStore
) -> None:
    # Issue 15: a DIRECT or BLOCK row says so where the proxy goes; the exports carry the
    # whole decision, with the rule that made it.
    history.write(
        [
            row(200, started=NOW - 3, ended=NOW - 2, upstream=None, route=DIRECT_ROUTE),
            row(
                201,
                started=NOW - 2,
                ended=NOW - 2,
                host="x.ads.example",
                upstream=None,
                state=RowState.FAILED,
                close_reason=CloseReason.BLOCKED,
                bytes_up=0,
                bytes_down=0,
                handshake_latency=None,
                words="x.ads.example:443 is blocked by rule[1] (*.ads.example -> block).",
                route=BLOCK_ROUTE,
            ),
            row(202, started=NOW - 1, ended=NOW, route=PROXY_ROUTE),
        ]
    )
    lines = log(env, "--limit", "3").stdout.splitlines()
    assert len(lines) == 3
    assert "  github.com:443  direct  done  " in lines[0]
    assert "  x.ads.example:443  block  FAILED blocked  " in lines[1]
    assert "blocked by rule[1]" in lines[1]
    assert "  via corp  done  " in lines[2]  # through a proxy: its name, as before

    as_json = [json.loads(line) for line in log(env, "--json", "--limit", "4").stdout.splitlines()]
    assert [r["route"] for r in as_json] == ["", DIRECT_ROUTE, BLOCK_ROUTE, PROXY_ROUTE]
    as_csv = list(csv.DictReader(io.StringIO(log(env, "--csv", "--limit", "3").stdout)))
    assert [r["route"] for r in as_csv] == [DIRECT_ROUTE, BLOCK_ROUTE, PROXY_ROUTE]

    for text, pids in (
        ("block", [3201]),
        ("RULE[", [3200, 3201]),
        ("default", [3202]),
        ("pac", []),
    ):
        result = log(env, "--json", "--route", text, "--limit", "0")
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["pid"] for line in result.stdout.splitlines()] == pids


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--since", "yesterday"], "--since: cannot read 'yesterday'"),
        (["--until", "5x"], "--until: cannot read '5x'"),
        (["--since", "1h", "--until", "2h"], "--since: must be earlier than --until"),
        (["--limit", "-1"], "--limit: must be a whole number"),
        (["--limit", "many"], "--limit: must be a whole number"),
        (["--host", " "], "--host: must not be empty"),
        (["--route", ""], "--route: must not be empty"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    env: dict[str, str], history: HistoryStore, args: list[str], named: str
) -> None:
    result = log(env, *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tray-proxy log: {named}")
    assert result.stdout == ""


def test_json_and_csv_exclude_each_other(env: dict[str, str]) -> None:
    result = log(env, "--json", "--csv")
    assert result.returncode == 2
    assert "--csv: not allowed with argument --json" in result.stderr


def test_a_missing_history_says_where_it_looked(env: dict[str, str], tmp_path: Path) -> None:
    result = log(env)
    assert result.returncode == 0
    assert result.stdout == ""
    where = tmp_path / "state" / "tray-proxy" / "history.sqlite3"
    assert f"no connection history at {where}" in result.stderr
    assert "nothing has been recorded yet" in result.stderr
    assert not where.exists()  # reading never creates it


def test_the_settings_log_path_and_file_option(
    env: dict[str, str], tmp_path: Path, history: HistoryStore
) -> None:
    elsewhere = tmp_path / "elsewhere.sqlite3"
    with HistoryStore(elsewhere) as other:
        other.write([row(42)])
    config = tmp_path / "custom.toml"
    config.write_text(f'[log]\npath = "{elsewhere}"\n', encoding="utf-8")
    result = log(env, "--json", "--config", str(config))
    assert [json.loads(line)["pid"] for line in result.stdout.splitlines()] == [3042]
    # The per-user config is read too (XDG_CONFIG_HOME).
    user_config = tmp_path / "config" / "tray-proxy" / "config.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text(config.read_text(), encoding="utf-8")
    assert len(log(env, "--json").stdout.splitlines()) == 1
    # --file wins.
    default = tmp_path / "state" / "tray-proxy" / "history.sqlite3"
    assert len(log(env, "--json", "--file", str(default)).stdout.splitlines()) == 11
    # A broken settings file is named with its field.
    config.write_text("[log]\nmax_age_days = -1\n", encoding="utf-8")
    result = log(env, "--config", str(config))
    assert result.returncode == 2
    assert "log.max_age_days" in result.stderr


def test_a_corrupt_history_is_moved_aside_with_a_message(
    env: dict[str, str], tmp_path: Path
) -> None:
    where = tmp_path / "state" / "tray-proxy" / "history.sqlite3"
    where.parent.mkdir(parents=True)
    where.write_bytes(b"garbage" * 1000)
    result = log(env)
    assert result.returncode == 0
    assert str(where) in result.stderr and ".corrupt-" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(list(where.parent.glob("history.sqlite3.corrupt-*"))) == 1


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_follow_prints_new_rows_and_ctrl_c_ends_it(
    env: dict[str, str], history: HistoryStore
) -> None:
    proc = subprocess.Popen(
        [str(TRAY_PROXY), "log", "--follow", "--failed", "--limit", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        first = _read_line(proc, 15)
        assert "pip (3009)" in first
        # One row that does not match, one that does: only the second is printed.
        history.write([row(200, state=RowState.CLOSED, close_reason=CloseReason.DONE)])
        history.write([row(204, started=NOW)])
        line = _read_line(proc, 10)
        assert "(3204)" in line and "FAILED" in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert out == ""


def test_a_closed_pipe_ends_quietly(env: dict[str, str], history: HistoryStore) -> None:
    history.write([row(1000 + i) for i in range(5000)])
    proc = subprocess.Popen(
        [str(TRAY_PROXY), "log", "--limit", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        proc.wait(timeout=20)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0
    assert err == ""
