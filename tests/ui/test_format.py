"""How numbers, times and rows are written for the user."""

from __future__ import annotations

from tray_proxy.monitor.rows import ProcessInfo
from tray_proxy.relay.records import CloseReason
from tray_proxy.ui.format import (
    fmt_bytes,
    fmt_duration,
    fmt_latency,
    fmt_rate,
    outcome_text,
    row_details,
)

from .conftest import closed, make_row


def test_numbers() -> None:
    assert [fmt_bytes(n) for n in (0, 999, 1000, 1_500_000, 3e12, 5e15)] == [
        "0 B",
        "999 B",
        "1.0 KB",
        "1.5 MB",
        "3.0 TB",
        "5000.0 TB",
    ]
    assert fmt_rate(2_000_000) == "2.0 MB/s"
    assert [fmt_latency(s) for s in (None, 0.0042, 0.0123, 0.9994, 1.5, 250)] == [
        "-",
        "4.2 ms",
        "12 ms",
        "999 ms",
        "1.5 s",  # a cold proxy's password check: "1500 ms" was cut off in the column
        "250 s",
    ]
    assert [fmt_duration(s) for s in (None, 0.31, 42.4, 245, 7500)] == [
        "-",
        "0.3 s",
        "42 s",
        "4m05s",
        "2h05m",
    ]


def test_outcome_is_the_words_else_the_reason() -> None:
    assert outcome_text(make_row(1)) == "open"
    assert outcome_text(closed(make_row(1))) == "done"
    failed = closed(make_row(1), CloseReason.UPSTREAM_TIMEOUT)
    assert outcome_text(failed) == failed.words and failed.words


def test_details_of_a_row_without_process_or_destination() -> None:
    text = row_details(make_row(1, process=None, original_dst=None, host=None))
    assert "Process:           - (not found yet)" in text
    assert "Destination:       ?" in text
    assert "Host name:         - (no SNI or Host: seen)" in text
    container = row_details(make_row(2, process=ProcessInfo(pid=None, name="?", container="web-1")))
    assert "container web-1" in container and "Container:" in container
