"""The routing part of the settings file: `[routing]`, `[[rule]]` and `[[upstream]] priority`.

Validated here from the parsed TOML tables; config.py calls `parse_routing` and turns a
`RoutingConfigError` into its `ConfigError` (same field names), and writes the tables back
with `dump_routing`.

    [routing]
    default = "corp"          # an upstream's name, "direct" or "pac"; left out: the active
                              # upstream ([relay] upstream), failing over to the others
    pac_url = "http://wpad.corp.example/wpad.dat"   # or a file path, or file:///path
    when_unreachable = "direct"   # or "fail": never go direct when every upstream is down
    policy = "priority"           # or "latency": try the fastest upstream first

    [[rule]]
    match = ["*.corp.example", "10.0.0.0/8", ":8443"]
    action = "direct"             # "direct", "block" or an upstream's name

Must not import PySide6, the relay engine, config.py (it imports us) or tomllib.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import tomli_w

from tray_proxy.routing.rules import Action, Pattern, PatternError, parse_pattern

__all__ = [
    "DEFAULT_PAC",
    "POLICIES",
    "ROUTING_KEYS",
    "RULE_KEYS",
    "UNREACHABLE_CHOICES",
    "RoutingConfigError",
    "RoutingSettings",
    "RuleSettings",
    "dump_routing",
    "parse_pac_location",
    "parse_routing",
    "show_value",
    "toml_scalar",
]

ROUTING_KEYS = ("default", "pac_url", "when_unreachable", "policy", "probe_interval")
DEFAULT_PROBE_INTERVAL = 30.0
MAX_PROBE_INTERVAL = 86_400.0
RULE_KEYS = ("match", "action")
UNREACHABLE_CHOICES = ("direct", "fail")
POLICIES = ("priority", "latency")
DEFAULT_PAC = "pac"
_KEYWORDS = {"direct": Action.DIRECT, "block": Action.BLOCK}
_MAX_RULES = 10_000
_MAX_PATTERNS = 10_000


class RoutingConfigError(ValueError):
    """A routing setting that cannot be used: `field` is its dotted path (`rule[3].match[1]`),
    `problem` what is wrong and what is expected."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """One `[[rule]]`: its patterns (parsed, in order) and its action; `upstream` is the
    upstream's name for a PROXY rule, else None."""

    patterns: tuple[Pattern, ...]
    action: Action
    upstream: str | None = None

    @property
    def action_text(self) -> str:
        return self.upstream if self.upstream is not None else self.action.value

    @property
    def text(self) -> str:
        """One line for the history and `tray-proxy rules list`: `*.corp, :8443 -> direct`."""
        return f"{', '.join(p.text for p in self.patterns)} -> {self.action_text}"


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """How connections are routed. All defaults: every connection goes to the active upstream,
    failing over to the others by priority, and direct when none is reachable.

    `default`: None (the active upstream first, then the others), an upstream's name, "direct"
    or "pac". `priorities`: (name, priority) for the upstreams that set one; the others have
    their place in the file (0, 1, ...) as priority. Lower goes first; ties go by place.
    """

    pac_url: str | None = None
    default: str | None = None
    when_unreachable: str = "direct"
    policy: str = "priority"
    rules: tuple[RuleSettings, ...] = ()
    priorities: tuple[tuple[str, int], ...] = ()
    # Seconds between health probes of each upstream (controller/routing_watch.py); 0: off.
    probe_interval: float = DEFAULT_PROBE_INTERVAL


def parse_routing(
    routing: Mapping[str, object],
    rules: object,
    upstreams: Sequence[Mapping[str, object]],
    names: Sequence[str],
) -> RoutingSettings:
    """Validate `[routing]`, the `[[rule]]` array and each `[[upstream]]`'s `priority`.

    `names` are the upstreams' (already validated) names in file order. RoutingConfigError
    names the first bad field.
    """
    for key in routing:
        if key not in ROUTING_KEYS:
            raise RoutingConfigError(
                f"routing.{key}", f"unknown key; known keys: {', '.join(ROUTING_KEYS)}"
            )
    pac_url = routing.get("pac_url")
    if pac_url is not None:
        pac_url = parse_pac_location(pac_url, "routing.pac_url")
    default = routing.get("default")
    if default is not None:
        default = _target(default, "routing.default", names, allow_pac=True)
        if default == DEFAULT_PAC and pac_url is None:
            raise RoutingConfigError(
                "routing.default", '"pac" needs routing.pac_url (the PAC script\'s URL or file)'
            )
    when = _choice(
        routing.get("when_unreachable", "direct"), "routing.when_unreachable", UNREACHABLE_CHOICES
    )
    policy = _choice(routing.get("policy", "priority"), "routing.policy", POLICIES)
    interval = routing.get("probe_interval", DEFAULT_PROBE_INTERVAL)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or not (interval == 0 or 5 <= interval <= MAX_PROBE_INTERVAL)
    ):
        raise RoutingConfigError(
            "routing.probe_interval",
            f"must be 0 (no health probes) or seconds from 5 to {MAX_PROBE_INTERVAL:g}, "
            f"got {show_value(interval)}",
        )
    return RoutingSettings(
        pac_url=pac_url,
        default=default,
        when_unreachable=when,
        policy=policy,
        probe_interval=float(interval),
        rules=_rules(rules, names),
        priorities=_priorities(upstreams, names),
    )


