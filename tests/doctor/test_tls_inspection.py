"""The TLS-inspection check against a TLS-inspecting proxy on loopback.

The stand-in: a small CONNECT proxy in this test that answers 200 and then terminates TLS
itself with a certificate for the requested host issued by its own "Corp TLS Inspection CA"
(sent along in the chain, as inspecting proxies do), never reaching any origin. That is all a
client can observe of a real inspecting proxy. Squid's ssl-bump would do the same, but
needs Debian's squid-openssl build and a certificate generator helper in the lab; the check
under test only sees the certificates, so the stand-in is a fair one. Only loopback traffic.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.doctor.support import clean_env, one, parse_report, run_doctor, write_config
from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import CheckStatus
from tray_proxy.doctor.runner import run_checks

HOST = "intranet.corp.test"
CA_NAME = "CN=Corp TLS Inspection CA,O=Example Corp"


def _openssl(*args: str, cwd: Path) -> str:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass(frozen=True)
class Pki:
    ca: Path
    chain: Path  # leaf + CA, as the proxy sends it
    key: Path


def make_pki(directory: Path) -> Pki:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/O=Example Corp/CN=Corp TLS Inspection CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr",
             "-subj", f"/CN={HOST}", cwd=directory)  # fmt: skip
    (directory / "leaf.ext").write_text(
        f"subjectAltName=DNS:{HOST}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "leaf.crt", "-extfile", "leaf.ext",
             cwd=directory)  # fmt: skip
    chain = directory / "chain.pem"
    chain.write_text((directory / "leaf.crt").read_text() + (directory / "ca.crt").read_text())
    return Pki(directory / "ca.crt", chain, directory / "leaf.key")


class InspectingProxy:
    """CONNECT -> 200 -> TLS with our own certificate. Serves until closed."""

    def __init__(self, pki: Pki) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.chain, pki.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connects: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="inspecting-proxy", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.connects.append(head.split(b"\r\n", 1)[0])
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                # The client may refuse our certificate: then wrap_socket raises.
                with (
                    contextlib.suppress(OSError),
                    self.context.wrap_socket(conn, server_side=True) as tls,
                ):
                    tls.settimeout(2)
                    tls.recv(1)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=10)


@pytest.fixture
def inspecting(tmp_path: Path) -> Iterator[tuple[InspectingProxy, Pki]]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    proxy = InspectingProxy(pki)
    try:
        yield proxy, pki
    finally:
        proxy.close()


def test_untrusted_inspecting_ca_is_named_with_the_fix(
    inspecting: tuple[InspectingProxy, Pki], tmp_path: Path
) -> None:
    proxy, pki = inspecting
    # The target comes from the settings' [probe] target, as for the app's Test connection.
    config = write_config(
        tmp_path / "config.toml",
        [{"name": "corp", "url": f"http://127.0.0.1:{proxy.port}"}],
        extra=f'[probe]\ntarget = "{HOST}:443"\n',
    )
    result = run_doctor(
        ["--json", "--config", str(config), "--check", "upstream", "--check", "tls-inspection"],
        clean_env(),
    )
    doc = parse_report(result)
    assert one(doc, "upstream")["status"] == "ok"
    tls = one(doc, "tls-inspection")
    assert tls["status"] == "fail", tls
    assert tls["subject"] == "corp"
    assert (
        f'corp inspects TLS: the certificate {HOST} shows is issued by "{CA_NAME}"'
        in (tls["summary"])
    )
    assert f'the CA certificate "{CA_NAME}"' in tls["fix"]
    assert "sudo update-ca-certificates" in tls["fix"]
    fingerprint = _openssl("x509", "-in", str(pki.ca), "-noout", "-fingerprint", "-sha256",
                           cwd=tmp_path).strip().split("=", 1)[1]  # fmt: skip
    assert f"the proxy also sent that CA's certificate: SHA-256 {fingerprint}" in tls["details"]
    assert result.returncode == 1
    assert all(line == f"CONNECT {HOST}:443 HTTP/1.1".encode() for line in proxy.connects)


def test_inspecting_ca_trusted_locally_is_a_warning(
    inspecting: tuple[InspectingProxy, Pki], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA was added with update-ca-certificates: TLS works for the system's tools, but
    the finding says which tools keep their own CA list. (SSL_CERT_FILE stands in for the
    system store the test must not change; local_ca_dir for /usr/local/share/ca-certificates.)"""
    proxy, pki = inspecting
    local = tmp_path / "local-ca"
    local.mkdir()
    (local / "corp.crt").write_bytes(pki.ca.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    config = write_config(
        tmp_path / "config.toml", [{"name": "corp", "url": f"http://127.0.0.1:{proxy.port}"}]
    )
    env = DoctorEnv(config, environ={}, local_ca_dir=local, probe_target=(HOST, 443))
    report = asyncio.run(run_checks(env, only=("tls-inspection",)))
    (result,) = report.results
    assert result.status is CheckStatus.WARN, result
    assert "corp inspects TLS" in result.summary and CA_NAME in result.summary
    assert "pip config set global.cert" in (result.fix or "")

    # The same CA trusted, but not one an administrator added: just trusted.
    env = DoctorEnv(config, environ={}, local_ca_dir=tmp_path / "none", probe_target=(HOST, 443))
    (result,) = asyncio.run(run_checks(env, only=("tls-inspection",))).results
    assert result.status is CheckStatus.OK, result
    assert f"issued by {CA_NAME}" in result.summary


def test_plain_http_target_has_no_certificate(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", [{"name": "corp", "url": "http://127.0.0.1:9"}])
    env = DoctorEnv(config, environ={}, probe_target=(HOST, 80))
    (result,) = asyncio.run(run_checks(env, only=("tls-inspection",))).results
    assert result.status is CheckStatus.SKIP
    assert result.summary == f"the probe target {HOST}:80 is plain HTTP: no certificate to look at"
