"""The helper grants only what the administrator's policy allows, to the user who started it.

issue 16 items 1-3: the caller's uid comes from pkexec/sudo (PKEXEC_UID / SUDO_UID, set here
in the helper's environment as those launchers would), never from the request; the relay port
must be a socket that uid listens on; the policy file bounds ports, capture and containers;
the relay's source-port range is limited and kept out of ip_local_port_range.

Real helper processes in throwaway namespaces, real nft, real listeners owned by test uids
(no user account is needed for a uid to own a socket).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firewall.conftest import HelperSession, Listener, in_ns, table_present, write_sysctl
from tray_proxy.firewall import helper as helper_module
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

# uids no account on the test machine uses (the helper only compares numbers).
ALICE = 42421
MALLORY = 42422
WIRE = spec_to_wire(RuleSpec(relay_port=3129))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    return tmp_path


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    try:
        yield made
    finally:
        for listener in made:
            listener.close()


def _env(**launcher: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "PKEXEC_UID")}
    return {**env, **launcher}


def _start(start_helper, policy: Path, **options: object) -> HelperSession:
    helper: HelperSession = start_helper(
        paths={"policy_path": str(policy), "docker_socket": str(policy.parent / "no-docker")},
        **options,
    )
    return helper


def _write_policy(path: Path, content: object, mode: int = 0o644) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    os.chmod(path, mode)
    return path


# -- who the caller is


def test_pkexec_uid_is_the_owner_and_must_listen_on_the_relay_port(
    netns: str, start_helper, policy_dir: Path, listeners: list[Listener]
) -> None:
    """A group member cannot point the redirect at a port someone else listens on."""
    listeners.append(Listener(netns, 3129, uid=MALLORY))
    helper = _start(
        start_helper, policy_dir / "absent.json", env=_env(PKEXEC_UID=str(ALICE)), listen=False
    )
    answer = helper.request("apply", **WIRE)
    assert answer["ok"] is False
    assert answer["error"] == f"relay_port: 3129 is not a port your user (uid {ALICE}) listens on"
    assert not table_present(netns)

    listeners.append(Listener(netns, 3130, uid=ALICE))
    answer = helper.request("apply", **{**WIRE, "relay_port": 3130})
    assert answer["ok"] is True, answer
    assert answer["owner_uid"] == ALICE
    assert answer["captured"] == f"uid {ALICE} and system accounts (uid < 1000)"
    listed = in_ns(netns, "nft", "list", "chain", "inet", "tray_proxy", "output").stdout
    assert f"meta skuid != {{ 0-999, {ALICE} }} return" in listed
    status = helper.request("status")
    assert (status["owner_uid"], status["captured"]) == (answer["owner_uid"], answer["captured"])


def test_nobody_listening_on_the_relay_port_is_refused(
    netns: str, start_helper, policy_dir: Path
) -> None:
    helper = _start(start_helper, policy_dir / "absent.json", listen=False)
    answer = helper.request("apply", **WIRE)
    assert answer["error"] == "relay_port: 3129 is not a port your user (uid 0) listens on"


def test_sudo_uid_wins_over_a_pkexec_uid_that_came_through(
    netns: str, start_helper, policy_dir: Path, listeners: list[Listener]
) -> None:
    """sudo writes SUDO_UID itself; a PKEXEC_UID next to it came from the caller."""
    listeners.append(Listener(netns, 3129, uid=MALLORY))
    env = _env(SUDO_UID=str(ALICE), PKEXEC_UID=str(MALLORY))
    helper = _start(start_helper, policy_dir / "absent.json", env=env, listen=False)
    answer = helper.request("apply", **WIRE)
    assert answer["error"] == f"relay_port: 3129 is not a port your user (uid {ALICE}) listens on"


@pytest.mark.parametrize("key", ["owner_uid", "caller_uid", "uid", "PKEXEC_UID", "SUDO_UID"])
def test_no_request_field_can_name_the_caller(
    netns: str, start_helper, policy_dir: Path, listeners: list[Listener], key: str
) -> None:
    listeners.append(Listener(netns, 3129, uid=MALLORY))
    helper = _start(
        start_helper, policy_dir / "absent.json", env=_env(PKEXEC_UID=str(ALICE)), listen=False
    )
    answer = helper.request("apply", **WIRE, **{key: MALLORY})
    assert answer["ok"] is False
    assert answer["error"] == f"{key}: is not a known field"
    assert not table_present(netns)


def test_a_launcher_uid_that_is_not_a_number_stops_the_helper(netns: str) -> None:
    helper = HelperSession(netns, env=_env(PKEXEC_UID="1000 0"))
    try:
        helper.close_stdin()
        assert helper.wait() == 3
        assert "PKEXEC_UID is not a uid" in helper.stderr()
    finally:
        helper.shutdown()


# -- what the policy allows


def test_ports_outside_the_default_policy_are_refused_naming_the_port(
    netns: str, start_helper, policy_dir: Path
) -> None:
    """The attack of issue 16 item 2: SSH, SMTP and PostgreSQL logins to a listener."""
    helper = _start(start_helper, policy_dir / "absent.json")
    attack = {
        **WIRE,
        "relay_port": 40000,
        "redirect_ports": [22, 25, 5432],
        "excluded_networks": [],
    }
    answer = helper.request("apply", **attack)
    assert answer["error"] == (
        "redirect_ports: port 22 is not allowed by the administrator policy (allowed: 80, 443)"
    )
    assert not table_present(netns)
    assert helper.request("apply", **{**WIRE, "redirect_ports": [443]})["ok"] is True


def test_a_policy_file_widens_and_narrows_what_is_granted(
    netns: str, start_helper, policy_dir: Path
) -> None:
    policy = _write_policy(
        policy_dir / "policy.json",
        {
            "redirect_ports": [80, 443, 8080],
            "max_source_ports": 100,
            "capture_containers": False,
            "capture": ["owner", "all"],
        },
    )
    helper = _start(start_helper, policy)
    base = {**WIRE, "capture_containers": False, "relay_source_ports": [61000, 61099]}
    refused = {
        "capture": (
            "capture: 'owner+system' is not allowed by the administrator policy"
            " (allowed: owner, all)"
        ),
        "capture_containers": (
            "capture_containers: container capture is not allowed by the administrator policy"
        ),
        "relay_source_ports": (
            "relay_source_ports: 61000-61100 is 101 ports; at most 100 may be reserved for the"
            " relay"
        ),
    }
    requests = {
        "capture": base,
        "capture_containers": {**base, "capture": "owner", "capture_containers": True},
        "relay_source_ports": {**base, "capture": "owner", "relay_source_ports": [61000, 61100]},
    }
    for name, request in requests.items():
        assert helper.request("apply", **request)["error"] == refused[name]
    answer = helper.request("apply", **{**base, "capture": "all", "redirect_ports": [8080]})
    assert answer["ok"] is True, answer
    assert answer["captured"] == "every local user"
    listed = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert "skuid" not in listed and "redirect to :3129" in listed


def test_capture_all_is_refused_by_default(netns: str, start_helper, policy_dir: Path) -> None:
    helper = _start(start_helper, policy_dir / "absent.json")
    answer = helper.request("apply", **{**WIRE, "capture": "all"})
    assert answer["error"] == (
        "capture: 'all' is not allowed by the administrator policy (allowed: owner, owner+system)"
    )
    answer = helper.request("apply", **{**WIRE, "capture": "owner"})
    assert answer["captured"] == "uid 0 (root) only"


@pytest.mark.parametrize(
    ("content", "mode", "owner", "why"),
    [
        ({"redirect_ports": [22]}, 0o664, 0, "is writable by group or others (mode 664)"),
        ({"redirect_ports": [22]}, 0o646, 0, "is writable by group or others (mode 646)"),
        ({"redirect_ports": [22]}, 0o644, ALICE, f"is owned by uid {ALICE}, not root"),
        ("{not json", 0o644, 0, "is not valid"),
        ({"redirect_port": [80]}, 0o644, 0, "is not valid (has an unknown key 'redirect_port')"),
        ({"capture": ["everyone"]}, 0o644, 0, "is not valid"),
        ({"redirect_ports": [80, 70000]}, 0o644, 0, "is not valid"),
        ([80, 443], 0o644, 0, "is not valid"),
    ],
)
def test_an_untrusted_or_broken_policy_file_refuses_every_apply(
    netns: str,
    start_helper,
    policy_dir: Path,
    content: object,
    mode: int,
    owner: int,
    why: str,
) -> None:
    policy = _write_policy(policy_dir / "policy.json", content, mode)
    os.chown(policy, owner, -1)
    helper = _start(start_helper, policy)
    answer = helper.request("apply", **WIRE)
    assert answer["ok"] is False
    assert str(answer["error"]).startswith(f"the administrator policy {policy} {why}"), answer
    assert "Ask an administrator" in str(answer["error"])
    assert not table_present(netns)


def test_a_symlinked_policy_file_is_not_followed(
    netns: str, start_helper, policy_dir: Path
) -> None:
    target = _write_policy(policy_dir / "mine.json", {"redirect_ports": [22]})
    link = policy_dir / "policy.json"
    link.symlink_to(target)
    helper = _start(start_helper, link)
    answer = helper.request("apply", **{**WIRE, "redirect_ports": [22]})
    assert str(answer["error"]).startswith(f"the administrator policy {link} cannot be opened")


def test_the_shipped_policy_file_is_the_built_in_default() -> None:
    shipped = Path(__file__).parents[2] / "installer" / "helper-policy.json"
    assert helper_module.load_policy(str(shipped)) == helper_module.Policy()
    assert helper_module.POLICY_PATH == "/etc/tray-proxy/helper-policy.json"


# -- the relay's source ports (issue 16 item 3)


@pytest.mark.parametrize(
    ("ports", "error"),
    [
        ([1024, 65535], "1024-65535 is 64512 ports; at most 4096 may be reserved for the relay"),
        ([12081, 65535], "12081-65535 is 53455 ports; at most 4096 may be reserved for the relay"),
        (
            [60000, 60999],
            "60000-60999 overlaps the ports the kernel hands out (32768-60999,"
            " net.ipv4.ip_local_port_range); choose a range outside it",
        ),
    ],
)
def test_source_port_ranges_that_starve_other_programs_are_refused(
    netns: str, start_helper, policy_dir: Path, ports: list[int], error: str
) -> None:
    write_sysctl(netns, "net/ipv4/ip_local_port_range", "32768 60999")
    before = in_ns(netns, "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports").stdout
    helper = _start(start_helper, policy_dir / "absent.json")
    answer = helper.request("apply", **{**WIRE, "relay_source_ports": ports})
    assert answer["error"] == f"relay_source_ports: {error}"
    assert in_ns(netns, "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports").stdout == before


def test_the_kernel_range_is_read_at_apply_time(netns: str, start_helper, policy_dir: Path) -> None:
    helper = _start(start_helper, policy_dir / "absent.json")
    assert helper.request("apply", **WIRE)["ok"] is True
    write_sysctl(netns, "net/ipv4/ip_local_port_range", "50000 62000")
    answer = helper.request("apply", **WIRE)
    assert str(answer["error"]).startswith("relay_source_ports: 61000-64999 overlaps")
    assert helper_module.MAX_SOURCE_PORTS == 4096


# -- whose connections are captured (issue 16 item 1), with real sockets of three uids

_CONNECT_AS = """
import os, socket, sys
uid = int(sys.argv[1])
if uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
try:
    socket.create_connection(("198.51.100.1", 80), timeout=1.0).close()
    print("relayed")
