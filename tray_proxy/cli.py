"""Command-line entry points: `tray-proxy run` (headless relay) and friends.

Composition root for the headless path: config -> credentials -> the app's controller (its
one lifecycle, the relay on its own thread, the redirect, the history) -> loop, serving the
same control socket as the tray app.
User-facing failures are one line on stderr and a non-zero exit, never a traceback.

Must not import PySide6 at module level (the tray app is imported only when it starts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tray_proxy import __version__

if TYPE_CHECKING:
    from tray_proxy.config import Config
    from tray_proxy.config_watch import ConfigWatcher
    from tray_proxy.controller import ProxyController
    from tray_proxy.firewall.ruleset import RuleSpec
    from tray_proxy.instance import ControlServer
    from tray_proxy.keyring_store import AppCredentialSource
    from tray_proxy.relay.secrets import CredentialSource

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # status/enable/disable/quit: no tray-proxy instance runs


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
    # Without a subcommand `tray-proxy` starts the tray app (tray_proxy.app); these are its
    # options. Own dests, because a subparser's defaults would overwrite a shared one.
    parser.add_argument(
        "--config",
        dest="gui_config",
        metavar="FILE",
        type=Path,
        help="settings file for the tray app (default: the per-user config.toml)",
    )
    parser.add_argument(
        "--no-tray", action="store_true", help="show the main window instead of a tray icon"
    )
    parser.add_argument(
        "-v", "--verbose", dest="gui_verbose", action="count", default=0, help="log more"
    )
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
    status = sub.add_parser("status", help="show the state of the running tray app or run")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    sub.add_parser("enable", help="switch the running tray app's (or run's) redirect on")
    sub.add_parser("disable", help="switch the running tray app's (or run's) redirect off")
    sub.add_parser("quit", help="quit the running tray app or run (the redirect goes off)")
    sub.add_parser(
        "reload",
        help="apply the settings file to the running tray app or run (open connections stay)",
    )
    from tray_proxy import cli_credentials

    cli_credentials.add_subcommands(sub, common)
    from tray_proxy import cli_log

    cli_log.add_subcommand(sub, common)
    from tray_proxy import cli_rules

    cli_rules.add_subcommand(sub, common)
    from tray_proxy import cli_setup

    cli_setup.add_subcommand(sub, common)
    from tray_proxy import cli_unlock

    cli_unlock.add_subcommand(sub, common)
    from tray_proxy.doctor import cli as cli_doctor

    cli_doctor.add_subcommand(sub, common)
    return parser


def _control(args: argparse.Namespace) -> int:
    """status / enable / disable / quit / reload: talk to the running instance (the tray app or a
    headless `tray-proxy run`) over its control socket."""
    import json

    from tray_proxy.instance import ControlError, NotRunningError, send_command

    try:
        answer = send_command(args.command)
    except NotRunningError:
        print(
            "tray-proxy: no tray-proxy is running (start the tray app with `tray-proxy`, or "
            "the relay alone with `tray-proxy run`)",
            file=sys.stderr,
        )
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"tray-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not answer.get("ok"):
        print(f"tray-proxy: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    status = answer.get("status")
    if args.command == "reload":
        print(f"tray-proxy: {answer.get('message')}")
        return EXIT_OK
    if getattr(args, "json", False):
        print(json.dumps(status, indent=2))
    elif isinstance(status, dict):
        print(f"{status.get('state')}: {status.get('message')}")
        if args.command == "status":
            print(f"proxy: {status.get('upstream') or 'none set up'}")
            if status.get("routing"):
                print(f"routing: {status.get('routing')}")
            if status.get("captured"):
                print(f"captured: {status.get('captured')}")
            print(f"open connections: {status.get('active_connections')}")
            for error in status.get("last_errors") or []:
                count = error.get("count", 1)
                print(f"error: {error.get('text')}" + (f" ({count} times)" if count > 1 else ""))
    elif args.command == "quit":
        print("tray-proxy: quitting (the redirect goes off)")
    failed = isinstance(status, dict) and status.get("state") == "error"
    return EXIT_FAILURE if failed else EXIT_OK


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class _StderrSteps:
    """LifecycleSteps for the headless run: each step one line on stderr (tests and the lab
    wait for these lines; keep their wording)."""

    def relay_started(self, addresses: tuple[tuple[str, int], ...], upstream: str) -> None:
        where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
        _say(f"relay listening on {where}, upstream {upstream}")

    def redirect_on(self, spec: RuleSpec) -> None:
        ports = ", ".join(str(p) for p in spec.redirect_ports)
        _say(f"redirect on: TCP ports {ports} go to the relay")

    def removing_redirect(self) -> None:
        _say("removing the redirect")

    def draining(self) -> None:
        _say("stopping (draining open connections)")


_NO_STATUS = "`tray-proxy status` will not reach this run"


def _say(text: str) -> None:
    try:
        print(f"tray-proxy: {text}", file=sys.stderr)
        sys.stderr.flush()
    except OSError:
        # The terminal was closed (EIO) or the reader of a pipe left (EPIPE). The shutdown
        # that follows a SIGHUP must go on without its lines: a raise here reordered it, and
        # the clients never saw their connections end (issue 16, item 8).
        _stderr_to_devnull()


def _stderr_to_devnull() -> None:
    """Point fd 2 at /dev/null, so what is still buffered for it, the log lines and the exit
    flush write nowhere instead of failing again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        sys.stderr.flush()


