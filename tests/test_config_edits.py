"""The settings edits the app and `tray-proxy setup` make: pure functions over `Config`,
checked on a parsed settings file."""

from __future__ import annotations

import pytest

from tray_proxy.config import parse_config
from tray_proxy.config_edits import with_active_upstream, with_upstream
from tray_proxy.errors import UserError
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

TWO_UPSTREAMS = """
[relay]
upstream = "corp"

[[upstream]]
name = "corp"
url = "http://p.corp.example:8080"

[[upstream]]
name = "lab"
url = "socks5://10.0.0.5:1080"
"""


def test_the_active_upstream_changes_to_one_by_that_name() -> None:
    config = parse_config(TWO_UPSTREAMS, local_port_range=(32768, 60999))
    changed = with_active_upstream(config, "lab")
    assert changed.relay.upstream == "lab"
    active = changed.active_upstream()
    assert active is not None and active.host == "10.0.0.5"
    assert config.relay.upstream == "corp", "the original Config is left as it was"


def test_an_unknown_upstream_name_is_refused_in_words() -> None:
    config = parse_config(TWO_UPSTREAMS, local_port_range=(32768, 60999))
    with pytest.raises(UserError, match="There is no upstream named 'nope'"):
        with_active_upstream(config, "nope")


def test_an_upstream_of_a_known_name_is_replaced_in_place() -> None:
    config = parse_config(TWO_UPSTREAMS, local_port_range=(32768, 60999))
    new = UpstreamProxy("corp", UpstreamKind.HTTP, "p2.corp.example", 3128)
    changed, old = with_upstream(config, new)
    assert old is not None and old.host == "p.corp.example"
    assert [u.name for u in changed.upstreams] == ["corp", "lab"]
    assert changed.upstreams[0] == new


def test_an_upstream_of_a_new_name_is_added_last() -> None:
    config = parse_config(TWO_UPSTREAMS, local_port_range=(32768, 60999))
    new = UpstreamProxy("home", UpstreamKind.SOCKS5, "192.0.2.7", 1080)
    changed, old = with_upstream(config, new)
    assert old is None
    assert [u.name for u in changed.upstreams] == ["corp", "lab", "home"]
