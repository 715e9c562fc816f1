"""Benchmark of the routing core (not collected by pytest): ns per `Router.decide` for 0, 10
and 1,000 rules, cache hits and misses, and the PAC script (real pypac in its child) per
evaluation and per cache hit. Numbers go to docs/routing.md.

    .venv/bin/python -m tests.routing.bench_router
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tray_proxy.config import parse_config
from tray_proxy.routing.health import Health
from tray_proxy.routing.pac_worker import PacScript
from tray_proxy.routing.router import Router, RoutingTable

UPSTREAMS = '[[upstream]]\nname = "corp"\nurl = "http://proxy.corp:3128"\n'


def _router(n_rules: int, pac: PacScript | None = None) -> Router:
    text = ""
    if pac is not None:
        text += f'[routing]\ndefault = "pac"\npac_url = "{pac.location}"\n'
    for i in range(n_rules):
        match = [f"*.d{i}.example", f"10.{i % 256}.{i // 256}.0/24"] if i % 2 else [f"h{i}.example"]
        text += f'[[rule]]\nmatch = {match!r}\naction = "direct"\n'.replace("'", '"')
    config = parse_config(text + UPSTREAMS, "bench", local_port_range=(32768, 60999))
    return Router(RoutingTable(config.routing, config.upstreams), pac, Health())


def _ns(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> None:
    for n in (0, 10, 1000):
        r = _router(n)
        hit = _ns(lambda r=r: r.decide("pypi.org", "192.0.2.1", 443, None, 0.0), 100_000)
        hosts = [f"x{i}.sub{i % 7}.example" for i in range(20_000)]
        it = iter(hosts * 10)

        def miss(r: Router = r, it: Iterator[str] = it) -> object:
            r._cache.clear()
            return r.decide(next(it), "192.0.2.1", 443, None, 0.0)

        cold = _ns(miss, 20_000)
        print(f"{n:>5} rules: decide cached {hit:7.0f} ns, uncached {cold:7.0f} ns")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.pac"
        path.write_text(
            "function FindProxyForURL(url, host) {\n"
            '  if (isPlainHostName(host) || dnsDomainIs(host, ".corp.example")) return "DIRECT";\n'
            '  if (shExpMatch(host, "*.eu.example")) return "PROXY proxy.corp:3128; DIRECT";\n'
            '  return "PROXY proxy.corp:3128";\n'
            "}\n"
        )
        pac = PacScript(str(path))
        try:
            pac.refresh(0.0)
            r = _router(0, pac)
            counter = iter(range(10**9))
            evaluated = _ns(
                lambda: r.decide(f"h{next(counter)}.example", None, 443, None, 0.0), 2_000
            )
            r.decide("pypi.org", None, 443, None, 0.0)
            cached = _ns(lambda: r.decide("pypi.org", None, 443, None, 0.0), 100_000)
            raw = _ns(lambda: pac.find("https://pypi.org/", "pypi.org"), 2_000)
            print(
                f"PAC: evaluation {evaluated / 1000:7.1f} us per decide "
                f"(raw find {raw / 1000:.1f} us), cached {cached:5.0f} ns"
            )
        finally:
            pac.close()


if __name__ == "__main__":
    main()
