"""`tray-proxy doctor [--json] [--check ID]... [--target HOST:PORT]`: what stands between
this machine and working web traffic through tray-proxy, each finding with its fix.

Exit 0 when nothing blocks (warnings do not), 1 when a check failed, 2 on bad usage or an
unreadable --config path argument. cli.py wires it in (`add_subcommand` in build_parser,
`run` in main). Must not import PySide6; nothing heavy at module level (`--help` stays fast).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

EXIT_OK = 0
EXIT_BLOCKED = 1
EXIT_USAGE = 2
COMMAND = "doctor"


def add_subcommand(
    subparsers: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add `doctor` to the CLI; `common` carries --config and -v."""
    from tray_proxy.doctor.model import CHECK_IDS

    parser = subparsers.add_parser(
        COMMAND,
        parents=[common],
        help="check everything tray-proxy needs and say how to fix what is missing",
        description="Check nftables, the root helper, polkit/sudo, the keyring, each proxy "
        "(a real tunnel with the stored login), TLS inspection, the running redirect and "
        "relay, IPv6, the exclusions and, on WSL, its settings. Exit status: 0 nothing "
        "blocks, 1 something blocks (a FAIL line), 2 bad usage. See docs/doctor.md.",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "--check",
        dest="checks",
        action="append",
        choices=CHECK_IDS,
        metavar="ID",
        help=f"run only this check (repeatable): {', '.join(CHECK_IDS)}",
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="where the proxy probes connect to (default: [probe] target of the settings, "
        "www.microsoft.com:443 unless set)",
    )


def _target(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    from tray_proxy.config import default_config_path
    from tray_proxy.doctor.context import DoctorEnv
    from tray_proxy.doctor.render import render_json, render_text
    from tray_proxy.doctor.runner import run_checks
    from tray_proxy.keyring_store import adopt_session_bus

    target: tuple[str, int] | None = None  # [probe] target of the settings
    if args.target is not None:
        parsed = _target(args.target)
        if parsed is None:
            print(
                f"tray-proxy doctor: --target must be HOST:PORT, like www.microsoft.com:443, "
                f"got {args.target!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        target = parsed
    # The bus `tray-proxy unlock` started (or systemd's, unexported) is the one the app and
    # `run` adopt when DBUS_SESSION_BUS_ADDRESS is unset: the doctor must look at the same one.
    adopt_session_bus()
    env = DoctorEnv(config_path=args.config or default_config_path(), probe_target=target)
    report = asyncio.run(run_checks(env, only=args.checks or ()))
    text = render_json(report) if args.json else render_text(report)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `tray-proxy doctor | head`: the reader left; the verdict (exit status) stands.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BLOCKED if report.blocking else EXIT_OK
