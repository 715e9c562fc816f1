"""Golden-text tests for `RuleSpec -> nft text`, plus `nft -c` syntax checks in a netns.

Regenerate the golden files with TRAY_PROXY_REGEN_GOLDEN=1 (the run then fails once, so a
regeneration is never mistaken for a pass); review the diff before committing.
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from tests.firewall.conftest import GOLDEN_DIR, in_ns, make_netns, unique_name
from tray_proxy.firewall.ruleset import (
    DEFAULT_EXCLUDED_NETWORKS,
    MAX_SOURCE_PORTS,
    Bridge,
    RuleSpec,
    SpecError,
    render,
    render_delete,
    spec_from_wire,
    spec_to_wire,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

SPECS: dict[str, RuleSpec] = {
    "default": RuleSpec(relay_port=3129),
    "custom": RuleSpec(
        relay_port=8999,
        redirect_ports=(443, 80, 8080),
        excluded_networks=(net("10.1.0.0/16"), net("10.0.0.0/8"), net("2001:db8::/32")),
        upstreams=((ip("10.9.9.9"), 8080), (ip("2001:db8::5"), 3128), (ip("203.0.113.7"), 443)),
        relay_source_ports=(50000, 50100),
        container_interfaces=("podman0", "cni-*"),
        reject_quic=False,
    ),
    "host_only": RuleSpec(
        relay_port=3129, container_interfaces=(), capture_containers=False, reject_quic=False
    ),
    "single_port": RuleSpec(
        relay_port=3129,
        redirect_ports=(443,),
        excluded_networks=(),
        relay_source_ports=(60000, 60000),
        capture_containers=False,
        capture="owner",
    ),
    "bridges": RuleSpec(relay_port=3129),
    "everyone": RuleSpec(relay_port=3129, capture="all", reject_quic=False),
}
# The owner every golden is rendered for, and the container bridges the helper resolved.
OWNER = 1000
BRIDGES: dict[str, tuple[Bridge, ...]] = {
    "bridges": (
        Bridge("docker0", ip("172.17.0.1"), net("172.17.0.0/16")),
        Bridge("br-0123456789ab", ip("172.18.0.1"), net("172.18.0.0/16")),
        Bridge("podman0", ip("10.88.0.1"), net("10.88.0.0/16")),
    ),
    # Bridges are never captured without capture_containers.
    "host_only": (Bridge("docker0", ip("172.17.0.1"), net("172.17.0.0/16")),),
}


def rendered(name: str) -> str:
    return render(SPECS[name], owner_uid=OWNER, bridges=BRIDGES.get(name, ()))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_render_matches_golden_text(name: str) -> None:
    text = rendered(name)
    path = GOLDEN_DIR / f"{name}.nft"
    if os.environ.get("TRAY_PROXY_REGEN_GOLDEN") == "1":
        path.write_text(text)
        pytest.fail(f"regenerated {path}; review the diff and run again without the variable")
    assert text == path.read_text()


def test_render_replaces_the_table_in_one_transaction() -> None:
    text = rendered("default")
    assert text.startswith(
        "table inet tray_proxy\ndelete table inet tray_proxy\ntable inet tray_proxy {\n"
    )
    assert render_delete() == "table inet tray_proxy\ndelete table inet tray_proxy\n"
    # Only our table: a flush or another table in this text would touch other tools' rules.
    assert "flush" not in text
    assert {line for line in text.splitlines() if line.startswith("table")} == {
        "table inet tray_proxy",
        "table inet tray_proxy {",
    }


def test_render_is_deterministic_and_collapses_overlapping_networks() -> None:
    custom = rendered("custom")
    assert custom == rendered("custom")
    assert "elements = { 10.0.0.0/8 }" in custom  # 10.1.0.0/16 folded into 10.0.0.0/8


def test_golden_texts_pass_nft_syntax_check() -> None:
    with make_netns(unique_name("tpck")) as ns:
        for name in sorted(SPECS):
            done = in_ns(ns, "nft", "-c", "-f", "-", stdin=rendered(name), check=False)
            assert done.returncode == 0, f"{name}: {done.stderr}"
        # The check really checks: a broken text is refused.
        bad = rendered("default").replace("redirect to", "redirect too")
        assert in_ns(ns, "nft", "-c", "-f", "-", stdin=bad, check=False).returncode != 0


@pytest.mark.parametrize("name", sorted(SPECS))
def test_wire_round_trip(name: str) -> None:
    spec = SPECS[name]
    assert spec_from_wire(spec_to_wire(spec)) == spec


def test_defaults_are_the_documented_ones() -> None:
    spec = RuleSpec(relay_port=3129)
    assert spec.redirect_ports == (80, 443)
    assert spec.relay_source_ports == (61000, 64999)
    assert spec.container_interfaces == ("docker0", "br-*", "podman*")
    assert spec.capture_containers and spec.reject_quic
    assert spec.capture == "owner+system"
    assert MAX_SOURCE_PORTS == 4096
    assert [str(n) for n in DEFAULT_EXCLUDED_NETWORKS] == [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ]


BAD_SPECS: list[tuple[dict[str, object], str]] = [
    ({"relay_port": 0}, "relay_port"),
    ({"relay_port": 65536}, "relay_port"),
    ({"relay_port": True}, "relay_port"),
    ({"relay_port": "3129"}, "relay_port"),
    ({"relay_port": 443}, "relay_port"),
    ({"redirect_ports": ()}, "redirect_ports"),
    ({"redirect_ports": [80]}, "redirect_ports"),
    ({"redirect_ports": (80, 80)}, "redirect_ports"),
    ({"redirect_ports": (80, 0)}, "redirect_ports[1]"),
    ({"redirect_ports": tuple(range(1, 40))}, "redirect_ports"),
    ({"excluded_networks": ("10.0.0.0/8",)}, "excluded_networks[0]"),
    ({"upstreams": ((ip("10.0.0.1"),),)}, "upstreams[0]"),
    ({"upstreams": (("10.0.0.1", 80),)}, "upstreams[0]"),
    ({"upstreams": ((ip("10.0.0.1"), 70000),)}, "upstreams[0].port"),
    ({"relay_source_ports": (64999, 61000)}, "relay_source_ports"),
    ({"relay_source_ports": (80, 90)}, "relay_source_ports[0]"),
    ({"relay_source_ports": (61000, 70000)}, "relay_source_ports[1]"),
    ({"relay_source_ports": [61000, 61001]}, "relay_source_ports"),
    ({"container_interfaces": ('docker0" accept',)}, "container_interfaces[0]"),
    ({"container_interfaces": ("a" * 16,)}, "container_interfaces[0]"),
    ({"container_interfaces": ("*",)}, "container_interfaces[0]"),
    ({"container_interfaces": ("l*",)}, "container_interfaces[0]"),
    ({"container_interfaces": ("lo",)}, "container_interfaces[0]"),
    ({"container_interfaces": (3,)}, "container_interfaces[0]"),
    ({"container_interfaces": ()}, "container_interfaces"),
    ({"capture_containers": 1}, "capture_containers"),
    ({"reject_quic": "yes"}, "reject_quic"),
    ({"capture": "everyone"}, "capture"),
    ({"capture": None}, "capture"),
    (
        {"excluded_networks": (net("fe80::/64"), ipaddress.IPv6Network("fe80::%x/64"))},
        "excluded_networks[1]",
    ),
    ({"upstreams": ((ipaddress.IPv6Address("fe80::1%eth0"), 80),)}, "upstreams[0]"),
]


@pytest.mark.parametrize(("override", "field"), BAD_SPECS)
def test_invalid_spec_is_refused_naming_the_field(override: dict[str, object], field: str) -> None:
    kwargs: dict[str, object] = {"relay_port": 3129, **override}
    with pytest.raises(SpecError) as caught:
        RuleSpec(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.field == field


BAD_WIRE: list[tuple[dict[str, object], str]] = [
    ({}, "relay_port"),
    ({"relay_port": 3129, "colour": "red"}, "colour"),
    ({"relay_port": 3129, "redirect_ports": "80"}, "redirect_ports"),
    ({"relay_port": 3129, "excluded_networks": ["10.0.0.1/8"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": ["nonsense"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": [8]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": ["1" * 100]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "upstreams": [["10.0.0.1"]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [[10, 80]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [["proxy.corp", 80]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [["10.0.0.1", "80"]]}, "upstreams[0].port"),
    ({"relay_port": 3129, "relay_source_ports": [61000]}, "relay_source_ports"),
    ({"relay_port": 3129, "relay_source_ports": [1, 2, 3]}, "relay_source_ports"),
    ({"relay_port": 3129, "container_interfaces": "docker0"}, "container_interfaces"),
    ({"relay_port": 3129, "capture_containers": "false"}, "capture_containers"),
    ({"relay_port": 3129, "capture": "all "}, "capture"),
    # Only the canonical text of a value is accepted (issue 16 item 5).
    (
        {"relay_port": 3129, "excluded_networks": ["fe80::1%x }\n}\ntable ip pwn {/128"]},
        "excluded_networks[0]",
    ),
    ({"relay_port": 3129, "excluded_networks": ["fe80::%eth0/64"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": ["FE80::/10"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": ["2001:db8:0::/48"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "excluded_networks": ["10.0.0.0/08"]}, "excluded_networks[0]"),
    ({"relay_port": 3129, "upstreams": [["fe80::1%x }\n}\ntable ip pwn {", 80]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [["fe80::1%eth0", 80]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [["2001:DB8::1", 80]]}, "upstreams[0]"),
    ({"relay_port": 3129, "upstreams": [["::ffff:1.2.3.4", 80]]}, "upstreams[0]"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_WIRE)
def test_invalid_wire_fields_are_refused_naming_the_field(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(SpecError) as caught:
        spec_from_wire(fields)
    assert str(caught.value).startswith(f"{field}: ")


def test_long_rejected_values_are_shortened_in_messages() -> None:
    with pytest.raises(SpecError) as caught:
        spec_from_wire({"relay_port": "x" * 10_000})
    assert len(str(caught.value)) < 200


def test_scoped_ipv6_injection_is_refused_before_rendering() -> None:
    """The text of issue 16 item 5: accepted before, it reached nft, whose parser stopped it."""
    attack = "fe80::1%x }\n}\ntable ip pwn {"
    with pytest.raises(SpecError) as caught:
        spec_from_wire({"relay_port": 3129, "upstreams": [[attack, 80]]})
    assert "scope id" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(SpecError):
        spec_from_wire({"relay_port": 3129, "excluded_networks": [attack + "/128"]})


def test_capture_scopes_render_a_skuid_rule() -> None:
    def scope(capture: str, owner: int) -> list[str]:
        text = render(RuleSpec(relay_port=3129, capture=capture), owner_uid=owner)
        return [line.strip() for line in text.splitlines() if "skuid" in line]

    assert scope("owner", 1000) == ["meta skuid != 1000 return"] * 2  # output and quic
    assert scope("owner+system", 1000) == ["meta skuid != { 0-999, 1000 } return"] * 2
    assert scope("owner+system", 0) == ["meta skuid != 0-999 return"] * 2
    assert scope("all", 1000) == []
    with pytest.raises(SpecError):
        render(RuleSpec(relay_port=3129), owner_uid=-1)


def test_bridges_get_their_own_dnat_and_input_rule_never_loopback() -> None:
    text = rendered("bridges")
    assert (
        'iifname "br-0123456789ab" ip saddr 172.18.0.0/16 tcp dport { 80, 443 }'
        " dnat ip to 172.18.0.1:3129" in text
    )
    assert (
        'iifname "docker0" ip saddr 172.17.0.0/16 ip daddr 172.17.0.1 tcp dport 3129'
        " ct status dnat accept" in text
    )
    assert "127.0.0.1" not in text and "br-*" not in text
    assert "127.0.0.1" not in rendered("default")
    assert "dnat" not in rendered("host_only")
