"""[routing], [[rule]] and [[upstream]] priority through the real settings parser (config.py
calls tray_proxy/routing/settings.py): values, errors that name the field, writing back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tray_proxy.config import ConfigError, dump_config, parse_config
from tray_proxy.routing.rules import Action, PatternKind
from tray_proxy.routing.settings import (
    RoutingConfigError,
    RoutingSettings,
    dump_routing,
    parse_routing,
)

UPSTREAMS = """
[[upstream]]
name = "corp"
url = "http://proxy.corp.example:3128"

[[upstream]]
name = "backup"
url = "socks5://proxy2.corp.example:1080"
priority = 0
"""

PORTS = (32768, 60999)


def _parse(text: str) -> RoutingSettings:
    return parse_config(text + UPSTREAMS, "t.toml", local_port_range=PORTS).routing


def test_defaults() -> None:
    routing = _parse("")
    assert routing == RoutingSettings(priorities=(("backup", 0),))
    assert routing.when_unreachable == "direct"
    assert routing.policy == "priority"
    assert routing.default is None
    assert routing.probe_interval == 30.0


def test_everything_set() -> None:
    routing = _parse(
        """
[routing]
default = "pac"
pac_url = "file:///etc/tray-proxy/proxy.pac"
when_unreachable = "fail"
policy = "latency"

[[rule]]
match = ["*.Corp.Example", "10.0.0.0/8", ":8443"]
action = "DIRECT"

[[rule]]
match = "ads.example"
action = "block"

