"""Hypothesis feeds the resident helper random and malformed request lines.

Every line must get one error answer that names what was wrong, the helper must stay alive,
and the applied ruleset must stay byte-identical. One helper process serves all examples.
And every request `spec_from_wire` accepts (valid ones and ones mutated away from canonical
text) must render to text that `nft -c` accepts, in a throwaway namespace.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.firewall.conftest import HelperSession, in_ns, make_netns, ruleset_text, unique_name
from tray_proxy.firewall.helper import MAX_LINE_BYTES, SPEC_FIELDS
from tray_proxy.firewall.ruleset import (
    Bridge,
    RuleSpec,
    SpecError,
    render,
    spec_from_wire,
    spec_to_wire,
)

VALID = spec_to_wire(RuleSpec(relay_port=3129))
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Fuzzed:
    def __init__(self, helper: HelperSession, baseline: str) -> None:
        self.helper = helper
        self.baseline = baseline
        self.next_id = 1000

    def check_refused(self, line: bytes, expected_id: int | None = None) -> str:
        answer = self.helper.line(line)
        assert answer.get("ok") is False, (line[:200], answer)
        assert answer.get("v") == 1
        if expected_id is not None:
            assert answer.get("id") == expected_id
        error = answer.get("error")
        assert isinstance(error, str)
        assert 5 <= len(error) <= 600, error
        assert not error.startswith("internal error"), error
        assert "\n" not in error
        assert self.helper.proc.poll() is None, self.helper.stderr()
        assert ruleset_text(self.helper.ns) == self.baseline
        return error


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    with make_netns(unique_name("tpfz")) as ns:
        helper = HelperSession(ns)
        try:
            assert helper.request("apply", **VALID)["ok"] is True
            yield Fuzzed(helper, ruleset_text(ns))
        finally:
            helper.shutdown()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def _not_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        return True
    return False


def _not_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return True
    return False


bad_port = (
    st.integers(max_value=0)
    | st.integers(min_value=65536, max_value=10**20)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.none()
)
good_port = st.integers(min_value=1, max_value=65535).filter(lambda p: p not in (80, 443, 3129))
bad_network = st.text(max_size=50).filter(_not_network) | st.sampled_from(
    ["10.0.0.1/8", "300.1.1.1/8", "10.0.0.0/33", "fe80::1/10", "::/129", "1.2.3.4/-1"]
)
bad_ifname = st.text(max_size=20).filter(
    lambda n: not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\*?", n)
) | st.sampled_from(["lo", "l*", "lo*", 'x" accept', "a" * 16, "br-*x", "*"])

# One corrupted field of an otherwise valid apply: (field the error must name, bad value).
corruptions = st.one_of(
    st.tuples(st.just("relay_port"), bad_port | st.sampled_from([80, 443])),
    st.tuples(st.just("redirect_ports"), json_values.filter(lambda v: not isinstance(v, list))),
    st.tuples(
        st.just("redirect_ports"),
        st.lists(good_port, min_size=1, max_size=3).flatmap(
            lambda ports: st.tuples(bad_port, st.integers(0, len(ports))).map(
                lambda pair: ports[: pair[1]] + [pair[0]] + ports[pair[1] :]
            )
        ),
    ),
    st.tuples(st.just("redirect_ports"), st.just([])),
    st.tuples(st.just("redirect_ports"), st.lists(good_port, min_size=33, max_size=40)),
    st.tuples(st.just("redirect_ports"), good_port.map(lambda p: [p, p])),
    st.tuples(st.just("excluded_networks"), st.lists(bad_network, min_size=1, max_size=3)),
    st.tuples(
        st.just("excluded_networks"),
        st.lists(json_values, min_size=1).filter(
            lambda v: not all(isinstance(x, str) and not _not_network(x) for x in v)
        ),
    ),
    st.tuples(
        st.just("upstreams"),
        st.lists(st.tuples(st.just("10.1.1.1"), bad_port).map(list), min_size=1, max_size=2),
    ),
    st.tuples(
        st.just("upstreams"),
        st.lists(
            st.tuples(st.text(max_size=30).filter(_not_address), good_port).map(list),
            min_size=1,
            max_size=2,
        ),
    ),
    st.tuples(
        st.just("upstreams"),
        st.lists(
            st.lists(json_values, max_size=4).filter(lambda v: len(v) != 2), min_size=1, max_size=2
        ),
    ),
    st.tuples(
        st.just("relay_source_ports"),
        st.lists(st.integers(1024, 65535), min_size=0, max_size=4).filter(lambda v: len(v) != 2),
    ),
    st.tuples(
        st.just("relay_source_ports"),
        st.tuples(st.integers(1025, 65535), st.integers(1024, 65534))
        .filter(lambda p: p[0] > p[1])
        .map(list),
    ),
    st.tuples(
        st.just("relay_source_ports"),
        st.tuples(bad_port | st.integers(1, 1023), st.just(2000)).map(list),
    ),
    st.tuples(st.just("container_interfaces"), st.lists(bad_ifname, min_size=1, max_size=3)),
    st.tuples(st.just("container_interfaces"), st.lists(good_port, min_size=1, max_size=2)),
    st.tuples(st.just("container_interfaces"), st.just([])),
    st.tuples(st.just("capture_containers"), json_values.filter(lambda v: not isinstance(v, bool))),
    st.tuples(st.just("reject_quic"), json_values.filter(lambda v: not isinstance(v, bool))),
)


@FUZZ
@given(corruption=corruptions)
def test_one_bad_field_is_refused_naming_it(fuzzed: Fuzzed, corruption: tuple[str, object]) -> None:
    field, value = corruption
    fuzzed.next_id += 1
    request = {"v": 1, "id": fuzzed.next_id, "op": "apply", **VALID, field: value}
    error = fuzzed.check_refused(json.dumps(request).encode(), fuzzed.next_id)
    allowed = (field, "relay_port") if field == "redirect_ports" else (field,)
    assert error.startswith(allowed), (field, value, error)


@FUZZ
@given(
    key=st.text(min_size=1, max_size=30).filter(lambda k: k not in (*SPEC_FIELDS, "v", "id", "op")),
    value=json_values,
    op=st.sampled_from(["apply", "status", "remove"]),
)
def test_unknown_field_is_refused(fuzzed: Fuzzed, key: str, value: object, op: str) -> None:
    fuzzed.next_id += 1
    fields = VALID if op == "apply" else {}
    request = {"v": 1, "id": fuzzed.next_id, "op": op, **fields, key: value}
    error = fuzzed.check_refused(json.dumps(request).encode(), fuzzed.next_id)
    assert error.startswith(repr(key)[1:-1][:20]), (key, error)


@FUZZ
@given(v=json_values, op=json_values, rid=json_values)
def test_bad_envelope_is_refused(fuzzed: Fuzzed, v: object, op: object, rid: object) -> None:
    valid_id = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2**53
    if type(v) is int and v == 1 and valid_id and op in ("status", "remove", "apply"):
        v = 2  # keep the envelope invalid
    request = {"v": v, "id": rid, "op": op}
    error = fuzzed.check_refused(json.dumps(request).encode())
    assert error.startswith(("id: ", "v: ", "op: ", "relay_port: ")), error


@FUZZ
@given(data=st.binary(max_size=2000).filter(lambda b: b"\n" not in b))
def test_random_bytes_are_refused(fuzzed: Fuzzed, data: bytes) -> None:
    fuzzed.check_refused(data)


@settings(max_examples=10, deadline=None)
@given(size=st.integers(MAX_LINE_BYTES + 1, 4 * MAX_LINE_BYTES))
def test_huge_lines_are_refused(fuzzed: Fuzzed, size: int) -> None:
    error = fuzzed.check_refused(b"{" + b"7" * size)
    assert error.startswith("request: line longer than")


# -- every request the helper accepts renders to text nft accepts (issue 16 item 5)

NFT_CHECK = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    """A throwaway namespace for `nft -c` (a check touches no ruleset, but stays out of ours)."""
    with make_netns(unique_name("tpnc")) as ns:
        yield ns


def _mutate(text: str, how: int) -> str:
    """One way a client could write a value that is not its canonical form."""
    return [
        text,
        text.upper(),
        " " + text,
        text + "\n",
        "0" + text,
        text.replace(":", ":0", 1),
        text.replace("/", "%eth0/", 1) if "/" in text else text + "%eth0",
        text + "%x }\n}\ntable ip pwn {",
        text.replace(".", ".0", 1),
    ][how]


def _network_text(draw: st.DrawFn) -> str:
    version = draw(st.sampled_from([4, 6]))
    address = draw(st.ip_addresses(v=version))
    prefix = draw(st.integers(0, 32 if version == 4 else 128))
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


interface_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\*?", fullmatch=True).filter(
    lambda n: not (n == "lo" or (n.endswith("*") and "lo".startswith(n[:-1])))
)


@st.composite
def wire_requests(draw: st.DrawFn) -> dict[str, object]:
    """An apply request's fields: mostly valid, some values mutated away from canonical."""
    mutate = draw(st.booleans())
    relay = draw(st.integers(1, 65535))
    fields: dict[str, object] = {"relay_port": relay}
    if draw(st.booleans()):
        fields["redirect_ports"] = draw(
            st.lists(
                st.integers(1, 65535).filter(lambda p: p != relay),
                min_size=1,
                max_size=8,
                unique=True,
            )
        )
    if draw(st.booleans()):
        nets = [_network_text(draw) for _ in range(draw(st.integers(0, 6)))]
        if mutate and nets:
            i = draw(st.integers(0, len(nets) - 1))
            nets[i] = _mutate(nets[i], draw(st.integers(0, 8)))
        fields["excluded_networks"] = nets
    if draw(st.booleans()):
        ups: list[list[object]] = [
            [str(draw(st.ip_addresses())), draw(st.integers(1, 65535))]
            for _ in range(draw(st.integers(0, 4)))
        ]
        if mutate and ups:
            i = draw(st.integers(0, len(ups) - 1))
            ups[i][0] = _mutate(str(ups[i][0]), draw(st.integers(0, 8)))
        fields["upstreams"] = ups
    if draw(st.booleans()):
        first = draw(st.integers(1024, 65535))
        fields["relay_source_ports"] = [first, draw(st.integers(first, 65535))]
    if draw(st.booleans()):
        fields["container_interfaces"] = draw(st.lists(interface_names, min_size=1, max_size=4))
    for flag in ("capture_containers", "reject_quic"):
        if draw(st.booleans()):
            fields[flag] = draw(st.booleans())
    if draw(st.booleans()):
        fields["capture"] = draw(st.sampled_from(["owner", "owner+system", "all", "All", "owner "]))
    return fields


