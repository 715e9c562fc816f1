"""`tray-proxy setup`: the first-run steps in a terminal (setup_flow.py does the work).

Interactive (a terminal): shows what discovery found and where, then asks for the proxy URL
(prefilled; a number picks a found one), a name for it, the user name and the password
(getpass: never echoed), runs a real test through the proxy and writes the settings.

For scripts and the installer: `tray-proxy setup --yes [--proxy URL] [--user NAME]
[--name NAME] [--password-stdin] [--test-target HOST:PORT]`; the password is the first line
of stdin, never argv or the environment. Without --proxy the first proxy found is used
(and said).

Exit codes: 0 done; 2 bad input or the test failed (one line on stderr says what); 1 the
keyring or the settings file could not be written, or the user cancelled.

Must not import PySide6, and nothing heavy at module level (`tray-proxy --help` stays fast).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tray_proxy.discovery import Discovery
    from tray_proxy.relay.secrets import Secret
    from tray_proxy.setup_flow import CheckedAnswers, Prefill, SetupFlow

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
COMMAND = "setup"
MAX_ROUNDS = 5  # interactive: answer, test, fix, test again... then give up


class UsageError(Exception):
    """Bad input or a failed test: exit 2."""


class Failure(Exception):
    """The keyring or the settings file could not be written: exit 1."""


def add_subcommand(
    subparsers: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add `setup` to the CLI; `common` carries --config and -v."""
    parser = subparsers.add_parser(
        COMMAND,
        parents=[common],
        help="first run: find the proxy, store your login, test it, write the settings",
        description="Finds the proxy in the environment (http_proxy, https_proxy) and, on WSL, "
        "in Windows' settings; asks for what it cannot know (your password, into the keyring); "
        "tests the proxy for real; writes the settings file.",
    )
    parser.add_argument("--proxy", metavar="URL", help="the proxy, like http://proxy.corp:8080")
    parser.add_argument("--user", metavar="NAME", help="proxy user name (none: no login)")
    parser.add_argument(
        "--name", metavar="NAME", help="a short name for this proxy (default: from its host)"
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin's first line (for scripts; never put it in argv)",
    )
    parser.add_argument(
        "--test-target",
        metavar="HOST:PORT",
        help="where the test asks the proxy to connect (kept as [probe] target)",
    )
    parser.add_argument(
        "--yes", action="store_true", help="ask nothing: use the options and what was found"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long the test waits (default: [probe] timeout, 10 s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tray-proxy setup`; returns the exit code."""
    try:
        return _setup(args)
    except UsageError as exc:
        _say_error(str(exc))
        return EXIT_USAGE
    except Failure as exc:
        _say_error(str(exc))
        return EXIT_FAILURE
    except (KeyboardInterrupt, EOFError):
        print(file=sys.stderr)
        _say_error("cancelled; nothing was changed")
        return EXIT_FAILURE


def _say_error(message: str) -> None:
    print(f"tray-proxy: {' '.join(message.split())}", file=sys.stderr)


def _out(text: str = "") -> None:
    print(text, flush=True)


def _setup(args: argparse.Namespace) -> int:
    from tray_proxy.config import default_config_path
    from tray_proxy.discovery import discover
    from tray_proxy.setup_flow import SetupError, SetupFlow, describe_discovery

    if args.timeout is not None and not 0 < args.timeout <= 300:
        raise UsageError("--timeout must be more than 0 and at most 300 seconds")
    interactive = not args.yes
    if interactive and not sys.stdin.isatty():
        raise UsageError(
            "stdin is not a terminal: run `tray-proxy setup` in a terminal, or pass --yes "
            "with --proxy URL, --user NAME and --password-stdin"
        )
    if args.password_stdin and interactive:
        raise UsageError("--password-stdin goes with --yes (a terminal is asked instead)")
    config_path: Path = args.config or default_config_path()
    flow = SetupFlow(config_path, timeout=args.timeout)
    try:
        flow.existing()  # a broken file stops here, before anything is asked
    except SetupError as exc:
        raise UsageError(str(exc)) from None

    _out("Looking for proxy settings (environment; on WSL, Windows' settings)...")
    discovery = discover()
    for line in describe_discovery(discovery):
        _out(line)
    prefill = flow.prefill(discovery)
    if interactive:
        return _interactive(flow, prefill, args)
    return _scripted(flow, prefill, discovery, args)


# --------------------------------------------------------------------------- --yes


def _scripted(
    flow: SetupFlow, prefill: Prefill, discovery: Discovery, args: argparse.Namespace
) -> int:
    from tray_proxy.setup_flow import SetupAnswers, SetupError

    proxy = args.proxy
    if proxy is None:
        if not prefill.proxy_url:
            raise UsageError(
                "no proxy was found in the environment or Windows' settings; pass --proxy URL"
            )
        proxy = prefill.proxy_url
        where = prefill.chosen.source if prefill.chosen is not None else str(flow.config_path)
        _out(f"Using {proxy} (from {where}).")
    user = args.user if args.user is not None else ""
    if user and not args.password_stdin:
        raise UsageError(f"--user {user} needs --password-stdin (the password on stdin)")
    if args.password_stdin and not user:
        raise UsageError("--password-stdin needs --user NAME")
    password = _password_from_stdin() if user else None
    answers = SetupAnswers(
        proxy_url=proxy,
        name=args.name or (prefill.name if proxy == prefill.proxy_url else ""),
        username=user,
        password=password,
        target=args.test_target or prefill.target,
        pac_url=prefill.pac_url,
    )
    try:
        checked = flow.check(answers)
    except SetupError as exc:
        raise UsageError(str(exc)) from None
    if not _test(flow, checked, "--test-target"):
        raise UsageError("the test failed; nothing was saved (see above)")
    return _save(flow, checked)


def _password_from_stdin() -> Secret:
    from tray_proxy import cli_credentials
    from tray_proxy.relay.secrets import Secret

    try:
        password = cli_credentials.password_from_stdin(
            "no password on stdin: pipe it as the first line"
        )
    except cli_credentials.UsageError as exc:
        raise UsageError(str(exc)) from None
    return Secret(password)


# --------------------------------------------------------------------------- a terminal


def _ask(prompt: str, default: str = "", check: Callable[[str], str | None] | None = None) -> str:
    """One answer; Enter takes the default. Bounded: a prompt answered wrongly five times
    in a row ends the setup."""
    shown = f"{prompt} [{default}]: " if default else f"{prompt}: "
    for _ in range(MAX_ROUNDS):
        answer = input(shown).strip() or default
        problem = check(answer) if check is not None else None
        if problem is None:
            return answer
        _out(f"  {problem}")
    raise UsageError(f"no usable answer to {prompt!r} after {MAX_ROUNDS} tries")


def _interactive(flow: SetupFlow, prefill: Prefill, args: argparse.Namespace) -> int:
    from tray_proxy.relay.secrets import Secret
    from tray_proxy.setup_flow import SetupAnswers, SetupError

    found = [f for f in prefill.discovery.found if f.proxy_url]
    _out()
    _out("Enter takes the value in [brackets].")
    proxy = args.proxy or prefill.proxy_url
    name = args.name or prefill.name
    user = args.user if args.user is not None else prefill.username
    target = args.test_target or prefill.target
    password: Secret | None = None
    for _round in range(MAX_ROUNDS):
        hint = " (or the number of one found above)" if found else ""
        answer = _ask(f"Proxy URL{hint}", proxy)
        if answer.isdigit() and found and 1 <= int(answer) <= len(prefill.discovery.found):
            picked = prefill.discovery.found[int(answer) - 1]
            answer = picked.proxy_url or proxy
            user = user or (picked.username or "")
        if answer != proxy:
            name = ""
        proxy = answer
        if not name:
            from tray_proxy.setup_flow import host_of, suggest_name

            name = suggest_name(host_of(proxy if "://" in proxy else f"http://{proxy}"))
        name = _ask("A short name for this proxy", name)
        user = _ask("User name (Enter with nothing: the proxy needs no login)", user)
        if user:
            secret = getpass.getpass(f"Password of {user} (not shown): ")
            password = Secret(secret) if secret else password
        target = _ask("Test target (a site the proxy allows)", target)
        answers = SetupAnswers(proxy, name, user, password, target, prefill.pac_url)
        try:
            checked = flow.check(answers)
        except SetupError as exc:
            _out(f"  {exc}")
            continue
        if _test(flow, checked, "the test target"):
            return _save(flow, checked)
        again = input("Change something and test again? [Y/n]: ").strip().lower()
        if again in ("n", "no"):
            raise UsageError("the test failed; nothing was saved")
    raise UsageError(f"no working settings after {MAX_ROUNDS} tries; nothing was saved")


# --------------------------------------------------------------------------- shared


def _test(flow: SetupFlow, checked: CheckedAnswers, target_control: str) -> bool:
    from tray_proxy.setup_flow import advice

    upstream = checked.upstream
    login = f" as {checked.credentials.username}" if checked.credentials else ""
    _out(f"Testing: {upstream.url}{login}, a tunnel to {checked.target_text}...")
    report = asyncio.run(flow.test(checked))
    _out(f"  {report.text}")
    if not report.ok:
        _out(f"  {advice(report.result, target_control)}")
    return report.ok


def _save(flow: SetupFlow, checked: CheckedAnswers) -> int:
    from tray_proxy.setup_flow import SetupFailed

    try:
        done = asyncio.run(flow.save(checked))
    except SetupFailed as exc:
        raise Failure(str(exc)) from None
    for line in done:
        _out(f"Done: {line}.")
    # A running tray app or `tray-proxy run` reads the new password now (its file watch
    # applies the new settings); nothing running is fine.
    from tray_proxy.cli_credentials import _tell_running_instance

    _tell_running_instance(checked.upstream.name)
    _out(
        "Next: start the tray app with `tray-proxy` (or the relay alone with `tray-proxy run`); "
        f"`tray-proxy credentials test {checked.upstream.name}` tests again."
    )
    return EXIT_OK
