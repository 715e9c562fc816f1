"""The root helper as a process: transcripts over stdin/stdout, real nft, inside a netns.

One test file per source file (tray_proxy/firewall/helper.py); the fuzzing lives in
test_helper_fuzz.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.firewall.conftest import (
    HelperSession,
    in_ns,
    read_sysctl,
    ruleset_text,
    table_present,
    write_sysctl,
)
from tray_proxy.firewall import helper as helper_module
from tray_proxy.firewall.client import SOURCE_HELPER_PATH, SYSTEM_PYTHON
from tray_proxy.firewall.ruleset import RuleSpec, render, spec_to_wire

RESERVED = "net/ipv4/ip_local_reserved_ports"
SPEC = RuleSpec(relay_port=3129)


def localnet(ns: str, ifname: str) -> str:
    return read_sysctl(ns, f"net/ipv4/conf/{ifname}/route_localnet")


def test_helper_file_is_a_standalone_executable_script() -> None:
    with open(SOURCE_HELPER_PATH) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    assert os.stat(SOURCE_HELPER_PATH).st_mode & 0o777 == 0o755
    assert stat.S_ISREG(os.stat(SOURCE_HELPER_PATH).st_mode)
    # Installed alone under /usr/libexec: no import of this package or any third-party module.
    imports = [
        line.split()[1]
        for line in text.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__")
    ]
    assert imports, "expected imports to inspect"
    for module in imports:
        root = module.split(".")[0]
        assert root in sys.stdlib_module_names, module
        assert root not in {"tray_proxy", "PySide6"}, module


# The tests run the helper as root directly: it serves uid 0.
GRANT = {
    "owner_uid": 0,
    "captured": "uid 0 (root) and system accounts (uid < 1000)",
    "bridges": [],
}


def _status(active: bool, present: bool, spec: object) -> dict[str, object]:
    grant = GRANT if spec is not None else {**GRANT, "captured": None}
    return {"ok": True, "active": active, "table_present": present, "spec": spec, **grant}


def _without_ids(answer: dict[str, object]) -> dict[str, object]:
    assert answer.pop("v") == 1
    answer.pop("id")
    return answer


def test_transcript_status_apply_status_remove(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    assert _without_ids(helper.request("status")) == _status(False, False, None)

    wire = spec_to_wire(SPEC)
    assert helper.request("apply", **wire) == {"v": 1, "id": 2, "ok": True, **GRANT}
    assert table_present(netns)
    assert _without_ids(helper.request("status")) == _status(True, True, wire)

    assert helper.request("remove") == {"v": 1, "id": 4, "ok": True, "removed": True}
    # Off for new connections; the table stays for the connections still open through it.
    assert _without_ids(helper.request("status")) == _status(False, True, wire)
    assert helper.request("remove") == {"v": 1, "id": 6, "ok": True, "removed": False}

    assert helper.request("apply", **wire)["ok"] is True  # on again: the table is replaced
    assert _without_ids(helper.request("status")) == _status(True, True, wire)
    assert _first_rules(netns) == {c: "meta skuid != 0-999 return" for c in ("output", "quic")}
    assert helper.request("remove")["removed"] is True
    helper.close_stdin()
    assert helper.wait() == 0
    assert not table_present(netns)
    assert "deleted the table" in helper.stderr()


def _first_rules(ns: str) -> dict[str, str]:
    """The first rule of each output-hook chain of our table, as nft lists it."""
    listed = json.loads(in_ns(ns, "nft", "-j", "list", "table", "inet", "tray_proxy").stdout)
    first: dict[str, str] = {}
    for entry in listed["nftables"]:
        rule = entry.get("rule")
        if rule is not None and rule["chain"] in ("output", "quic") and rule["chain"] not in first:
            first[rule["chain"]] = _rule_text(ns, rule["chain"], rule["handle"])
    return first


def _rule_text(ns: str, chain: str, handle: int) -> str:
    listed = in_ns(ns, "nft", "-a", "list", "chain", "inet", "tray_proxy", chain).stdout
    for line in listed.splitlines():
        if line.strip().endswith(f"# handle {handle}"):
            return line.strip().rpartition(" # handle")[0]
    raise AssertionError(f"no rule with handle {handle} in {chain}:\n{listed}")


def test_remove_inserts_a_leading_return_in_one_transaction(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    before = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert helper.request("remove")["removed"] is True
    assert _first_rules(netns) == {"output": "return", "quic": "return"}
    after = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    # The same table with one bare `return` on top of each chain but input: nothing else moved.
    assert [ln for ln in after.splitlines() if ln.strip() != "return"] == before.splitlines()
    assert after.count("\t\treturn\n") == 4  # output, prerouting, quic, forward
    assert helper_module.render_off(helper_module.redirecting_chains(SPEC)) == (
        "insert rule inet tray_proxy output return\n"
        "insert rule inet tray_proxy prerouting return\n"
        "insert rule inet tray_proxy quic return\n"
        "insert rule inet tray_proxy forward return\n"
    )


def test_applied_table_is_what_render_produced(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    # Same kernel state as applying the rendered text ourselves in a second namespace would
    # give; compare with the listing of nft's own parse of our text.
    listed = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert "redirect to :3129" in listed
    assert "127.0.0.1" not in listed  # no DNAT to loopback (CVE-2020-8558)
    assert listed.count("chain ") == render(SPEC, owner_uid=0).count("chain ")


def test_reapply_replaces_the_table(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    other = RuleSpec(relay_port=4000, redirect_ports=(443,), capture_containers=False)
    assert helper.request("apply", **spec_to_wire(other))["ok"] is True
    listed = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert "redirect to :4000" in listed
    assert ":3129" not in listed
    assert "chain prerouting" not in listed


def test_reserves_relay_source_ports_and_restores_previous_value(netns: str, start_helper) -> None:
    write_sysctl(netns, RESERVED, "5000-5010,62000")
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    assert read_sysctl(netns, RESERVED) == "5000-5010,61000-64999"
    narrower = RuleSpec(relay_port=3129, relay_source_ports=(63000, 63009))
    assert helper.request("apply", **spec_to_wire(narrower))["ok"] is True
    # 62000 was reserved before us and stays; the ports only we added are released.
    assert read_sysctl(netns, RESERVED) == "5000-5010,62000,63000-63009"
    assert helper.request("remove")["removed"] is True
    # The relay's upstream sockets that are still open use these ports: kept until exit.
    assert read_sysctl(netns, RESERVED) == "5000-5010,62000,63000-63009"
    helper.close_stdin()
    assert helper.wait() == 0
    assert read_sysctl(netns, RESERVED) == "5000-5010,62000"


def _make_bridge(ns: str, name: str) -> None:
    in_ns(ns, "ip", "link", "add", name, "type", "bridge")


def test_route_localnet_is_never_written(netns: str, start_helper) -> None:
    """Container capture no longer needs route_localnet on any bridge (CVE-2020-8558)."""
    for name in ("docker0", "br-abc", "br-lan"):
        _make_bridge(netns, name)
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    _make_bridge(netns, "br-new")
    # The rescan runs every second: watch across two of them.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert [localnet(netns, n) for n in ("docker0", "br-abc", "br-lan", "br-new")] == ["0"] * 4
        time.sleep(0.25)
    helper.close_stdin()
    assert helper.wait() == 0


def _netns_inode(ns: str) -> str:
    return in_ns(ns, "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout.strip()


def test_route_localnet_an_older_helper_recorded_is_put_back(netns: str, start_helper) -> None:
    """An older helper set route_localnet=1 and was killed: its recorded value is restored."""
    _make_bridge(netns, "docker0")
    write_sysctl(netns, "net/ipv4/conf/docker0/route_localnet", "1")
    os.makedirs(helper_module.STATE_DIR, mode=0o700, exist_ok=True)
    state = os.path.join(helper_module.STATE_DIR, f"netns-{_netns_inode(netns)}.json")
    try:
        with open(state, "w") as f:
            json.dump({"reserved_added": "", "route_localnet": {"docker0": "0"}}, f)
        helper: HelperSession = start_helper()
        assert helper.request("status")["ok"] is True
        assert localnet(netns, "docker0") == "0"
        helper.close_stdin()
        assert helper.wait() == 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state)


@pytest.mark.parametrize(
    ("how", "signum"),
    [
        ("eof", None),
        ("SIGTERM", signal.SIGTERM),
        ("SIGHUP", signal.SIGHUP),
        ("SIGINT", signal.SIGINT),
    ],
)
def test_stop_removes_table_and_restores_sysctls(
    netns: str, start_helper, how: str, signum: signal.Signals | None
) -> None:
    _make_bridge(netns, "docker0")
    before = read_sysctl(netns, RESERVED)
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    assert table_present(netns)
    if signum is None:
        helper.close_stdin()
    else:
        helper.proc.send_signal(signum)
    assert helper.wait() == 0, helper.stderr()
    assert not table_present(netns)
    assert read_sysctl(netns, RESERVED) == before
    assert localnet(netns, "docker0") == "0"
    assert "removing the redirect" in helper.stderr()


def _killed_helper_left_a_table(netns: str, start_helper) -> str:
    """Apply with a helper, kill -9 it; the reserved ports as they were before it."""
    _make_bridge(netns, "docker0")
    before = read_sysctl(netns, RESERVED)
    first: HelperSession = start_helper()
    assert first.request("apply", **spec_to_wire(SPEC))["ok"] is True
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    assert table_present(netns), "SIGKILL cannot be caught: the table must still be there"
    return before


def test_kill_9_leaves_table_that_next_start_switches_off_and_exit_deletes(
    netns: str, start_helper
) -> None:
    before = _killed_helper_left_a_table(netns, start_helper)
    second: HelperSession = start_helper()
    answer = second.request("status")
    assert (answer["active"], answer["table_present"]) == (False, True)
    assert "stale table" in second.stderr()
    # Switched off for new connections; kept (with what it needs) for those open through it.
    assert _first_rules(netns) == {"output": "return", "quic": "return"}
    assert read_sysctl(netns, RESERVED) != before
    assert second.request("remove")["removed"] is False
    second.close_stdin()
    assert second.wait() == 0
    assert not table_present(netns)
    assert read_sysctl(netns, RESERVED) == before


def test_kill_9_then_apply_replaces_the_stale_table_and_adopts_its_sysctls(
    netns: str, start_helper
) -> None:
    before = _killed_helper_left_a_table(netns, start_helper)
    second: HelperSession = start_helper()
    host_only = RuleSpec(relay_port=4000, capture_containers=False)
    assert second.request("apply", **spec_to_wire(host_only))["ok"] is True
    listed = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert "redirect to :4000" in listed and "chain prerouting" not in listed
    assert _first_rules(netns)["output"] == "meta skuid != 0-999 return"
    second.close_stdin()
    assert second.wait() == 0
    assert not table_present(netns)
    assert read_sysctl(netns, RESERVED) == before


def test_stale_table_of_any_content_is_removed_at_start(netns: str, start_helper) -> None:
    in_ns(netns, "nft", "-f", "-", stdin="table inet tray_proxy {\n\tchain x {\n\t}\n}\n")
    helper: HelperSession = start_helper()
    assert helper.request("status")["active"] is False
    # No NAT chain in it, so no open connection can depend on it: deleted at once.
    assert not table_present(netns)
    assert "removing a stale table" in helper.stderr()


DOCKER_LIKE = """
table ip nat {
	chain DOCKER {
		iifname "docker0" counter return
		iifname != "docker0" tcp dport 8080 counter dnat to 172.17.0.2:80
	}
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local counter jump DOCKER
	}
	chain OUTPUT {
		type nat hook output priority -100; policy accept;
		ip daddr != 127.0.0.0/8 fib daddr type local counter jump DOCKER
	}
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.17.0.0/16 oifname != "docker0" counter masquerade
	}
}
table inet filter {
	set blocked {
		type ipv4_addr
		flags interval
		elements = { 192.0.2.0/24 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
		ip saddr @blocked drop
		tcp dport 22 accept
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
	}
}
"""


def _others(ns: str) -> list[object]:
    """`nft -j list ruleset` without anything that belongs to table inet tray_proxy."""
    listing = json.loads(in_ns(ns, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    kept = []
    for entry in listing:
        ((kind, body),) = entry.items()
        # A table names itself with "name"; its chains, sets and rules name it with "table".
        owner = body.get("name") if kind == "table" else body.get("table")
        if body.get("family") == "inet" and owner == "tray_proxy":
            continue
        kept.append(entry)
    return kept


def test_other_tables_untouched_after_100_cycles(netns: str, start_helper) -> None:
    in_ns(netns, "nft", "-f", "-", stdin=DOCKER_LIKE)
    before = _others(netns)
    assert len(before) > 8, before
    helper: HelperSession = start_helper()
    wire = spec_to_wire(SPEC)
    for cycle in range(100):
        assert helper.request("apply", **wire)["ok"] is True, cycle
        assert helper.request("remove")["removed"] is True, cycle
    assert _others(netns) == before
    assert helper.request("apply", **wire)["ok"] is True
    assert _others(netns) == before
    helper.close_stdin()
    assert helper.wait() == 0
    assert not table_present(netns)
    assert _others(netns) == before


def test_refused_apply_keeps_the_previous_table(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    assert helper.request("apply", **spec_to_wire(SPEC))["ok"] is True
    before = ruleset_text(netns)
    answer = helper.request("apply", **{**spec_to_wire(SPEC), "relay_port": 70000})
    assert answer["ok"] is False
    assert str(answer["error"]).startswith("relay_port: ")
    assert ruleset_text(netns) == before


@pytest.mark.parametrize(
    ("line", "start"),
    [
        (b"not json", "request: "),
        (b"[1, 2]", "request: "),
        (b'{"v": 1, "id": 1, "op": "status", "v": 1}', "v: "),
        (b'{"v": 1, "id": 1, "op": "status", "x": NaN}', "request: "),
        (b'{"v": 2, "id": 1, "op": "status"}', "v: "),
        (b'{"v": 1.0, "id": 1, "op": "status"}', "v: "),
        (b'{"v": true, "id": 1, "op": "status"}', "v: "),
        (b'{"v": 1, "id": true, "op": "status"}', "id: "),
        (b'{"v": 1, "id": -1, "op": "status"}', "id: "),
        (b'{"v": 1, "op": "status"}', "id: "),
        (b'{"v": 1, "id": 1, "op": "flush"}', "op: "),
        (b'{"v": 1, "id": 1, "op": "status", "relay_port": 1}', "relay_port: "),
        (b'{"v": 1, "id": 1, "op": "apply"}', "relay_port: "),
        (b"\xff\xfe", "request: "),
        (b"[" * 100_00 + b"]" * 100_00, "request: "),
        (b"", "request: "),
    ],
)
def test_malformed_lines_get_an_error_answer(
    netns: str, start_helper, line: bytes, start: str
) -> None:
    helper: HelperSession = start_helper()
    answer = helper.line(line)
    assert answer["ok"] is False
    assert str(answer["error"]).startswith(start), answer
    assert helper.request("status")["ok"] is True  # still alive, still in sync


def test_line_longer_than_limit_is_refused_and_the_stream_resyncs(netns: str, start_helper) -> None:
    helper: HelperSession = start_helper()
    huge = b'{"v": 1, "id": 1, "op": "status", "pad": "' + b"x" * (200 * 1024) + b'"}\n'
    helper.send_raw(huge)
    answer = helper.read_answer()
    assert answer == {
        "v": 1,
        "id": None,
        "ok": False,
        "error": f"request: line longer than {helper_module.MAX_LINE_BYTES} bytes",
    }
    assert helper.request("status")["ok"] is True


def test_refuses_to_run_without_root() -> None:
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            SOURCE_HELPER_PATH,
        ],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2
    assert b"must run as root" in done.stderr


# -- in-process checks of the pure parts (no nft: the helper gets a path that does not exist,
#    so a bug that reached nft would fail loudly instead of touching the host's ruleset)


@pytest.mark.parametrize(
    ("text", "ports"),
    [("", set()), ("\n", set()), ("5", {5}), ("1-3,7", {1, 2, 3, 7}), (" 9 , 10-11 ", {9, 10, 11})],
)
def test_port_range_text_round_trip(text: str, ports: set[int]) -> None:
    assert helper_module.parse_port_ranges(text) == ports
    assert helper_module.parse_port_ranges(helper_module.format_port_ranges(ports)) == ports


def test_port_ranges_are_formatted_compactly() -> None:
    assert helper_module.format_port_ranges({3, 1, 2, 7, 9, 10}) == "1-3,7,9-10"


def test_a_signal_is_never_answered_as_a_request_error() -> None:
    """The signal handler's _Stop must pass `handle_line`'s `except Exception` untouched: an
    "internal error" answer to a request cut by SIGINT printed warnings while the app stopped
    (issue 14 bug 3); it must unwind into the cleanup instead."""
    assert issubclass(helper_module._Stop, BaseException)
    assert not issubclass(helper_module._Stop, Exception)


@pytest.mark.parametrize(
    ("line", "start"),
    [
        (b'{"v": 1, "id": 4, "op": "status", "id": 5}', "id: appears twice"),
        (b'{"v": 1, "id": 4, "op": "status", "x": Infinity}', "request: is not strict JSON"),
        (b'{"v": 1, "id": 4, "op": "remove", "relay_port": 1}', "relay_port: is not a field"),
        (b'{"v": 1, "id": 4, "op": "apply", "relay_port": 0}', "relay_port: must be from 1"),
    ],
)
def test_handle_line_refuses_without_reaching_nft(line: bytes, start: str) -> None:
    helper = helper_module.Helper(nft="/nonexistent/nft")
    answer = helper.handle_line(line)
    assert answer["ok"] is False
    assert str(answer["error"]).startswith(start), answer


# -- what `remove` is for: connections already redirected keep their address translation

# Runs inside the namespace: a stand-in relay on 127.0.0.1:RELAY that answers each line with
# "relay <line>", and client connections to a redirected address, driven by commands on stdin.
_PROBE = r"""
import socket, sys, threading
relay = socket.create_server(("127.0.0.1", int(sys.argv[1])))
accepted = []
def serve(conn):
    with conn:
        for line in conn.makefile("rb"):
            conn.sendall(b"relay " + line)
def accept():
    while True:
        conn, _ = relay.accept()
        accepted.append(conn)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
conns = []
print("ready", flush=True)
for command in sys.stdin:
    op, *arg = command.split()
    try:
        if op == "connect":
            s = socket.create_connection((arg[0], 80), timeout=1.0)
            conns.append(s)
            print("ok", len(conns) - 1, flush=True)
        elif op == "echo":
            s = conns[int(arg[0])]
            s.sendall(b"ping\n")
            print("ok", s.recv(100).decode().strip().replace(" ", "_"), flush=True)
        elif op == "accepted":
            print("ok", len(accepted), flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
"""


class _Probe:
    def __init__(self, ns: str, relay_port: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, SYSTEM_PYTHON, "-I", "-c", _PROBE, str(relay_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        assert ready, "the probe did not answer within 10 s"
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def test_remove_keeps_open_connections_and_stops_redirecting_new_ones(
    netns: str, start_helper
) -> None:
    # 198.51.100.1 (TEST-NET-2) is routed into a veth pair whose far end has no address (and
    # the pair lives and dies with the namespace): a connection that is not redirected goes
    # nowhere, so it can only succeed through the stand-in relay.
    in_ns(netns, "ip", "link", "add", "tpv0", "type", "veth", "peer", "name", "tpv1")
    in_ns(netns, "ip", "addr", "add", "198.51.100.2/24", "dev", "tpv0")
    in_ns(netns, "ip", "link", "set", "tpv0", "up")
    in_ns(netns, "ip", "link", "set", "tpv1", "up")
    spec = RuleSpec(relay_port=3129, redirect_ports=(80,), capture_containers=False)
    probe = _Probe(netns, 3129)
    try:
        helper: HelperSession = start_helper(listen=False)  # the probe listens on 3129
        assert helper.request("apply", **spec_to_wire(spec))["ok"] is True
        assert probe.ask("connect 198.51.100.1") == "ok 0"
        assert probe.ask("echo 0") == "ok relay_ping"

        assert helper.request("remove")["removed"] is True
        assert probe.ask("echo 0") == "ok relay_ping"  # still translated
        assert probe.ask("connect 198.51.100.1") == "error TimeoutError"  # not redirected
        assert probe.ask("accepted") == "ok 1"

        # On again while connection 0 is open: the table is replaced in one transaction.
        assert helper.request("apply", **spec_to_wire(spec))["ok"] is True
        assert probe.ask("echo 0") == "ok relay_ping"
        assert probe.ask("connect 198.51.100.1") == "ok 1"
        assert probe.ask("echo 1") == "ok relay_ping"

        # Why the table outlives `remove`: once it is deleted, the open connection's packets
        # are no longer translated and it stops working.
        assert helper.request("remove")["removed"] is True
        helper.close_stdin()
        assert helper.wait() == 0
        assert not table_present(netns)
        assert probe.ask("echo 0").startswith("error")
    finally:
        probe.close()