@st.composite
def bridges(draw: st.DrawFn) -> tuple[Bridge, ...]:
    found = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", fullmatch=True))
        network = ipaddress.ip_network(
            f"{draw(st.ip_addresses(v=4))}/{draw(st.integers(8, 30))}", strict=False
        )
        address = network.network_address + draw(st.integers(1, network.num_addresses - 2))
        found.append(Bridge(name, address, network))
    return tuple(found)


@NFT_CHECK
@given(fields=wire_requests(), owner=st.integers(0, 2**32 - 2), found=bridges())
def test_every_accepted_request_renders_to_text_nft_accepts(
    check_ns: str, fields: dict[str, object], owner: int, found: tuple[Bridge, ...]
) -> None:
    try:
        spec = spec_from_wire(json.loads(json.dumps(fields)))
    except SpecError:
        return
    # Accepted means canonical: what the client sent is what the helper would write.
    wire = spec_to_wire(spec)
    assert {k: wire[k] for k in fields} == fields
    text = render(spec, owner_uid=owner, bridges=found)
    assert text.count("\ntable ") == 1 and "pwn" not in text
    done = in_ns(check_ns, "nft", "-c", "-f", "-", stdin=text, check=False)
    assert done.returncode == 0, (fields, done.stderr, text)


def test_the_scoped_ipv6_injection_never_reaches_nft(fuzzed: Fuzzed) -> None:
    """issue 16 item 5: accepted before, and only nft's parser stopped it."""
    for field, value in (
        ("upstreams", [["fe80::1%x }\n}\ntable ip pwn {", 80]]),
        ("excluded_networks", ["fe80::1%x }\n}\ntable ip pwn {/128"]),
    ):
        fuzzed.next_id += 1
        request = {"v": 1, "id": fuzzed.next_id, "op": "apply", **VALID, field: value}
        error = fuzzed.check_refused(json.dumps(request).encode(), fuzzed.next_id)
        assert error.startswith(f"{field}[0]: ") and "scope id" in error, error
    assert "nft refused" not in fuzzed.helper.stderr()