def _stop_on_signal(stop: asyncio.Event, signum: int) -> None:
    if not stop.is_set():
        _say(f"{signal.Signals(signum).name}: stopping")
    stop.set()


def _claim_control(server: ControlServer) -> str:
    """Take the control socket for this run: "ours"; "tray": the tray app holds it, so this
    run must not start; "without": another run holds it (or it cannot be used), so this one
    goes on without it."""
    from tray_proxy.controller.commands import INSTANCE_TRAY
    from tray_proxy.instance import ControlError, send_command

    try:
        if server.claim():
            return "ours"
        answer = send_command("status", server.path)
    except (ControlError, OSError) as exc:
        _say(f"the control socket cannot be used ({exc}); {_NO_STATUS}")
        return "without"
    if answer.get("instance", INSTANCE_TRAY) == INSTANCE_TRAY:
        return "tray"
    # Another headless run (another config, another port) answers `tray-proxy status`.
    _say(f"another `tray-proxy run` holds {server.path}; `tray-proxy status` reaches that one")
    return "without"


async def _run_headless(args: argparse.Namespace) -> int:
    """`tray-proxy run`: the app's controller without the app. The same lifecycle (settings
    check, credentials, relay, then redirect on; on SIGINT/SIGTERM/SIGHUP, `tray-proxy quit`
    or a failure: redirect off for new connections, the relay drains, the helper ends and
    deletes its table), the same control socket, the same connection history."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in signals:
        # From the start, so a Ctrl+C while the settings or the keyring are read is no
        # traceback; SIGHUP too: a closed terminal window ends the run as SIGTERM does.
        loop.add_signal_handler(signum, _stop_on_signal, stop, signum)
    try:
        return await _run_headless_until(args, stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _run_headless_until(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from tray_proxy.config import ConfigError, default_config_path, load_config
    from tray_proxy.controller import ProxyController
    from tray_proxy.controller.commands import INSTANCE_RUN, answer_command, immediate_answer
    from tray_proxy.controller.engine_relay import loop_relay_factory
    from tray_proxy.controller.history import open_history_writer
    from tray_proxy.controller.managed_redirect import check_redirect_settings
    from tray_proxy.controller.services import ConfigFile
    from tray_proxy.controller.status import Notice, State, StateChanged
    from tray_proxy.firewall.client import RedirectController, RedirectError
    from tray_proxy.instance import ControlError, ControlServer, runtime_dir

    controller: ProxyController | None = None

    async def handle(command: str) -> dict[str, Any]:
        if controller is None:
            raise ValueError("tray-proxy run is still starting; try again in a moment")
        return await answer_command(controller, command, instance=INSTANCE_RUN, quit=stop.set)

    server: ControlServer | None = None
    try:
        server = ControlServer(
            handle,
            runtime_dir(),
            immediate=lambda command: immediate_answer(controller, command, instance=INSTANCE_RUN),
        )
    except (ControlError, OSError) as exc:
        _say(f"the control socket cannot be set up ({exc}); {_NO_STATUS}")
    if server is not None:
        holder = _claim_control(server)
        if holder == "tray":
            _say(
                f"tray-proxy is already running (the tray app holds {server.path}), and one "
                "redirect at a time can work. Quit the tray app (its menu's Quit, or "
                "`tray-proxy quit`) and start `tray-proxy run` again, or use the tray app."
            )
            return EXIT_USAGE
        if holder == "without":
            server = None
    try:
        path = args.config or default_config_path()
        setup = "tray-proxy setup" + (f" --config {args.config}" if args.config else "")
        if not path.exists():
            # A new user's first command: no "file not found", but the one that sets it up.
            _say(f"no proxy is set up yet ({path} does not exist); run `{setup}` first")
            return EXIT_USAGE
        try:
            config = load_config(path)
        except ConfigError as exc:
            _say(str(exc))
            return EXIT_USAGE
        if not config.upstreams:
            _say(
                f"{path}: no [[upstream]] is defined; run `{setup}` to add the corporate "
                "proxy (or see docs/config.md)"
            )
            return EXIT_USAGE
        if not args.no_redirect:
            try:
                check_redirect_settings(config)
            except RedirectError as exc:
                _say(f"{path}: {exc}")
                return EXIT_USAGE
        credentials, keyring_problem = await _credential_source(config)
        missing = _missing_password(
            config, credentials, keyring_problem, redirect=not args.no_redirect
        )
        if missing is not None:
            # Without it every connection would fail at the proxy, and with the redirect on
            # that is all web traffic: refuse before anything is switched on.
            _say(missing)
            return EXIT_USAGE
        if stop.is_set():  # a signal while the keyring was read: nothing is on yet
            _say("stopped")
            return EXIT_OK
        controller = ProxyController(
            ConfigFile(path),
            # The relay on this (uvloop) loop: one thread, as fast as the relay alone.
            loop_relay_factory(asyncio.get_running_loop(), credentials),
            None if args.no_redirect else RedirectController(),
            # Read again at each switch-on and when `credentials set` says so (bug 1).
            credentials=credentials.keyring,
            credential_source=credentials,
            steps=_StderrSteps(),
            # The same history as the app's, so `tray-proxy log` works for headless users;
            # the program behind each connection is looked up for it only.
            history=open_history_writer(config.log),
            attribution=config.log.enabled,
            monitor=config.log.enabled,
            headless=True,
            # Health probes and the off-network fallback (issue 15 sections 2 and 5).
            probes=True,
        )
        failure: list[str] = []

        def watch(event: object) -> None:
            # After a failure the controller has already switched everything off: end.
            if isinstance(event, StateChanged) and event.new is State.ERROR:
                failure.append(event.message)
                stop.set()
            elif isinstance(event, Notice):
                # What the app shows as a desktop notification (proxy down, credentials
                # rejected, history not written): a headless user reads it here.
                _say(f"{event.title}: {event.text}")

        settings_watch = _watch_settings(path, controller)
        try:
            controller.subscribe(watch)
            if server is not None:
                await server.start()
            await controller.enable()
            if not failure:
                settings_watch.start(content=_read_bytes(path))
                await stop.wait()
        finally:
            settings_watch.close()
            await controller.shutdown()
        for text in failure[:1]:
            _say(text)
        _say("stopped")
        return EXIT_FAILURE if failure else EXIT_OK
    finally:
        if server is not None:
            await server.close()


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _watch_settings(path: Path, controller: ProxyController) -> ConfigWatcher:
    """Edits of the settings file apply while running (issue 15 section 6); SIGHUP stops
    the run like SIGTERM (issue 16 item 8: a closed terminal), so the file watch and
    `tray-proxy reload` are the ways to reload (docs/config.md)."""
    from tray_proxy.config_watch import ConfigWatcher
    from tray_proxy.errors import UserError

    async def reload() -> None:
        try:
            answer = await controller.reload()
        except UserError as exc:
            _say(str(exc))
            return
        _say(str(answer.get("message")))

    def changed() -> None:
        controller.spawn(reload(), "reload settings")

    return ConfigWatcher(path, changed)


KEYRING_START_TIMEOUT = 15.0


async def _credential_source(config: Config) -> tuple[AppCredentialSource, str]:
    """The headless relay's passwords: $CREDENTIALS_DIRECTORY and the keyring, in the order
    `default_credential_source` documents, and what was wrong with the keyring ("" when
    nothing). A keyring that is missing or hangs is not fatal (a service usually has none);
    it is reported only when a password is then missing. The active upstream's missing
    password is `_missing_password`'s to report; a spare's is a warning here."""
    from tray_proxy.keyring_store import CredentialStoreError, default_credential_source

    source = default_credential_source(config)
    problem = ""
    try:
        await asyncio.wait_for(source.refresh(), KEYRING_START_TIMEOUT)
    except CredentialStoreError as exc:
        problem = str(exc)
    except asyncio.TimeoutError:
        problem = f"the keyring did not answer within {KEYRING_START_TIMEOUT:g} s"
    active = config.active_upstream()
    for upstream in config.upstreams:
        if active is not None and upstream.name == active.name:
            continue
        if upstream.username and source.get(upstream.name, upstream.username) is None:
            why = f" ({problem})" if problem else ""
            print(
                f"tray-proxy: no password for upstream {upstream.name} (user "
                f"{upstream.username}){why}; set it with `tray-proxy credentials set "
                f"{upstream.name}` or put it in $CREDENTIALS_DIRECTORY/{upstream.name}",
                file=sys.stderr,
            )
    return source, problem


def _missing_password(
    config: Config, source: CredentialSource, problem: str = "", *, redirect: bool = True
) -> str | None:
    """Why the active upstream cannot log in (None: it can): it has a `username` but no
    password is found, and no Kerberos ticket can stand in for one."""
    from tray_proxy.relay.settings import AuthScheme, UpstreamKind
    from tray_proxy.relay.spnego_auth import kerberos_available

    upstream = config.active_upstream()
    if upstream is None or upstream.username is None:
        return None
    if source.get(upstream.name, upstream.username) is not None:
        return None
    negotiate = upstream.kind is UpstreamKind.HTTP and upstream.auth in (
        AuthScheme.AUTO,
        AuthScheme.NEGOTIATE,
    )
    if negotiate and kerberos_available():
        return None  # Negotiate logs in with the ticket
    why = f" ({problem})" if problem else ""
    what = "the redirect was not switched on" if redirect else "the relay was not started"
    fix = f"set it with `tray-proxy credentials set {upstream.name}`"
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        # Under systemd the service's own credential is the usual place (docs/headless.md).
        fix += f" or as the service credential {os.path.join(directory, upstream.name)}"
    return (
        f"no password for {upstream.username} at proxy {upstream.name}{why}, so {what}; "
        f"{fix} and start again"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The `tray-proxy` command. Output cut short by its reader (`tray-proxy status | head
    -1`) is the reader's choice, not a failure: a quiet exit 0, no BrokenPipeError."""
    try:
        code = _main(argv)
        _flush_stdout()
    except SystemExit:  # argparse after --help / --version / a usage error
        _flush_stdout()
        raise
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_OK
    return code


