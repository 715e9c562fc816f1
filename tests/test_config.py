"""Tests of tray_proxy/config.py: the settings file, its validation messages and atomic save.

Pure and fast: only tmp_path is touched. Must not import PySide6.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy import config as config_module
from tray_proxy.config import (
    MAX_SOURCE_PORTS,
    Config,
    ConfigError,
    RedirectSettings,
    default_config_path,
    dump_config,
    load_config,
    parse_config,
    save_config,
)
from tray_proxy.firewall.ruleset import (
    DEFAULT_CONTAINER_INTERFACES,
    DEFAULT_EXCLUDED_NETWORKS,
)
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

CORP = '[[upstream]]\nname = "corp"\nurl = "http://proxy.corp.example:8080"\n'
# Debian's default net.ipv4.ip_local_port_range, for tests that must not depend on this machine's.
KERNEL_RANGE = (32768, 60999)


def error_of(text: str, source: str = "config.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return str(info.value)


# --------------------------------------------------------------------------- the good path


def test_empty_file_gives_defaults_and_no_upstream() -> None:
    config = parse_config("")
    assert config == Config(relay=RelaySettings(), upstreams=(), path=None)
    assert config.active_upstream() is None


def test_full_example_parses_to_settings() -> None:
    config = parse_config(
        """
        [relay]
        port = 3128
        listen = ["127.0.0.1"]
        redirect_ports = [80, 443, 8443]
        upstream = "socks"
        connect_timeout = 5
        handshake_timeout = 7.5
        idle_timeout = 86400
        peek_timeout = 0
        source_ports = [61000, 61999]
        drain_timeout = 0
        spare_connections = 0
        spare_max_age = 2.5

        [[upstream]]
        name = "corp"
        url = "http://proxy.corp.example:8080"
        username = "CORP\\\\alice"

        [[upstream]]
        name = "socks"
        url = "socks5h://[2001:db8::1]"
        username = "bob"
        """
    )
    assert config.relay == RelaySettings(
        port=3128,
        listen=("127.0.0.1",),
        redirect_ports=(80, 443, 8443),
        upstream="socks",
        connect_timeout=5.0,
        handshake_timeout=7.5,
        idle_timeout=86400.0,
        peek_timeout=0.0,
        source_ports=(61000, 61999),
        drain_timeout=0.0,
        spare_connections=0,
        spare_max_age=2.5,
    )
    assert config.upstreams == (
        UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 8080, "CORP\\alice"),
        UpstreamProxy("socks", UpstreamKind.SOCKS5, "2001:db8::1", 1080, "bob"),
    )
    assert config.active_upstream() == config.upstreams[1]


@pytest.mark.parametrize(
    ("url", "kind", "host", "port"),
    [
        ("http://proxy.example", UpstreamKind.HTTP, "proxy.example", 8080),
        ("http://proxy.example:3128/", UpstreamKind.HTTP, "proxy.example", 3128),
        ("HTTP://10.0.0.1:80", UpstreamKind.HTTP, "10.0.0.1", 80),
        ("socks5://proxy", UpstreamKind.SOCKS5, "proxy", 1080),
        ("socks5h://proxy.example.:9050", UpstreamKind.SOCKS5, "proxy.example.", 9050),
        ("http://[::1]", UpstreamKind.HTTP, "::1", 8080),
        ("http://[2001:DB8:0::1]:65535", UpstreamKind.HTTP, "2001:db8::1", 65535),
        ("http://my_proxy.corp", UpstreamKind.HTTP, "my_proxy.corp", 8080),
    ],
)
def test_upstream_urls(url: str, kind: UpstreamKind, host: str, port: int) -> None:
    config = parse_config(f'[[upstream]]\nname = "u"\nurl = "{url}"\n')
    assert config.upstreams == (UpstreamProxy("u", kind, host, port),)


def test_source_ports_false_disables_the_range() -> None:
    assert parse_config("[relay]\nsource_ports = false\n").relay.source_ports is None


def test_active_upstream_without_a_name_is_the_first() -> None:
    config = parse_config(CORP + '[[upstream]]\nname = "b"\nurl = "http://b"\n')
    assert config.active_upstream() is not None
    assert config.active_upstream() == config.upstreams[0]


def test_active_upstream_named_but_absent_is_none() -> None:
    upstream = UpstreamProxy("a", UpstreamKind.HTTP, "a", 8080)
    config = Config(relay=RelaySettings(upstream="gone"), upstreams=(upstream,), path=None)
    assert config.active_upstream() is None


def test_redirect_defaults_are_the_helpers() -> None:
    redirect = parse_config("").redirect
    assert redirect == RedirectSettings()
    assert redirect.exclude == DEFAULT_EXCLUDED_NETWORKS
    assert redirect.container_interfaces == DEFAULT_CONTAINER_INTERFACES
    assert redirect.capture_containers is True
    assert redirect.reject_quic is True


def test_redirect_section_parses() -> None:
    config = parse_config(
        """
        [redirect]
        exclude = ["127.0.0.0/8", "::1", "192.0.2.7", "2001:DB8::/32"]
        capture_containers = false
        container_interfaces = []
        reject_quic = false
        """
    )
    assert config.redirect == RedirectSettings(
        exclude=(
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("192.0.2.7/32"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        capture_containers=False,
        container_interfaces=(),
        reject_quic=False,
    )


def test_redirect_exclude_may_be_empty() -> None:
    assert parse_config("[redirect]\nexclude = []\n").redirect.exclude == ()


def test_default_path_is_in_the_user_config_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/someone/.config")
    assert default_config_path() == Path("/home/someone/.config/tray-proxy/config.toml")


# --------------------------------------------------------------------------- every refusal


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # file level
        ("x = 1", "config.toml: x: unknown key"),
        ("relay = 1", "config.toml: relay: must be a table written [relay], got 1"),
        ('[upstream]\nname = "a"', "config.toml: upstream: must be tables written [[upstream]]"),
        ("upstream = [1]", "config.toml: upstream: must be tables written [[upstream]]"),
        # relay.port
        ('[relay]\nport = "abc"', 'config.toml: relay.port: must be an integer 1-65535, got "abc"'),
        ("[relay]\nport = 0", "relay.port: must be an integer 1-65535, got 0"),
        ("[relay]\nport = 65536", "relay.port: must be an integer 1-65535, got 65536"),
        ("[relay]\nport = true", "relay.port: must be an integer 1-65535, got true"),
        ("[relay]\nport = 80.0", "relay.port: must be an integer 1-65535, got 80.0"),
        ("[relay]\nport = 1979-05-27", "relay.port: must be an integer 1-65535, got a date"),
        ("[relay]\nport = [1]", "relay.port: must be an integer 1-65535, got an array"),
        ("[relay]\nport = {}", "relay.port: must be an integer 1-65535, got a table"),
        ("[relay]\nprot = 1", 'relay.prot: unknown key; did you mean "port"?'),
        # relay.listen
        ("[relay]\nlisten = []", "relay.listen: must be a non-empty array"),
        ('[relay]\nlisten = "127.0.0.1"', "relay.listen: must be a non-empty array"),
        ("[relay]\nlisten = [1]", "relay.listen[0]: must be an IP address string, got 1"),
        ('[relay]\nlisten = ["localhost"]', "relay.listen[0]: must be an IP address such as"),
        ('[relay]\nlisten = ["0.0.0.0"]', 'relay.listen[0]: "0.0.0.0" is not a loopback'),
        ('[relay]\nlisten = ["::"]', 'relay.listen[0]: "::" is not a loopback address'),
        ('[relay]\nlisten = ["::1", "192.168.1.5"]', "relay.listen[1]: "),
        ('[relay]\nlisten = ["::1", "0::1"]', 'relay.listen[1]: "0::1" is listed twice'),
        # relay.redirect_ports
        ("[relay]\nredirect_ports = []", "relay.redirect_ports: must be an array of 1 to 64"),
        ("[relay]\nredirect_ports = 443", "relay.redirect_ports: must be an array of 1 to 64"),
        (f"[relay]\nredirect_ports = {list(range(1, 66))}", "relay.redirect_ports: must be"),
        ("[relay]\nredirect_ports = [80, 0]", "relay.redirect_ports[1]: must be an integer"),
        ('[relay]\nredirect_ports = ["443"]', "relay.redirect_ports[0]: must be an integer"),
        ("[relay]\nredirect_ports = [443, 443]", "relay.redirect_ports[1]: port 443 is listed"),
        # relay.upstream
        ('[relay]\nupstream = "corp"', 'relay.upstream: "corp" is not the name of an [[upstream]]'),
        ("[relay]\nupstream = 1\n" + CORP, "relay.upstream: must be an upstream name, got 1"),
        ('[relay]\nupstream = "Corp"\n' + CORP, 'relay.upstream: "Corp" is not the name'),
        # timeouts
        ("[relay]\nconnect_timeout = 0", "relay.connect_timeout: must be a number of seconds > 0"),
        ("[relay]\nconnect_timeout = 301", "relay.connect_timeout: must be a number of seconds"),
        ('[relay]\nconnect_timeout = "5"', "relay.connect_timeout: must be a number of seconds"),
        ("[relay]\nconnect_timeout = true", "relay.connect_timeout: must be a number of seconds"),
        ("[relay]\nhandshake_timeout = -1", "relay.handshake_timeout: must be a number"),
        ("[relay]\nhandshake_timeout = inf", "relay.handshake_timeout: must be a number"),
        ("[relay]\nidle_timeout = 86400.5", "relay.idle_timeout: must be a number of seconds"),
        ("[relay]\nidle_timeout = nan", "relay.idle_timeout: must be a number of seconds"),
        ("[relay]\npeek_timeout = -0.1", "relay.peek_timeout: must be a number of seconds >= 0"),
        ("[relay]\npeek_timeout = 31", "relay.peek_timeout: must be a number of seconds >= 0"),
        ("[relay]\ndrain_timeout = -1", "relay.drain_timeout: must be a number of seconds >= 0"),
        ("[relay]\ndrain_timeout = 1e9", "relay.drain_timeout: must be a number of seconds"),
        ("[relay]\nspare_max_age = 0", "relay.spare_max_age: must be a number of seconds > 0"),
        ("[relay]\nspare_max_age = 301", "relay.spare_max_age: must be a number of seconds"),
        # relay.spare_connections
        ("[relay]\nspare_connections = -1", "relay.spare_connections: must be an integer 0-16"),
        ("[relay]\nspare_connections = 17", "relay.spare_connections: must be an integer 0-16"),
        ("[relay]\nspare_connections = 1.5", "relay.spare_connections: must be an integer 0-16"),
        ("[relay]\nspare_connections = true", "relay.spare_connections: must be an integer"),
        # relay.early_data
        (
            '[relay]\nearly_data = "yes"',
            'relay.early_data: must be "auto", true or false, got "yes"',
        ),
        ('[relay]\nearly_data = "on"', 'relay.early_data: must be "auto", true or false'),
        ("[relay]\nearly_data = 1", 'relay.early_data: must be "auto", true or false, got 1'),
        # relay.source_ports
        ("[relay]\nsource_ports = true", "relay.source_ports: must be [low, high]"),
        ("[relay]\nsource_ports = [61000]", "relay.source_ports: must be [low, high]"),
        ("[relay]\nsource_ports = [1, 2, 3]", "relay.source_ports: must be [low, high]"),
        ("[relay]\nsource_ports = [1000, 2000]", "relay.source_ports[0]: must be an integer 1024"),
        ("[relay]\nsource_ports = [2000, 65536]", "relay.source_ports[1]: must be an integer"),
        ('[relay]\nsource_ports = [2000, "x"]', "relay.source_ports[1]: must be an integer"),
        ("[relay]\nsource_ports = [3000, 2000]", "relay.source_ports: low 3000 is above high 2000"),
        (
            "[relay]\nport = 62000",
            "relay.source_ports: 61000-64999 contains relay.port 62000",
        ),
        # upstream[].name
        ('[[upstream]]\nurl = "http://a"', "upstream[0].name: is required"),
        ('[[upstream]]\nname = "a"', "upstream[0].url: is required"),
        ('[[upstream]]\nname = ""\nurl = "http://a"', "upstream[0].name: must be 1-64 characters"),
        ('[[upstream]]\nname = ".."\nurl = "http://a"', "upstream[0].name: must be 1-64"),
        ('[[upstream]]\nname = "."\nurl = "http://a"', "upstream[0].name: must be 1-64"),
        ('[[upstream]]\nname = "a/b"\nurl = "http://a"', "upstream[0].name: must be 1-64"),
        (f'[[upstream]]\nname = "{"a" * 65}"\nurl = "http://a"', "upstream[0].name: must be"),
        ("[[upstream]]\nname = 5\nurl = 'http://a'", "upstream[0].name: must be 1-64"),
        (CORP + CORP, 'upstream[1].name: "corp" is already the name of upstream[0]'),
        (CORP + "nmae = 'x'", 'upstream[0].nmae: unknown key; did you mean "name"?'),
        # upstream[].url
        ('[[upstream]]\nname = "a"\nurl = 8080', "upstream[0].url: must be a URL like"),
        ('[[upstream]]\nname = "a"\nurl = "proxy:8080"', "upstream[0].url: must start with"),
        (
            '[[upstream]]\nname = "a"\nurl = "https://p"',
            "upstream[0].url: scheme is not supported (TLS",
        ),
        (
            '[[upstream]]\nname = "a"\nurl = "socks4://p"',
            "upstream[0].url: scheme is not supported;",
        ),
        ('[[upstream]]\nname = "a"\nurl = "http://"', "upstream[0].url: must name a host"),
        ('[[upstream]]\nname = "a"\nurl = "http://:80"', "upstream[0].url: must name a host"),
        ('[[upstream]]\nname = "a"\nurl = "http://p/x"', "upstream[0].url: must have no path"),
        ('[[upstream]]\nname = "a"\nurl = "http://p?x=1"', "upstream[0].url: must have no path"),
        ('[[upstream]]\nname = "a"\nurl = "http://p#f"', "upstream[0].url: must have no path"),
        ('[[upstream]]\nname = "a"\nurl = "http://p q"', "upstream[0].url: must not contain"),
        ('[[upstream]]\nname = "a"\nurl = "http://p:0"', "upstream[0].url: the port must be"),
        ('[[upstream]]\nname = "a"\nurl = "http://p:99999"', "upstream[0].url: the port must"),
        ('[[upstream]]\nname = "a"\nurl = "http://p:"', "upstream[0].url: the port must be"),
        ('[[upstream]]\nname = "a"\nurl = "http://p:8o"', "upstream[0].url: the port must be"),
        ('[[upstream]]\nname = "a"\nurl = "http://p:\u0661"', "upstream[0].url: the port must"),
        ('[[upstream]]\nname = "a"\nurl = "http://::1:80"', "upstream[0].url: IPv6 hosts must"),
        ('[[upstream]]\nname = "a"\nurl = "http://[::1"', 'upstream[0].url: has "[" without'),
        ('[[upstream]]\nname = "a"\nurl = "http://[x]"', "upstream[0].url: the host in [...]"),
        ('[[upstream]]\nname = "a"\nurl = "http://[::1]80"', 'upstream[0].url: after "]" only'),
        ('[[upstream]]\nname = "a"\nurl = "http://300.1.1.1"', "upstream[0].url: the host is not"),
        ('[[upstream]]\nname = "a"\nurl = "http://a..b"', "upstream[0].url: the host must be a"),
        ('[[upstream]]\nname = "a"\nurl = "http://-a.b"', "upstream[0].url: the host must be a"),
        ('[[upstream]]\nname = "a"\nurl = "http://bücher.de"', "upstream[0].url: the host must"),
        # upstream[].username
        (CORP + "username = 1", "upstream[0].username: must be a string, got 1"),
        (CORP + 'username = ""', "upstream[0].username: must not be empty"),
        (CORP + 'username = "a\\nb"', "upstream[0].username: must not contain control"),
        (CORP + 'username = "a:b"', 'upstream[0].username: must not contain ":"'),
        (
            '[[upstream]]\nname = "s"\nurl = "socks5://p"\nusername = "' + "é" * 128 + '"',
            "upstream[0].username: must be at most 255 bytes",
        ),
        # [redirect]
        ("redirect = 1", "config.toml: redirect: must be a table written [redirect], got 1"),
        ("[redirect]\nexclud = []", 'redirect.exclud: unknown key; did you mean "exclude"?'),
        ('[redirect]\nexclude = "10.0.0.0/8"', "redirect.exclude: must be an array of at most"),
        ("[redirect]\nexclude = [8]", "redirect.exclude[0]: must be a network string, got 8"),
        (
            '[redirect]\nexclude = ["10.0.0.0/8", "corp.example"]',
            "redirect.exclude[1]: must be an address or network such as 10.0.0.0/8 or fc00::/7, "
            'got "corp.example"',
        ),
        ('[redirect]\nexclude = ["10.0.0.0/33"]', "redirect.exclude[0]: must be an address or"),
        (
            '[redirect]\nexclude = ["10.1.2.3/8"]',
            'redirect.exclude[0]: "10.1.2.3/8" has host bits set; write "10.0.0.0/8"',
        ),
        (
            '[redirect]\nexclude = ["::1", "::1/128"]',
            'redirect.exclude[1]: "::1/128" is listed twice',
        ),
        (
            "[redirect]\nexclude = ["
            + ", ".join(f'"10.0.{i // 256}.{i % 256}"' for i in range(257))
            + "]",
            "redirect.exclude: must be an array of at most 256 networks",
        ),
        (
            "[redirect]\ncapture_containers = 1",
            "redirect.capture_containers: must be true or false, got 1",
        ),
        (
            '[redirect]\nreject_quic = "yes"',
            'redirect.reject_quic: must be true or false, got "yes"',
        ),
        (
            "[redirect]\ncontainer_interfaces = []",
            "redirect.container_interfaces: must name at least one bridge while "
            "capture_containers is true",
        ),
        (
            '[redirect]\ncontainer_interfaces = "docker0"',
            "redirect.container_interfaces: must be an array of at most 32 interface names",
        ),
        (
            "[redirect]\ncontainer_interfaces = [0]",
            "redirect.container_interfaces[0]: must be an interface name, got 0",
        ),
        (
            '[redirect]\ncontainer_interfaces = ["docker0", "br 1"]',
            "redirect.container_interfaces[1]: must be an interface name of letters, digits",
        ),
        (
            '[redirect]\ncontainer_interfaces = ["averyveryverylongname"]',
            "redirect.container_interfaces[0]: must be an interface name of letters, digits",
        ),
        (
            '[redirect]\ncontainer_interfaces = ["l*"]',
            "redirect.container_interfaces[0]: must not match the loopback",
        ),
        (
            '[redirect]\ncontainer_interfaces = ["br-*", "br-*"]',
            'redirect.container_interfaces[1]: "br-*" is listed twice',
        ),
    ],
)
def test_each_problem_names_the_field(text: str, expected: str) -> None:
    message = error_of(text)
    assert expected in message
    assert message.startswith("config.toml: ")


def test_socks5_username_of_255_bytes_is_accepted() -> None:
    text = '[[upstream]]\nname = "s"\nurl = "socks5://p"\nusername = "' + "é" * 127 + 'a"\n'
    assert parse_config(text).upstreams[0].username == "é" * 127 + "a"


def test_socks5_username_may_contain_a_colon() -> None:
    text = '[[upstream]]\nname = "s"\nurl = "socks5://p"\nusername = "a:b"\n'
    assert parse_config(text).upstreams[0].username == "a:b"


def test_error_carries_source_field_and_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[relay]\nport = 0", "/etc/x.toml")
    assert (info.value.source, info.value.field) == ("/etc/x.toml", "relay.port")
    assert str(info.value) == "/etc/x.toml: relay.port: must be an integer 1-65535, got 0"


def test_long_values_are_shortened_in_messages() -> None:
    message = error_of(f'[relay]\nport = "{"9" * 500}"')
    assert len(message) < 200


def test_toml_syntax_error_gives_line_and_column() -> None:
    message = error_of('[relay]\nport = 1\nlisten = ["::1"\n')
    assert message.startswith("config.toml: not valid TOML: ")
    assert "line 4" in message or "end of document" in message
    message = error_of("[relay]\nport = = 1\n")
    assert "line 2, column" in message


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('password = "S3cret"', "password"),
        ('[relay]\nsecret = "S3cret"', "relay.secret"),
        (CORP + 'password = "S3cret"', "upstream[0].password"),
        (CORP + 'pass = "S3cret"', "upstream[0].pass"),
        (CORP + 'Proxy_Password = "S3cret"', "upstream[0].Proxy_Password"),
        (CORP + 'extra = {passwd = "S3cret"}', "upstream[0].extra.passwd"),
        ('[relay]\nx = [{secret = "S3cret"}]', "relay.x[0].secret"),
        # reported as a password even where the table itself is malformed
        ('[upstream]\npassword = "S3cret"', "upstream.password"),
        ('[[upstream]]\npassword = ["S3cret", 1]', "upstream[0].password"),
    ],
)
def test_password_keys_are_refused_without_echo(text: str, field: str) -> None:
    message = error_of(text)
    assert f": {field}: passwords are not stored in the config file" in message
    assert "tray-proxy credentials set" in message
    assert "S3cret" not in message


def test_syntax_error_around_a_password_does_not_echo_it() -> None:
    message = error_of('[[upstream]]\nname = "corp"\npassword = S3cret\n')
    assert "not valid TOML" in message
    assert "S3cret" not in message


def test_password_message_names_the_upstream() -> None:
    message = error_of(CORP + 'password = "S3cret"')
    assert "use `tray-proxy credentials set corp`" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:S3cret@proxy.example:8080",
        "socks5://alice:S3cret@[::1]:1080",
        "http://alice:S3cret@",
        "http://:S3cret@proxy",
        "http://proxy/alice:S3cret@x",
        "ftp://alice:S3cret@proxy",
        "alice:S3cret@proxy",
    ],
)
def test_url_with_userinfo_is_refused_without_echo(url: str) -> None:
    message = error_of(f'[[upstream]]\nname = "corp"\nurl = "{url}"\n')
    assert message.startswith("config.toml: upstream[0].url: must not contain a user name")
    assert "tray-proxy credentials set corp" in message
    assert "S3cret" not in message
    assert "alice" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://p:S3cret",
        "https://S3cret",
        "S3cret://p",
        "http://p/S3cret",
        "http://S3cret:",
        "http://[S3cret]",
        "http://S3cret..x",
        "S3cret",
    ],
)
def test_url_errors_never_quote_the_url(url: str) -> None:
    message = error_of(f'[[upstream]]\nname = "corp"\nurl = "{url}"\n')
    assert message.startswith("config.toml: upstream[0].url: ")
    assert "S3cret" not in message


# --------------------------------------------------------------------------- round trip

_names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=64).filter(
    lambda s: s not in (".", "..")
)
_labels = st.text(alphabet="abcxyz019", min_size=1, max_size=8) | st.just("my-proxy_1")
_dns_hosts = (
    st.lists(_labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not all(c in "0123456789." for c in h))
)
_hosts = st.one_of(
    _dns_hosts,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(int(a)))),
)
_usernames = st.none() | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x3FF), min_size=1, max_size=40
).filter(lambda s: s.isprintable() and ":" not in s)
_ports = st.integers(1, 65535)
_timeout = st.floats(0.001, 300.0)
_networks = st.one_of(
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)
_interfaces = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,13}\*?", fullmatch=True).filter(
    lambda name: not name.startswith("lo") and name != "l*"
)


@st.composite
def _configs(draw: st.DrawFn) -> Config:
    names = draw(st.lists(_names, max_size=4, unique=True))
    upstreams = tuple(
        UpstreamProxy(
            name=name,
            kind=draw(st.sampled_from(UpstreamKind)),
            host=draw(_hosts),
            port=draw(_ports),
            username=draw(_usernames),
        )
        for name in names
    )
    # Outside the kernel's ephemeral ports (test_round_trip passes KERNEL_RANGE), at most
    # MAX_SOURCE_PORTS of them.
    source_ports = draw(
        st.none()
        | st.integers(KERNEL_RANGE[1] + 1, 65535).flatmap(
            lambda lo: st.tuples(
                st.just(lo), st.integers(lo, min(65535, lo + MAX_SOURCE_PORTS - 1))
            )
        )
    )
    port = draw(_ports)
    if source_ports is not None and source_ports[0] <= port <= source_ports[1]:
        source_ports = None
    relay = RelaySettings(
        port=port,
        listen=tuple(
            draw(
                st.lists(
                    st.sampled_from(["127.0.0.1", "::1", "127.1.2.3"]), min_size=1, unique=True
                )
            )
        ),
        redirect_ports=tuple(
            draw(st.lists(_ports.filter(lambda p: p != port), min_size=1, max_size=64, unique=True))
        ),
        upstream=draw(st.none() | st.sampled_from(names)) if names else None,
        connect_timeout=draw(_timeout),
        handshake_timeout=draw(_timeout),
        idle_timeout=draw(st.floats(0.001, 86400.0)),
        peek_timeout=draw(st.floats(0.0, 30.0)),
        source_ports=(source_ports[0], source_ports[1]) if source_ports else None,
        drain_timeout=draw(st.floats(0.0, 300.0)),
        spare_connections=draw(st.integers(0, 16)),
        spare_max_age=draw(_timeout),
        early_data=draw(st.sampled_from(["auto", "on", "off"])),
    )
    capture = draw(st.booleans())
    redirect = RedirectSettings(
        exclude=tuple(draw(st.lists(_networks, max_size=6, unique=True))),
        capture_containers=capture,
        container_interfaces=tuple(
            draw(st.lists(_interfaces, min_size=1 if capture else 0, max_size=4, unique=True))
        ),
        reject_quic=draw(st.booleans()),
    )
    return Config(relay=relay, upstreams=upstreams, path=None, redirect=redirect)


@settings(deadline=None)
@given(_configs())
def test_round_trip(config: Config) -> None:
    assert parse_config(dump_config(config), local_port_range=KERNEL_RANGE) == config


@pytest.mark.parametrize(
    ("line", "mode", "written"),
    [
        ("", "auto", 'early_data = "auto"'),
        ('early_data = "auto"', "auto", 'early_data = "auto"'),
        ("early_data = true", "on", "early_data = true"),
        ("early_data = false", "off", "early_data = false"),
    ],
)
def test_early_data_is_auto_by_default_and_written_as_the_user_writes_it(
    line: str, mode: str, written: str
) -> None:
    config = parse_config(f"[relay]\n{line}\n")
    assert config.relay.early_data == mode
    assert written in dump_config(config).splitlines()


def test_dump_writes_array_of_tables_and_no_password() -> None:
    config = parse_config(CORP + 'username = "alice"\n')
    text = dump_config(config)
    assert "[[upstream]]" in text
    assert "[relay]" in text
    assert "password" not in text.replace("No passwords", "")


# --------------------------------------------------------------------------- fuzzing

_keys = st.sampled_from(
    [
        "relay",
        "upstream",
        "port",
        "listen",
        "redirect_ports",
        "upstream",
        "name",
        "url",
        "username",
        "source_ports",
        "idle_timeout",
        "peek_timeout",
        "password",
        "x",
    ]
) | st.text(max_size=8)
_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "http://p", "socks5://[::1]:1", "corp"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)
_documents = st.dictionaries(
    _keys,
    _values | st.lists(st.dictionaries(_keys, _values, max_size=4), max_size=3),
    max_size=4,
)


@settings(deadline=None)
@given(_documents)
def test_random_documents_raise_only_config_error(doc: dict[str, object]) -> None:
    text = tomli_w.dumps(doc)
    with contextlib.suppress(ConfigError):
        parse_config(text)


@given(
    st.fixed_dictionaries(
        {"relay": st.dictionaries(st.sampled_from(config_module._RELAY_KEYS), _values)}
    )
)
def test_random_relay_tables_raise_only_config_error(doc: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(tomli_w.dumps(doc))


_redirect_strings = st.sampled_from(
    ["10.0.0.0/8", "10.0.0.1/8", "::1", "fe80::1%eth0", "0/0", "docker0", "br-*", "lo", "*", ""]
)


@given(
    st.fixed_dictionaries(
        {
            "redirect": st.dictionaries(
                st.sampled_from(config_module._REDIRECT_KEYS),
                _values | st.lists(_redirect_strings | _scalars, max_size=4),
            )
        }
    )
)
def test_random_redirect_tables_raise_only_config_error(doc: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(tomli_w.dumps(doc))


_url_parts = st.sampled_from(
    [
        "http://",
        "socks5://",
        "socks5h://",
        "HTTP://",
        "https://",
        "",
        "[",
        "]",
        ":",
        "::1",
        "@",
        "/",
        "?",
        "#",
        "p",
        "proxy.example",
        "10.0.0.1",
        "8080",
        "99999",
        "-",
        ".",
        " ",
        "\u0661",
    ]
)
_urls = st.lists(_url_parts, max_size=6).map("".join)


@settings(deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "upstream": st.lists(
                st.dictionaries(
                    st.sampled_from(config_module._UPSTREAM_KEYS), _urls | _values, max_size=3
                ),
                max_size=3,
            )
        }
    )
)
def test_random_upstream_tables_raise_only_config_error(doc: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(tomli_w.dumps(doc))


@given(st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text)


# --------------------------------------------------------------------------- files


def test_load_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(path)
    assert str(info.value).startswith(str(path))


def test_load_missing_ok_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert load_config(path, missing_ok=True) == Config(RelaySettings(), (), path)
    assert not path.exists()


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[relay]\nport = 0\n")
    with pytest.raises(ConfigError, match=f"^{path}: relay.port: "):
        load_config(path)


def test_load_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[relay]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_load_unreadable_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path)  # a directory


def test_save_then_load(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "config.toml"
    config = parse_config(CORP + 'username = "alice"\n[relay]\nport = 3128\n')
    save_config(config, path)
    assert load_config(path) == Config(config.relay, config.upstreams, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["config.toml"]


def test_save_replaces_a_wider_mode_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("# old\n")
    path.chmod(0o644)
    save_config(parse_config(""), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("# tray-proxy settings")


def test_save_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "config.toml"
    real.parent.mkdir()
    real.write_text("")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    save_config(parse_config(CORP), link)
    assert link.is_symlink()
    assert load_config(real).upstreams[0].name == "corp"


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "config.toml"
    old = "# old settings\n" + CORP
    path.write_text(old)

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(ConfigError, match=f"^{path}: cannot save it: No space left on device"):
        save_config(parse_config(""), path)
    monkeypatch.undo()
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["config.toml"]


def test_interrupted_save_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CORP)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_config(parse_config(""), path)
    monkeypatch.undo()
    assert path.read_text() == CORP
    assert os.listdir(tmp_path) == ["config.toml"]


def test_save_into_an_unusable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot save it"):
        save_config(parse_config(""), blocker / "config.toml")


# -- [[upstream]].auth ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "auto"),
        ('"auto"', "auto"),
        ('"basic"', "basic"),
        ('"Digest"', "digest"),
        ('"NTLM"', "ntlm"),
        ('"negotiate"', "negotiate"),
    ],
)
def test_upstream_auth_scheme(value: str | None, expected: str) -> None:
    from tray_proxy.relay.settings import AuthScheme

    text = CORP + (f"auth = {value}\n" if value else "")
    assert parse_config(text).upstreams[0].auth is AuthScheme(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CORP + 'auth = "kerberos"', 'upstream[0].auth: must be one of "auto", "basic"'),
        (CORP + "auth = 1", "upstream[0].auth: must be one of"),
        (
            '[[upstream]]\nname = "s"\nurl = "socks5://p"\nauth = "ntlm"',
            "upstream[0].auth: a SOCKS5 proxy only knows username/password",
        ),
        (CORP + 'auth = "basic"\nusername = "a:b"', 'upstream[0].username: must not contain ":"'),
    ],
)
def test_upstream_auth_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert expected in str(info.value)


def test_colon_in_the_username_is_fine_when_basic_is_never_used() -> None:
    config = parse_config(CORP + 'auth = "ntlm"\nusername = "a:b"\n')
    assert config.upstreams[0].username == "a:b"


def test_upstream_auth_round_trips_and_auto_is_not_written() -> None:
    from tray_proxy.relay.settings import AuthScheme

    pinned = parse_config(CORP + 'auth = "digest"\nusername = "alice"\n')
    text = dump_config(pinned)
    assert 'auth = "digest"' in text
    assert parse_config(text) == pinned
    assert "auth" not in dump_config(parse_config(CORP)).split("[[upstream]]")[1]
    assert parse_config(dump_config(parse_config(CORP))).upstreams[0].auth is AuthScheme.AUTO


# --------------------------------------------------------------------------- [log]


def test_log_defaults_when_the_table_is_missing() -> None:
    from tray_proxy.config import LogSettings

    log = parse_config(CORP).log
    assert log == LogSettings()
    assert (log.enabled, log.path, log.max_age_days, log.max_size_mb) == (True, None, 30.0, 200.0)


def test_log_table_is_read_and_round_trips(tmp_path: Path) -> None:
    text = (
        CORP + '[log]\nenabled = false\npath = "/var/tmp/h.sqlite3"\n'
        "max_age_days = 7\nmax_size_mb = 50.5\n"
    )
    config = parse_config(text)
    assert config.log.enabled is False
    assert config.log.path == Path("/var/tmp/h.sqlite3")
    assert (config.log.max_age_days, config.log.max_size_mb) == (7.0, 50.5)
    assert parse_config(dump_config(config)) == config
    path = tmp_path / "config.toml"
    save_config(config, path)
    assert load_config(path).log == config.log
    # The default path is not written: the file keeps following the XDG state dir.
    assert "path" not in dump_config(parse_config(CORP)).split("[log]")[1]


def test_log_path_expands_the_home_directory() -> None:
    config = parse_config(CORP + '[log]\npath = "~/h.sqlite3"\n')
    assert config.log.path == Path.home() / "h.sqlite3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("log = 1", "log: must be a table written [log]"),
        ("[log]\nenable = true", 'log.enable: unknown key; did you mean "enabled"?'),
        ('[log]\nenabled = "yes"', 'log.enabled: must be true or false, got "yes"'),
        ('[log]\npath = "history.sqlite3"', "log.path: must be an absolute path"),
        ('[log]\npath = ""', "log.path: must be the path of the history file"),
        ("[log]\npath = 3", "log.path: must be the path of the history file"),
        ("[log]\nmax_age_days = 0", "log.max_age_days: must be a number of days > 0"),
        ("[log]\nmax_age_days = nan", "log.max_age_days: must be a number of days"),
        ("[log]\nmax_age_days = true", "log.max_age_days: must be a number of days"),
        ("[log]\nmax_size_mb = -1", "log.max_size_mb: must be a number of MiB > 0"),
        ('[log]\nmax_size_mb = "200"', "log.max_size_mb: must be a number of MiB"),
    ],
)
def test_log_errors_name_the_field(text: str, expected: str) -> None:
    assert expected in error_of(text + "\n" + CORP)


# --------------------------------------------------------------------------- issue 16, item 9


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("x = " + "[" * 400 + "]" * 400, "config.toml: x: "),
        ("[relay]\nport = " + "[" * 400 + "]" * 400, "config.toml: relay.port: "),
        ("x = " + "{a = " * 400 + "1" + "}" * 400, "config.toml: "),
        ("[relay]\nlisten = " + "{a = [" * 200 + "1" + "]}" * 200, "config.toml: "),
        ("a." * 400 + "b = 1", "config.toml: a.a: "),
        (CORP + "x = " + "[" * 17 + "]" * 17, "config.toml: upstream: "),
    ],
)
def test_deeply_nested_values_are_one_config_error(text: str, field: str) -> None:
    # Was a RecursionError from tomllib (inline tables) with 3,000 lines of traceback.
    message = error_of(text)
    assert message.startswith(field)
    assert "nested more than 16 levels deep" in message
    assert "\n" not in message and len(message) < 300


def test_deep_nesting_is_refused_also_when_the_stack_is_nearly_used_up(tmp_path: Path) -> None:
    # The GUI loads the file deep inside Qt's and qasync's frames: what is left of the stack
    # there must still end in a ConfigError, not a RecursionError.
    import sys

    path = tmp_path / "config.toml"
    path.write_text("x = " + "{a = " * 100 + "1" + "}" * 100, encoding="utf-8")
    outcome: list[BaseException] = []

    def nested(levels: int) -> None:
        if levels > 0:
            nested(levels - 1)
            return
        try:
            load_config(path)
        except (ConfigError, RecursionError) as exc:
            outcome.append(exc)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        nested(400 - 150)
    finally:
        sys.setrecursionlimit(limit)
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome
    assert "nested more than 16 levels deep" in str(outcome[0])


def test_nesting_that_settings_use_is_not_refused() -> None:
    config = parse_config(CORP + '[relay]\nlisten = ["127.0.0.1"]\n')
    assert config.relay.listen == ("127.0.0.1",)


def test_run_exits_2_with_one_line_for_a_deeply_nested_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "config.toml"
    path.write_text("[relay]\nport = " + "{a = " * 400 + "1" + "}" * 400 + "\n", "utf-8")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {
        **os.environ,
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tray_proxy", "run", "--config", str(path), "--no-redirect"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "nested more than 16 levels deep" in done.stderr


@pytest.mark.parametrize("port", [443, 12080, 80])
def test_redirect_ports_with_the_relays_own_port_is_refused(port: int) -> None:
    message = error_of(f"[relay]\nport = {port}\nredirect_ports = [80, 443, 12080]\n")
    assert message.startswith(f"config.toml: relay.redirect_ports: contains relay.port {port}")
    assert "redirected back into the relay" in message


def test_redirect_ports_with_the_default_port_is_refused() -> None:
    default = RelaySettings().port
    message = error_of(f"[relay]\nredirect_ports = [443, {default}]\n")
    assert f"relay.redirect_ports: contains relay.port {default}" in message


# --------------------------------------------------------------------------- issue 16, item 3


def test_the_issues_wide_source_ranges_are_refused() -> None:
    # Both reserved every port while the redirect was on: bind(0) and connect() failed for
    # every program.
    wide = error_of("[relay]\nport = 12080\nsource_ports = [12081, 65535]\n")
    assert wide.startswith("config.toml: relay.source_ports: 12081-65535 is 53455 ports;")
    assert f"at most {MAX_SOURCE_PORTS}" in wide
    everything = error_of("[relay]\nsource_ports = [1024, 65535]\n")
    assert "relay.source_ports: 1024-65535 is 64512 ports;" in everything


def test_source_range_of_the_maximum_size_is_accepted() -> None:
    text = f"[relay]\nsource_ports = [61000, {61000 + MAX_SOURCE_PORTS - 1}]\n"
    config = parse_config(text, local_port_range=KERNEL_RANGE)
    assert config.relay.source_ports == (61000, 61000 + MAX_SOURCE_PORTS - 1)
    one_more = f"[relay]\nsource_ports = [61000, {61000 + MAX_SOURCE_PORTS}]\n"
    with pytest.raises(ConfigError, match=f"is {MAX_SOURCE_PORTS + 1} ports"):
        parse_config(one_more, local_port_range=KERNEL_RANGE)


@pytest.mark.parametrize(
    ("ports", "kernel", "advice"),
    [
        ((60000, 62000), (32768, 60999), "[61000, 64999]"),
        ((30000, 32768), (32768, 60999), "[61000, 64999]"),
        ((40000, 41000), (32768, 60999), "[61000, 64999]"),
        ((61000, 64999), (1024, 65535), "Narrow net.ipv4.ip_local_port_range"),
        ((61000, 61999), (50000, 63000), "[46000, 49999]"),
    ],
)
def test_source_range_overlapping_the_kernels_ephemeral_ports_is_refused(
    ports: tuple[int, int], kernel: tuple[int, int], advice: str
) -> None:
    text = f"[relay]\nport = 12080\nsource_ports = [{ports[0]}, {ports[1]}]\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, local_port_range=kernel)
    message = str(info.value)
    assert message.startswith(
        f"config.toml: relay.source_ports: {ports[0]}-{ports[1]} overlaps "
        f"{kernel[0]}-{kernel[1]}, the ports the kernel gives every program"
    )
    assert "net.ipv4.ip_local_port_range" in message
    assert advice in message


def test_source_range_next_to_the_kernels_range_is_accepted() -> None:
    config = parse_config("[relay]\nsource_ports = [61000, 64999]\n", local_port_range=KERNEL_RANGE)
    assert config.relay.source_ports == (61000, 64999)
    below = parse_config("[relay]\nsource_ports = [28768, 32767]\n", local_port_range=KERNEL_RANGE)
    assert below.relay.source_ports == (28768, 32767)


def test_load_reads_this_machines_ephemeral_port_range(tmp_path: Path) -> None:
    kernel = config_module.kernel_local_port_range()
    assert kernel is not None, "/proc/sys/net/ipv4/ip_local_port_range is unreadable"
    low, high = kernel
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        assert [int(x) for x in f.read().split()] == [low, high]
    inside = (max(low, 1024), min(high, max(low, 1024) + 99))
    path = tmp_path / "config.toml"
    path.write_text(f"[relay]\nport = 80\nsource_ports = [{inside[0]}, {inside[1]}]\n")
    with pytest.raises(ConfigError, match=f"overlaps {low}-{high}"):
        load_config(path)


def test_kernel_range_unreadable_or_odd_is_no_check(tmp_path: Path) -> None:
    path = tmp_path / "range"
    assert config_module.kernel_local_port_range(path) is None
    for text, expected in [
        ("32768\t60999\n", (32768, 60999)),
        ("", None),
        ("x y", None),
        ("5 4", None),
        ("0 100", None),
    ]:
        path.write_text(text)
        assert config_module.kernel_local_port_range(path) == expected