except OSError as exc:
    print(type(exc).__name__)
"""


def _connect_as(ns: str, uid: int) -> str:
    return in_ns(ns, "/usr/bin/python3", "-I", "-c", _CONNECT_AS, str(uid)).stdout.strip()


@pytest.mark.parametrize(
    ("capture", "expected"),
    [
        ("owner+system", {ALICE: "relayed", 0: "relayed", MALLORY: "TimeoutError"}),
        ("owner", {ALICE: "relayed", 0: "TimeoutError", MALLORY: "TimeoutError"}),
    ],
)
def test_only_the_owner_and_system_accounts_are_captured(
    netns: str,
    start_helper,
    policy_dir: Path,
    listeners: list[Listener],
    capture: str,
    expected: dict[int, str],
) -> None:
    """Another local user (MALLORY) is never tunnelled with the owner's (ALICE's) login."""
    # 198.51.100.1 is routed into a veth whose far end has no address: a connection that is
    # not redirected goes nowhere, so it can only succeed through the owner's relay.
    in_ns(netns, "ip", "link", "add", "tpv0", "type", "veth", "peer", "name", "tpv1")
    in_ns(netns, "ip", "addr", "add", "198.51.100.2/24", "dev", "tpv0")
    for end in ("tpv0", "tpv1"):
        in_ns(netns, "ip", "link", "set", end, "up")
    listeners.append(Listener(netns, 3129, uid=ALICE))
    env = _env(PKEXEC_UID=str(ALICE))
    helper = _start(start_helper, policy_dir / "absent.json", env=env, listen=False)
    wire = {**WIRE, "redirect_ports": [80], "capture_containers": False, "capture": capture}
    assert helper.request("apply", **wire)["ok"] is True
    assert {uid: _connect_as(netns, uid) for uid in expected} == expected


# -- the pure parts, in process


@pytest.mark.parametrize(
    ("environ", "uid"),
    [
        ({}, 0),
        ({"PKEXEC_UID": "1000"}, 1000),
        ({"SUDO_UID": "1001"}, 1001),
        ({"SUDO_UID": "1001", "PKEXEC_UID": "1000"}, 1001),
    ],
)
def test_caller_uid_comes_from_the_launcher(environ: dict[str, str], uid: int) -> None:
    assert helper_module.caller_uid(environ, real_uid=0) == uid


@pytest.mark.parametrize("text", ["", "-1", "1e3", " 1000", "1000\n", "\u0663", "4294967295"])
def test_a_launcher_uid_must_be_a_plain_number(text: str) -> None:
    with pytest.raises(helper_module.HelperError, match="PKEXEC_UID is not a uid"):
        helper_module.caller_uid({"PKEXEC_UID": text}, real_uid=0)


def test_listening_uids_reads_listen_sockets_of_both_families(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    (tmp_path / "tcp").write_text(
        header + "   0: 0100007F:0C39 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  1000        0 11 1 0000000000000000 100 0 0 10 0\n"
        + "   1: 0100007F:0C39 0100007F:D431 01 00000000:00000000 00:00000000 00000000"
        "  2000        0 12 1 0000000000000000 20 4 30 10 -1\n"
        + "   2: 0100007F:0C3A 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  4000        0 13 1 0000000000000000 100 0 0 10 0\n" + "   3: garbage\n"
    )
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000001000000:0C39 00000000000000000000000000000000:0000"
        " 0A 00000000:00000000 00:00000000 00000000  3000        0 14 1 0 100 0 0 10 0\n"
    )
    assert helper_module.listening_uids(str(tmp_path), 3129) == {1000, 3000}
    assert helper_module.listening_uids(str(tmp_path), 3130) == {4000}
    (tmp_path / "tcp6").unlink()  # IPv6 disabled
    assert helper_module.listening_uids(str(tmp_path), 3129) == {1000}


def test_policy_check_names_the_first_field_beyond_it() -> None:
    policy = helper_module.Policy(redirect_ports=frozenset({443}), max_source_ports=10)
    with pytest.raises(helper_module.SpecError, match="^redirect_ports: port 80 is not allowed"):
        policy.check(RuleSpec(relay_port=3129))
    spec = RuleSpec(relay_port=3129, redirect_ports=(443,), relay_source_ports=(61000, 61010))
    with pytest.raises(helper_module.SpecError, match="^relay_source_ports: 61000-61010 is 11"):
        policy.check(spec)
    policy.check(
        RuleSpec(relay_port=3129, redirect_ports=(443,), relay_source_ports=(61000, 61009))
    )
