"""A lab Squid configured as Debian ships it: /etc/squid/squid.conf's rules, unchanged.

The lab's own `SquidProxy` allows CONNECT to port 80 (`acl SSL_ports port 443 80 5001`), as
an accommodating corporate proxy would. Most proxies are not accommodating: Debian's stock
squid.conf says `http_access deny CONNECT !SSL_ports` with `acl SSL_ports port 443`, so
`CONNECT host:80` gets 403 (issue 15 section 4). `StockSquid` renders the shipped file with
only what a lab instance must change (Debian's own comment marks where a site adds its rule):

- `include /etc/squid/conf.d/*.conf`, the place for "your own rules to allow access from your
  clients", becomes the auth scheme's lines and `http_access allow localnet authed` (the
  lab client is in the stock `localnet`): the one rule any site that uses this Squid adds;
- `http_port 3128` listens on the proxy namespace's addresses; `coredump_dir` and the pid,
  log and hosts files live in the instance's directory; no DNS (the lab's names come from
  `hosts_file`); the access log has the lab's parseable format; no pinger.

Every `acl`, `http_access` deny rule and `refresh_pattern` of the shipped file stays as it is,
in its order. The file is checked for the stock deny rules first, so a machine whose
squid.conf was edited fails loudly instead of testing something else.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.lab.netns import LabError
from tests.lab.squid import LOG_FORMAT, SQUID_USER, SquidProxy

STOCK_CONF = Path("/etc/squid/squid.conf")
# What makes it "stock" for the tests that use it, in this order.
STOCK_RULES = (
    "acl SSL_ports port 443",
    "http_access deny !Safe_ports",
    "http_access deny CONNECT !SSL_ports",
    "http_access allow localhost",
    "http_access deny all",
)
_INCLUDE = "include /etc/squid/conf.d/*.conf"


def stock_lines(path: Path = STOCK_CONF) -> list[str]:
    """The shipped file's directives (comments and blank lines dropped), checked."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.split()))
    positions = []
    for rule in STOCK_RULES:
        if rule not in lines:
            raise LabError(
                f"{path} is not Debian's stock squid.conf (no {rule!r}); reinstall it: "
                "apt-get install --reinstall -o Dpkg::Options::=--force-confmiss squid"
            )
        positions.append(lines.index(rule))
    if positions != sorted(positions) or _INCLUDE not in lines:
        raise LabError(f"{path} has the stock rules in another order or no conf.d include")
    return lines


class StockSquid(SquidProxy):
    """A `SquidProxy` whose config is Debian's shipped squid.conf (see the module docstring)."""

    def render_config(self, auth_lines: Sequence[str]) -> str:
        listen = [f"http_port {f'[{a}]' if ':' in a else a}:{self.port}" for a in self.addresses]
        if self.auth.required:
            allow = ["acl authed proxy_auth REQUIRED", "http_access allow localnet authed"]
        else:
            allow = ["http_access allow localnet"]
        w = self.workdir
        out: list[str] = ["# tray-proxy lab: Debian's stock squid.conf, rendered by squid_stock.py"]
        for line in stock_lines():
            if line == _INCLUDE:
                out += [*auth_lines, *allow]
            elif line.startswith("http_port "):
                out += listen
            elif line.startswith("coredump_dir "):
                out.append(f"coredump_dir {w}")
            else:
                out.append(line)
        out += [
            f"pid_filename {self.pid_file}",
            f"cache_log {self.cache_log}",
            f"logformat tplab {LOG_FORMAT}",
            f"access_log stdio:{self.access_log} logformat=tplab",
            "buffered_logs off",
            "strip_query_terms off",
            "logfile_rotate 0",  # what Debian's conf.d/debian.conf sets
            f"hosts_file {w / 'hosts'}",
            "dns_nameservers 127.0.0.1",
            "dns_timeout 2 seconds",
            "shutdown_lifetime 0 seconds",
            "pinger_enable off",
            "netdb_filename none",
            "visible_hostname tplab-stock-squid",
            f"cache_effective_user {SQUID_USER}",
            "",
        ]
        return "\n".join(out)
