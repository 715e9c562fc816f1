"""`tray-proxy credentials set|delete|test NAME`: manage an upstream's password from a shell.

The password never comes from argv: from a terminal it is asked twice with getpass, from a
pipe it is the first line of stdin. `test` sends one real CONNECT (or SOCKS5 handshake)
through the upstream with the credentials the relay would use, in the relay's order.
Failures are one line on stderr: exit 2 for a usage or config problem, 1 for the rest.

cli.py wires it in (`add_subcommands` in build_parser, `run` in main).
Must not import PySide6, and nothing heavy at module level: `tray-proxy --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tray_proxy.config import Config
    from tray_proxy.relay.probe import ProbeResult
    from tray_proxy.relay.settings import UpstreamProxy

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMAND = "credentials"
# A host every corporate proxy lets through, and that developers need anyway (pip).
DEFAULT_PROBE_TIMEOUT = 10.0
_MAX_LINE = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UsageError(Exception):
    """A problem with what the user typed or configured: exit 2."""


class Failure(Exception):
    """The command could not do its job: exit 1."""


def add_subcommands(
    subparsers: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
) -> None:
    """Add `credentials set|delete|test` to the CLI; `common` carries --config and -v."""
    parser = subparsers.add_parser(
        COMMAND,
        help="store, delete or test the password of an upstream proxy (kept in the keyring)",
        description="The password is kept in the desktop keyring (Secret Service), never in "
        "the config file. Under systemd the relay also reads $CREDENTIALS_DIRECTORY/NAME.",
    )
    actions = parser.add_subparsers(dest="credentials_command", metavar="ACTION", required=True)
    set_ = actions.add_parser(
        "set",
        parents=[common],
        help="store the password of upstream NAME (asked on the terminal, or stdin's first line)",
    )
    set_.add_argument("name", metavar="NAME", help="the upstream's name in the config")
    set_.add_argument(
        "-u",
        "--username",
        help="proxy user name (default: the upstream's `username` in the config)",
    )
    delete = actions.add_parser(
        "delete", parents=[common], help="remove the stored password of upstream NAME"
    )
    delete.add_argument("name", metavar="NAME")
    test = actions.add_parser(
        "test",
        parents=[common],
        help="connect through upstream NAME with its stored credentials and say how it went",
    )
    test.add_argument("name", metavar="NAME")
    test.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=None,
        help="where to ask the proxy to connect (default: the settings' [probe] target, "
        "www.microsoft.com:443 unless set)",
    )
    test.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default: {DEFAULT_PROBE_TIMEOUT:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tray-proxy credentials ...`; returns the exit code."""
    action = {"set": _set, "delete": _delete, "test": _test}[args.credentials_command]
    try:
        return action(args)
    except UsageError as exc:
        _say_error(str(exc))
        return EXIT_USAGE
    except Failure as exc:
        _say_error(str(exc))
        return EXIT_FAILURE
    except (KeyboardInterrupt, EOFError):  # Ctrl-C, or Ctrl-D at the password prompt
        _say_error("cancelled; nothing was changed")
        return EXIT_FAILURE


