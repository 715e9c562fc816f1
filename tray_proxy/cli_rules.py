"""`tray-proxy rules`: the routing rules from a shell.

- `rules list`: the rules in order, the default, and the upstreams by priority.
- `rules test HOST[:PORT]` (`--ip`, `--url`): which rule or default decides a connection, and
  the decision (with the PAC script's answer when the default is "pac").
- `rules import-no-proxy [STRING]`: a NO_PROXY string (default: $no_proxy, else $NO_PROXY)
  as one DIRECT rule; shown, and added to the settings file with `--write` (last, or first
  with `--first`), through config.py's atomic writer.

Exit status: 0 done, 1 a failure (a file that cannot be written), 2 a bad argument or
settings file. Problems are one line on stderr.

cli.py wires it in (`add_subcommand` in build_parser, `run` in main).
Must not import PySide6, and nothing heavy at module level: `tray-proxy --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tray_proxy.config import Config
    from tray_proxy.routing.router import RoutingTable

__all__ = ["COMMAND", "add_subcommand", "run"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMAND = "rules"


def add_subcommand(
    subparsers: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add `rules` to the CLI; `common` carries --config and -v."""
    parser = subparsers.add_parser(
        COMMAND,
        help="show, test and import routing rules (which hosts go direct, blocked or proxied)",
        description="Routing rules ([[rule]] in the settings, docs/routing.md).",
    )
    sub = parser.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="the rules in order, the default, the upstreams")
    test = sub.add_parser(
        "test", parents=[common], help="which rule decides a connection to HOST[:PORT]"
    )
    test.add_argument("target", metavar="HOST[:PORT]", help="port 443 when left out")
    test.add_argument("--ip", metavar="ADDRESS", help="the destination address, for CIDR rules")
    test.add_argument("--url", help="the plain-HTTP request's URL, for the PAC script")
    imp = sub.add_parser(
        "import-no-proxy",
        parents=[common],
        help="turn a NO_PROXY string into a DIRECT rule",
        description="Turn a NO_PROXY string (default: $no_proxy, else $NO_PROXY) into one "
        "DIRECT rule. Shows it; --write adds it to the settings file.",
    )
    imp.add_argument("string", nargs="?", metavar="STRING", help="e.g. localhost,.corp,10.0.0.0/8")
    imp.add_argument("--write", action="store_true", help="add the rule to the settings file")
    imp.add_argument(
        "--first", action="store_true", help="add it before the other rules (default: last)"
    )


def run(args: argparse.Namespace) -> int:
    from tray_proxy.config import ConfigError

    try:
        if args.rules_command == "list":
            return _list(_load(args))
        if args.rules_command == "test":
            return _test(_load(args), args)
        return _import(args)
    except ConfigError as exc:
        print(f"tray-proxy rules: {exc}", file=sys.stderr)
        return EXIT_USAGE if not exc.problem.startswith("cannot save") else EXIT_FAILURE


def _config_path(args: argparse.Namespace) -> Path:
    from tray_proxy.config import default_config_path

    path: Path | None = getattr(args, "config", None)
    return path if path is not None else default_config_path()


def _load(args: argparse.Namespace) -> Config:
    from tray_proxy.config import load_config

    return load_config(_config_path(args))


def _list(config: Config) -> int:
    from tray_proxy.routing.router import RoutingTable

    routing = config.routing
    table = RoutingTable(routing, config.upstreams, config.relay.upstream)
    if not routing.rules:
        print("No rules: every connection follows the default.")
    for i, rule in enumerate(routing.rules):
        print(f"rule[{i}]  {rule.text}")
    if routing.default == "direct":
        default = "direct"
    elif routing.default == "pac":
        default = f"the PAC script {routing.pac_url} (when it fails: {_failover(table)})"
    else:
        default = _failover(table)
    print(f"default: {default}")
    print(f"when every upstream is down: {routing.when_unreachable}; order: {routing.policy}")
    return EXIT_OK


def _failover(table: RoutingTable) -> str:
    names = table.failover
    return "proxy " + ", ".join(names) if names else "direct (no upstream configured)"


def _test(config: Config, args: argparse.Namespace) -> int:
    from tray_proxy.routing.health import Health
    from tray_proxy.routing.router import Router, RoutingTable
    from tray_proxy.routing.rules import canonical_host

    target = _target(args.target)
    if target is None:
        print(
            f"tray-proxy rules: {args.target!r} is not HOST or HOST:PORT (IPv6: [2001:db8::1]:443)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    host, port = target
    if canonical_host(host) is None:
        print(f"tray-proxy rules: {host!r} is not a host name or address", file=sys.stderr)
        return EXIT_USAGE
    table = RoutingTable(config.routing, config.upstreams, config.relay.upstream)
    pac = None
    if config.routing.default == "pac" and config.routing.pac_url is not None:
        from tray_proxy.routing.pac_worker import PacScript

        pac = PacScript(config.routing.pac_url)
        status = pac.refresh(time.monotonic(), force=True)
        if status is not None and not status.ok:
            print(f"PAC script: {status.words}")
    try:
        router = Router(table, pac, Health())
        decision = router.decide(host, args.ip, port, args.url, time.monotonic())
    finally:
        if pac is not None:
            pac.close()
    print(decision.text)
    for name in decision.upstreams:
        upstream = router.upstream(name)
        if upstream is not None and name not in table.upstreams:
            login = router.credentials_name(name)
            how = f"login of {login}" if login else "no login"
            print(f"  {name}: {upstream.url} (from the PAC script, {how})")
    return EXIT_OK


def _target(text: str) -> tuple[str, int] | None:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            return None
        port_text = rest[1:] if rest.startswith(":") else "" if not rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if port_text is None or not host:
        return None
    if port_text == "":
        return host, 443
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    return host, int(port_text)


def _import(args: argparse.Namespace) -> int:
    from tray_proxy.config import load_config, save_config
    from tray_proxy.routing.noproxy import parse_no_proxy
    from tray_proxy.routing.rules import Action
    from tray_proxy.routing.settings import RuleSettings

    text: str | None = args.string
    if text is None:
        text = os.environ.get("no_proxy") or os.environ.get("NO_PROXY")
        if not text:
            print(
                "tray-proxy rules: no_proxy and NO_PROXY are not set; give the string as an "
                "argument, like `tray-proxy rules import-no-proxy localhost,.corp.example`",
                file=sys.stderr,
            )
            return EXIT_USAGE
    imported = parse_no_proxy(text)
    for item, why in imported.skipped:
        print(f"skipped {item!r}: {why}", file=sys.stderr)
    if not imported.patterns:
        print("tray-proxy rules: nothing to import", file=sys.stderr)
        return EXIT_USAGE
    rule = RuleSettings(imported.patterns, Action.DIRECT)
    print(f"[[rule]]  {rule.text}")
    if not args.write:
        print("(not written; add --write to put it in the settings file)")
        return EXIT_OK
    path = _config_path(args)
    config = load_config(path)
    rules = config.routing.rules
    if rule in rules:
        print(f"{path} already has this rule (rule[{rules.index(rule)}]); nothing changed")
        return EXIT_OK
    rules = (rule, *rules) if args.first else (*rules, rule)
    save_config(replace(config, routing=replace(config.routing, rules=rules)), path)
    where = 0 if args.first else len(rules) - 1
    print(f"written to {path} as rule[{where}]")
    return EXIT_OK
