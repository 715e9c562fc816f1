"""Numbers and times as the dashboard writes them: bytes, rates, latencies, durations, and a
connection row as text (the details pane and "Copy").

Pure functions, no widgets. Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import time

from tray_proxy.monitor.rows import ConnectionRow

_UNITS = ("B", "KB", "MB", "GB", "TB")


def fmt_bytes(n: float) -> str:
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def fmt_rate(bytes_per_second: float) -> str:
    return f"{fmt_bytes(bytes_per_second)}/s"


def fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    if ms >= 1000:  # "1937 ms" does not fit the Latency column; "1.9 s" does
        return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def fmt_duration(seconds: float | None) -> str:
    """Short enough for a narrow column: "0.3 s", "42 s", "4m05s", "2h05m"."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_clock(at: float | None) -> str:
    """Time of day (the tables: today's connections)."""
    return "-" if at is None else time.strftime("%H:%M:%S", time.localtime(at))


def fmt_stamp(at: float | None) -> str:
    """Date and time (the log and the details: rows from other days)."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def outcome_text(row: ConnectionRow) -> str:
    """What became of the connection: the failure in words, else the close reason."""
    if row.words:
        return row.words
    if row.close_reason is not None:
        return row.close_reason.value
    return row.state.value


def row_details(row: ConnectionRow) -> str:
    """Every field of a row, one per line (the details pane and "Copy details")."""
    process = row.process
    lines = [
        ("Connection", str(row.conn_id)),
        ("State", row.state.value),
        ("Started", fmt_stamp(row.started)),
        ("Ended", fmt_stamp(row.ended)),
        ("Duration", fmt_duration(row.duration)),
        ("Destination", row.destination),
        ("Host name", row.host or "- (no SNI or Host: seen)"),
        ("IP address", "-" if row.original_dst is None else f"{row.original_dst[0]}"),
        ("Port", "-" if row.original_dst is None else str(row.original_dst[1])),
        ("Client", f"{row.client[0]}:{row.client[1]}"),
        ("Process", "- (not found yet)" if process is None else process.label),
    ]
    if process is not None:
        lines += [
            ("Executable", process.exe or "-"),
            ("User", process.user or "-"),
        ]
        if process.container is not None:
            lines.append(("Container", process.container))
    lines += [
        ("Proxy", row.upstream or "-"),
        ("Tunnel opened", fmt_stamp(row.established)),
        ("Handshake latency", fmt_latency(row.handshake_latency)),
        ("Sent", f"{fmt_bytes(row.bytes_up)} ({row.bytes_up} bytes)"),
        ("Received", f"{fmt_bytes(row.bytes_down)} ({row.bytes_down} bytes)"),
        ("Close reason", "-" if row.close_reason is None else row.close_reason.value),
        ("Detail", row.detail or "-"),
        ("What happened", row.words or ("-" if row.ended is None else "Ended normally.")),
    ]
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in lines)