def _say_error(message: str) -> None:
    print(f"tray-proxy: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tray_proxy.cli_credentials ACTION ...`: the same commands without cli.py."""
    import logging

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", type=Path, help="settings file")
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    parser = argparse.ArgumentParser(prog="tray-proxy")
    add_subcommands(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING if args.verbose <= 0 else logging.DEBUG)
    return run(args)


# --------------------------------------------------------------------------- set


def _set(args: argparse.Namespace) -> int:
    from tray_proxy.keyring_store import CredentialStore, CredentialStoreError
    from tray_proxy.relay.secrets import Secret
    from tray_proxy.relay.settings import UpstreamKind

    config = _load(args.config)
    upstream = _upstream(config, args.name)
    username = _username(config, upstream, args.username)
    password = _read_password(upstream, username)
    if upstream.kind is UpstreamKind.SOCKS5 and len(password.encode("utf-8")) > 255:
        raise UsageError("the password is longer than 255 bytes, which SOCKS5 cannot carry")

    async def store() -> str:
        keyring = CredentialStore()
        await keyring.set(upstream.name, username, Secret(password))
        return await keyring.backend_description()

    try:
        where = asyncio.run(store())
    except CredentialStoreError as exc:
        raise Failure(str(exc)) from None
    print(f"tray-proxy: stored the password of {username} for {upstream} in {where}")
    _tell_running_instance(upstream.name)
    return EXIT_OK


def _username(config: Config, upstream: UpstreamProxy, given: str | None) -> str:
    from tray_proxy.relay.settings import UpstreamKind

    where = config.path or "the config"
    if given is None:
        if upstream.username is None:
            raise UsageError(
                f"upstream {upstream.name} has no `username` in {where}; pass --username "
                "USER (or add `username` to its [[upstream]])"
            )
        return upstream.username
    if upstream.username is not None and given != upstream.username:
        raise UsageError(
            f'upstream {upstream.name} has username = "{upstream.username}" in {where}, '
            f"not {given}; change it there first, or leave out --username"
        )
    if not given or not given.isprintable() or len(given.encode("utf-8")) > 255:
        raise UsageError("the user name must be 1-255 bytes with no control characters")
    if upstream.kind is UpstreamKind.HTTP and ":" in given:
        # RFC 7617 section 2: a Basic user-id cannot contain a colon.
        raise UsageError('the user name must not contain ":" (HTTP Basic cannot carry it)')
    return given


def password_from_stdin(missing: str) -> str:
    """The password piped as the first line of stdin (its line ending removed), for
    `credentials set` and `setup --password-stdin`. Raises UsageError with `missing` when
    there is none; the line is read with a bound, so an endless stream is refused."""
    stream = sys.stdin.buffer if sys.stdin is not None else None
    raw = stream.readline(_MAX_LINE + 1) if stream is not None else b""
    if len(raw) > _MAX_LINE:
        raise UsageError(f"the password line on stdin is longer than {_MAX_LINE} bytes")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the password on stdin is not UTF-8 text") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError(missing)
    return password


def _read_password(upstream: UpstreamProxy, username: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        prompt = f"Password of {username} for {upstream}: "
        first = getpass.getpass(prompt)
        if not first:
            raise UsageError("empty password; nothing was stored")
        if getpass.getpass("Repeat it: ") != first:
            raise UsageError("the two passwords differ; nothing was stored")
        return first
    password = password_from_stdin(
        "no password on stdin: pipe it as the first line (printf '%s\\n' \"$PW\" | "
        "tray-proxy credentials set NAME), or run from a terminal to be asked"
    )
    if "\0" in password:
        raise UsageError("the password contains a NUL character")
    return password


# --------------------------------------------------------------------------- delete


def _delete(args: argparse.Namespace) -> int:
    from tray_proxy.keyring_store import CredentialStore, CredentialStoreError

    name = args.name
    # The config is not needed: an upstream removed from it may still have an entry.
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise UsageError("NAME must be an upstream name: 1-64 letters, digits, '.', '_' or '-'")
    try:
        deleted = asyncio.run(CredentialStore().delete(name))
    except CredentialStoreError as exc:
        raise Failure(str(exc)) from None
    if not deleted:
        raise Failure(f"no password is stored for {name}; nothing was deleted")
    print(f"tray-proxy: deleted the stored password of {name}")
    _tell_running_instance(name)
    return EXIT_OK


# How long the running instance may take to read the keyring again (its own limit is 30 s).
NOTICE_TIMEOUT = 40.0


def _tell_running_instance(name: str) -> None:
    """Tell the running tray app or `tray-proxy run` that NAME's password changed, so it
    reads it again now instead of at its next start (issue 14 bug 1). Only the name goes
    over the control socket. Nothing running is fine: the next start reads the keyring."""
    from tray_proxy.controller.commands import credentials_changed_command
    from tray_proxy.instance import ControlError, NotRunningError, send_command

    try:
        answer = send_command(credentials_changed_command(name), timeout=NOTICE_TIMEOUT)
    except NotRunningError:
        return
    except (ControlError, ValueError) as exc:
        _say_error(
            f"the running tray-proxy was not told ({exc}); switch its redirect off and on "
            "(`tray-proxy disable`, then `tray-proxy enable`) to use the new password"
        )
        return
    if not answer.get("ok"):
        _say_error(f"the running tray-proxy could not read the new password: {answer.get('error')}")
    elif answer.get("in_use"):
        print(f"tray-proxy: the running tray-proxy uses it for {name} from now on")
    else:
        print("tray-proxy: the running tray-proxy has read it")


# --------------------------------------------------------------------------- test


def _test(args: argparse.Namespace) -> int:
    from tray_proxy.keyring_store import CredentialStoreError, default_credential_source

    config = _load(args.config)
    upstream = _upstream(config, args.name)
    # The settings' [probe] target by default: the one the app's Test connection uses.
    target = parse_target(args.target) if args.target else config.probe.target
    target_text = args.target or config.probe.target_text
    if not 0 < args.timeout <= 300:
        raise UsageError("--timeout must be more than 0 and at most 300 seconds")

    async def probe() -> ProbeResult:
        from tray_proxy.relay.probe import probe_upstream

        source = default_credential_source(config)
        problem: str | None = None
        try:
            await source.refresh()
        except CredentialStoreError as exc:
            problem = str(exc)
        creds = source.get(upstream.name, upstream.username)
        if creds is None and upstream.username is not None:
            if problem is not None:
                raise Failure(problem)
            raise Failure(
                f"no password is stored for {upstream.username} at {upstream.name}; store "
                f"one with `tray-proxy credentials set {upstream.name}`"
            )
        return await probe_upstream(upstream, creds, target, args.timeout)

    result = asyncio.run(probe())
    print(f"tray-proxy: {upstream.name} ({upstream.url}) to {target_text}: {result.words}")
    return EXIT_OK if result.ok else EXIT_FAILURE


def parse_target(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); UsageError otherwise."""
    example = "HOST:PORT, like pypi.org:443 or [2001:db8::1]:443"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise UsageError(f"--target must be {example}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError("--target: the host in [...] must be an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host or ":" in host:
            raise UsageError(f"--target must be {example}")
        if not host.isascii() or not all(c.isalnum() or c in ".-_" for c in host):
            raise UsageError("--target: the host must be a DNS name or an IP address")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError("--target: the port must be a number 1-65535")
    return host, int(port_text)


# --------------------------------------------------------------------------- shared


def _load(path: Path | None) -> Config:
    from tray_proxy.config import ConfigError, default_config_path, load_config

    where = path or default_config_path()
    if not where.exists():
        # A new user's first try: not "file not found", but the command that sets it up.
        setup = "tray-proxy setup" + (f" --config {path}" if path else "")
        raise UsageError(
            f"no proxy is set up yet ({where} does not exist); run `{setup}`, which asks "
            "for the password too"
        )
    try:
        return load_config(where)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _upstream(config: Config, name: str) -> UpstreamProxy:
    for upstream in config.upstreams:
        if upstream.name == name:
            return upstream
    names = ", ".join(u.name for u in config.upstreams) or "none (add an [[upstream]])"
    raise UsageError(f"{name!r} is not an upstream in {config.path}; defined: {names}")


if __name__ == "__main__":
    sys.exit(main())