def _flush_stdout() -> None:
    """Flush now, so a reader that went away shows here and not in the interpreter's last
    flush at exit ("Exception ignored ... BrokenPipeError", exit 120)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    # What is still buffered can go nowhere; the interpreter flushes stdout again at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from tray_proxy.app import run_gui

        _setup_logging(args.gui_verbose)
        return run_gui(args.gui_config, no_tray=args.no_tray)
    if args.command in ("status", "enable", "disable", "quit", "reload"):
        return _control(args)
    _setup_logging(args.verbose)
    if args.command == "credentials":
        from tray_proxy import cli_credentials

        return cli_credentials.run(args)
    if args.command == "log":
        from tray_proxy import cli_log

        return cli_log.run(args)
    if args.command == "rules":
        from tray_proxy import cli_rules

        return cli_rules.run(args)
    if args.command == "setup":
        from tray_proxy import cli_setup

        return cli_setup.run(args)
    if args.command == "unlock":
        from tray_proxy import cli_unlock

        return cli_unlock.run(args)
    if args.command == "doctor":
        from tray_proxy.doctor import cli as cli_doctor

        return cli_doctor.run(args)
    if args.command == "run":
        from tray_proxy.relay.runner import new_fast_loop

        loop = new_fast_loop()
        try:
            return loop.run_until_complete(_run_headless(args))
        finally:
            loop.close()
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
