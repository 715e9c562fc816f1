"""A throwaway CA and server certificate for the lab's HTTPS origin, made with the `openssl` CLI.

Keys are fresh per lab and live only in the lab's temp dir. Plain Python (no pytest).
Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netns import LabError


@dataclass(frozen=True)
class LabPKI:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


def _openssl(args: Sequence[str], cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise LabError(f"openssl {args[0]} failed: {result.stderr.decode(errors='replace')}")


def make_pki(directory: Path, dns_names: Sequence[str], ip_addresses: Sequence[str]) -> LabPKI:
    """CA (`ca.crt`) and a server certificate for `dns_names` and `ip_addresses` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        [
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3",
            "-subj", "/CN=tray-proxy lab CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
        directory,
    )  # fmt: skip
    _openssl(
        ["req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
         "-subj", f"/CN={dns_names[0]}"],
        directory,
    )  # fmt: skip
    san = ",".join([f"DNS:{n}" for n in dns_names] + [f"IP:{a}" for a in ip_addresses])
    (directory / "server.ext").write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        [
            "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "3", "-out", "server.crt", "-extfile", "server.ext",
        ],
        directory,
    )  # fmt: skip
    for key in ("ca.key", "server.key"):
        (directory / key).chmod(0o600)
    return LabPKI(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