def parse_pac_location(value: object, field: str) -> str:
    """A PAC script's place: an http(s):// or file:// URL, or an absolute file path (or one
    starting with ~/). Never quoted back: a URL may hold a login."""
    example = 'must be a URL like "http://wpad.corp.example/wpad.dat" or a file path'
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise RoutingConfigError(field, example)
    if value.startswith(("/", "~/")):
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https", "file") or not rest:
        raise RoutingConfigError(
            field, "must start with http://, https:// or file://, or be an absolute file path"
        )
    if "@" in rest.split("/", 1)[0]:
        raise RoutingConfigError(field, "must not contain a user name or password (user:pass@)")
    return value


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = " or ".join(f'"{c}"' for c in choices)
        raise RoutingConfigError(field, f"must be {allowed}, got {show_value(value)}")
    return value


def _target(value: object, field: str, names: Sequence[str], *, allow_pac: bool) -> str:
    keywords = ['"direct"', '"block"'] if not allow_pac else ['"direct"', '"pac"']
    defined = ", ".join(f'"{n}"' for n in names) if names else "none (add [[upstream]])"
    expected = f"must be {' or '.join(keywords)} or an upstream's name (defined: {defined})"
    if not isinstance(value, str):
        raise RoutingConfigError(field, f"{expected}, got {show_value(value)}")
    lowered = value.lower()
    if lowered == "direct" or (allow_pac and lowered == DEFAULT_PAC):
        return lowered
    if not allow_pac and lowered == "block":
        return lowered
    if value not in names:
        raise RoutingConfigError(field, f"{expected}, got {show_value(value)}")
    return value


def _rules(value: object, names: Sequence[str]) -> tuple[RuleSettings, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise RoutingConfigError(
            "rule", f"must be tables written [[rule]], got {show_value(value)}"
        )
    if len(value) > _MAX_RULES:
        raise RoutingConfigError("rule", f"at most {_MAX_RULES} rules, got {len(value)}")
    out: list[RuleSettings] = []
    for i, doc in enumerate(value):
        at = f"rule[{i}]"
        for key in doc:
            if key not in RULE_KEYS:
                raise RoutingConfigError(
                    f"{at}.{key}", f"unknown key; known keys: {', '.join(RULE_KEYS)}"
                )
        for key in RULE_KEYS:
            if key not in doc:
                raise RoutingConfigError(f"{at}.{key}", "is required")
        match = doc["match"]
        if isinstance(match, str):
            match = [match]
        if not isinstance(match, list) or not match or len(match) > _MAX_PATTERNS:
            raise RoutingConfigError(
                f"{at}.match",
                'must be a non-empty array of patterns like ["*.corp.example", "10.0.0.0/8", '
                f'":8443"], got {show_value(match)}',
            )
        patterns: list[Pattern] = []
        for j, item in enumerate(match):
            if not isinstance(item, str):
                raise RoutingConfigError(
                    f"{at}.match[{j}]", f"must be a string, got {show_value(item)}"
                )
            try:
                patterns.append(parse_pattern(item))
            except PatternError as exc:
                raise RoutingConfigError(f"{at}.match[{j}]", str(exc)) from None
        target = _target(doc["action"], f"{at}.action", names, allow_pac=False)
        if target in _KEYWORDS:
            out.append(RuleSettings(tuple(patterns), _KEYWORDS[target]))
        else:
            out.append(RuleSettings(tuple(patterns), Action.PROXY, target))
    return tuple(out)


def _priorities(
    upstreams: Sequence[Mapping[str, object]], names: Sequence[str]
) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for i, (doc, name) in enumerate(zip(upstreams, names, strict=True)):
        value = doc.get("priority")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
            raise RoutingConfigError(
                f"upstream[{i}].priority",
                f"must be an integer 0-1000000 (lower is tried first), got {show_value(value)}",
            )
        out.append((name, value))
    return tuple(out)


def dump_routing(settings: RoutingSettings) -> list[str]:
    """The `[routing]` table and the `[[rule]]` tables as TOML lines (no leading blank line);
    empty when everything is default. `parse_routing` reads them back to equal settings."""
    routing: list[tuple[str, object]] = []
    if settings.default is not None:
        routing.append(("default", settings.default))
    if settings.pac_url is not None:
        routing.append(("pac_url", settings.pac_url))
    if settings.when_unreachable != "direct":
        routing.append(("when_unreachable", settings.when_unreachable))
    if settings.policy != "priority":
        routing.append(("policy", settings.policy))
    if settings.probe_interval != DEFAULT_PROBE_INTERVAL:
        routing.append(("probe_interval", settings.probe_interval))
    lines: list[str] = []
    if routing:
        lines += ["[routing]", *(f"{k} = {toml_scalar(v)}" for k, v in routing)]
    for rule in settings.rules:
        match = ", ".join(toml_scalar(p.text) for p in rule.patterns)
        if lines:
            lines.append("")
        lines += ["[[rule]]", f"match = [{match}]", f"action = {toml_scalar(rule.action_text)}"]
    return lines


def toml_scalar(value: object) -> str:
    """One TOML value as it is written after `key = ` (config.py's writer uses it too)."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def show_value(value: object) -> str:
    """A short description of a value for an error message (never used for URLs). Shared
    with config.py, which may import routing (routing may not import config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"