[[rule]]
match = [".eu.example"]
action = "backup"
"""
    )
    assert routing.default == "pac"
    assert routing.pac_url == "file:///etc/tray-proxy/proxy.pac"
    assert (routing.when_unreachable, routing.policy) == ("fail", "latency")
    first, second, third = routing.rules
    assert [p.kind for p in first.patterns] == [
        PatternKind.SUBDOMAIN,
        PatternKind.NETWORK,
        PatternKind.PORT,
    ]
    assert first.action is Action.DIRECT and first.upstream is None
    assert first.text == "*.corp.example, 10.0.0.0/8, :8443 -> direct"
    assert second.action is Action.BLOCK
    assert third.action is Action.PROXY and third.upstream == "backup"
    assert third.text == ".eu.example -> backup"


@pytest.mark.parametrize(
    "pac_url", ["http://wpad/wpad.dat", "HTTPS://wpad/x.pac", "/etc/proxy.pac", "~/proxy.pac"]
)
def test_pac_locations(pac_url: str) -> None:
    assert _parse(f'[routing]\npac_url = "{pac_url}"').pac_url == pac_url


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('[routing]\ndefualt = "direct"', "routing.defualt", 'did you mean "default"'),
        ('[routing]\ndefault = "nope"', "routing.default", 'defined: "corp", "backup"'),
        ("[routing]\ndefault = 3", "routing.default", "got 3"),
        ('[routing]\ndefault = "pac"', "routing.default", "needs routing.pac_url"),
        ('[routing]\ndefault = "block"', "routing.default", 'must be "direct" or "pac"'),
        ('[routing]\nwhen_unreachable = "maybe"', "routing.when_unreachable", '"direct" or "fail"'),
        ('[routing]\npolicy = "random"', "routing.policy", '"priority" or "latency"'),
        ("[routing]\nprobe_interval = 2", "routing.probe_interval", "from 5 to 86400, got 2"),
        ("[routing]\nprobe_interval = true", "routing.probe_interval", "got true"),
        ('[routing]\nprobe_interval = "30"', "routing.probe_interval", "got "),
        ('[routing]\npac_url = "ftp://x/p.pac"', "routing.pac_url", "must start with http://"),
        ('[routing]\npac_url = "wpad.dat"', "routing.pac_url", "must start with http://"),
        ('[routing]\npac_url = "http://u:pw@w/p.pac"', "routing.pac_url", "must not contain"),
        ("[routing]\npac_url = 1", "routing.pac_url", "must be a URL"),
        ('[routing]\npac_url = ""', "routing.pac_url", "must be a URL"),
        ("rule = 3", "rule", "must be tables written [[rule]]"),
        ('[[rule]]\naction = "direct"', "rule[0].match", "is required"),
        ('[[rule]]\nmatch = ["a"]', "rule[0].action", "is required"),
        ('[[rule]]\nmatch = ["a"]\naction = "direct"\nwhy = 1', "rule[0].why", "unknown key"),
        ('[[rule]]\nmatch = []\naction = "direct"', "rule[0].match", "non-empty array"),
        ('[[rule]]\nmatch = 5\naction = "direct"', "rule[0].match", "got 5"),
        ('[[rule]]\nmatch = ["a", 2]\naction = "direct"', "rule[0].match[1]", "must be a string"),
        (
            '[[rule]]\nmatch = ["a"]\naction = "direct"\n[[rule]]\nmatch = ["b", "c..d"]\n'
            'action = "direct"',
            "rule[1].match[1]",
            "must be a host name",
        ),
        (
            '[[rule]]\nmatch = ["a"]\naction = "pac"',
            "rule[0].action",
            'must be "direct" or "block"',
        ),
        ('[[rule]]\nmatch = ["a"]\naction = "Corp"', "rule[0].action", "upstream's name"),
        ('[[rule]]\nmatch = ["a"]\naction = false', "rule[0].action", "got false"),
        ('[[rule]]\nmatch = ["a"]\naction = {}', "rule[0].action", "got a table"),
        ('[[rule]]\nmatch = ["a"]\naction = 2026-01-01', "rule[0].action", "got a date"),
    ],
)
def test_errors_name_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(text)
    assert caught.value.field == field
    assert words in caught.value.problem
    assert str(caught.value).startswith(f"t.toml: {field}: ")


@pytest.mark.parametrize("value", ["-1", "true", '"1"', "1.5", "1000001"])
def test_priority_must_be_a_small_integer(value: str) -> None:
    text = f'[[upstream]]\nname = "x"\nurl = "http://x:1"\npriority = {value}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.toml", local_port_range=PORTS)
    assert caught.value.field == "upstream[0].priority"
    assert "must be an integer 0-1000000" in caught.value.problem


def test_too_many_rules_or_patterns() -> None:
    many = '[[rule]]\nmatch = ["a"]\naction = "direct"\n' * 10_001
    with pytest.raises(ConfigError, match="at most 10000 rules"):
        _parse(many)
    huge = "[[rule]]\nmatch = [" + ", ".join(['"a"'] * 10_001) + ']\naction = "direct"\n'
    with pytest.raises(ConfigError, match="rule\\[0\\].match"):
        _parse(huge)


def test_routing_error_alone() -> None:
    with pytest.raises(RoutingConfigError) as caught:
        parse_routing({"pac": "x"}, None, [], [])
    assert caught.value.field == "routing.pac"
    exc = RoutingConfigError("rule[3].match[1]", "must be a host name")
    assert str(exc) == "rule[3].match[1]: must be a host name"


def test_written_and_read_back_unchanged() -> None:
    text = """
[routing]
default = "corp"
pac_url = "http://wpad/wpad.dat"
when_unreachable = "fail"
policy = "latency"
probe_interval = 0

[[rule]]
match = ["*.corp.example", "[fd00::/8]:443", "<local>", "*", ":22", "10.0.0.0/8"]
action = "direct"

[[rule]]
match = ["ads.example"]
action = "block"
"""
    config = parse_config(text + UPSTREAMS, "t.toml", local_port_range=PORTS)
    again = parse_config(dump_config(config), "t.toml", local_port_range=PORTS)
    assert again == config
    assert again.routing.priorities == (("backup", 0),)
    assert again.routing.probe_interval == 0  # health probes off, kept across a save
    # Defaults are not written (the file stays short); a file without routing has none.
    plain = replace(config, routing=RoutingSettings())
    assert "[routing]" not in dump_config(plain)
    assert "priority" not in dump_config(plain)
    assert dump_routing(RoutingSettings()) == []
    only_rules = replace(config.routing, default=None, pac_url=None)
    only_rules = replace(
        only_rules, when_unreachable="direct", policy="priority", probe_interval=30.0
    )
    assert dump_routing(only_rules)[0] == "[[rule]]"
