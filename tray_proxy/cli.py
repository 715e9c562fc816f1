"""Command-line entry points: `tray-proxy run` (headless relay) and friends.

Composition root for the headless path: config -> credentials -> engine -> loop.
User-facing failures are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tray_proxy import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"tray-proxy: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tray-proxy",
        description="Carry every tool's HTTP(S) through the corporate proxy, no proxy settings.",
    )
    parser.add_argument("--version", action="version", version=f"tray-proxy {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="settings file (default: the per-user config.toml)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="log every connection (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the relay in the foreground (headless) until SIGINT/SIGTERM",
    )
    run.add_argument(
        "--no-redirect",
        action="store_true",
        help="do not touch nftables: the caller manages the redirect",
    )
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _run_relay(args: argparse.Namespace) -> int:
    from tray_proxy.config import ConfigError, default_config_path, load_config
    from tray_proxy.relay.credentials import SystemdCredentialSource
    from tray_proxy.relay.engine import RelayEngine, RelayStartError

    path = args.config or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"tray-proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not config.upstreams:
        print(
            f"tray-proxy: {path}: no [[upstream]] is defined; add the corporate proxy "
            "(see README, Configuration)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.no_redirect:
        print(
            "tray-proxy: applying the nftables redirect is not available in this build yet; "
            "run with --no-redirect and manage the redirect yourself",
            file=sys.stderr,
        )
        return EXIT_USAGE
    engine = RelayEngine(config.relay, config.upstreams, SystemdCredentialSource())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await engine.start()
    except RelayStartError as exc:
        print(f"tray-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in engine.addresses)
    upstream = engine.active_upstream
    print(f"tray-proxy: relay listening on {where}, upstream {upstream}", file=sys.stderr)
    sys.stderr.flush()
    await stop.wait()
    print("tray-proxy: stopping (draining open connections)", file=sys.stderr)
    await engine.stop()
    print("tray-proxy: stopped", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    if args.command == "run":
        from tray_proxy.relay.runner import new_fast_loop

        loop = new_fast_loop()
        try:
            return loop.run_until_complete(_run_relay(args))
        finally:
            loop.close()
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
