"""Run the real `curl` in a lab namespace, with proxy credentials passed in a config on stdin.

Secrets never reach argv: curl gets `--disable --config -` and everything else (URL, proxy,
proxy-user, CA) through the config text. Proxy variables of the calling environment are
dropped so only what the test asks for is used.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.creds import ProxyCredentials
from tests.lab.netns import Namespace


@dataclass
class CurlResult:
    returncode: int
    body: bytes = field(repr=False)
    info: dict[str, Any] = field(repr=False)
    stderr: str

    @property
    def http_code(self) -> int:
        return int(self.info.get("http_code") or 0)

    @property
    def connect_code(self) -> int:
        """The proxy's answer to CONNECT (0 without a CONNECT)."""
        return int(self.info.get("http_connect") or 0)

    @property
    def connect_error(self) -> str:
        """The system's reason a connect failed ("Connection refused"), from `verbose` output."""
        found = re.search(
            r"(?:connect to \S+ port \d+ failed|Immediate connect fail[^:]*): (.+)", self.stderr
        )
        return found[1].strip() if found else ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def __repr__(self) -> str:
        return (
            f"CurlResult(rc={self.returncode}, http={self.http_code}, "
            f"connect={self.connect_code}, body={len(self.body)} bytes, "
            f"local_port={self.info.get('local_port')}, connect_error={self.connect_error!r}, "
            f"stderr={self.stderr.strip()[-300:]!r})"
        )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl_config(
    url: str,
    *,
    proxy: str | None = None,
    credentials: ProxyCredentials | None = None,
    cacert: Path | None = None,
    resolve: Sequence[str] = (),
    output: Path | None = None,
    data_file: Path | None = None,
    max_time: float = 30.0,
    options: Sequence[str] = (),
) -> str:
    lines = [f"url = {_quote(url)}", "silent", "show-error", f"max-time = {max_time}"]
    if proxy is None:
        lines.append('noproxy = "*"')
    else:
        lines.append(f"proxy = {_quote(proxy)}")
    if credentials is not None:
        lines.append(f"proxy-user = {_quote(credentials.username + ':' + credentials.password)}")
    if cacert is not None:
        lines.append(f"cacert = {_quote(str(cacert))}")
    lines += [f"resolve = {_quote(entry)}" for entry in resolve]
    if output is not None:
        lines.append(f"output = {_quote(str(output))}")
    if data_file is not None:
        lines.append(f"data-binary = {_quote('@' + str(data_file))}")
    lines.append('write-out = "%{json}"')
    lines += list(options)
    return "\n".join(lines) + "\n"


def run_curl(
    ns: Namespace,
    url: str,
    *,
    workdir: Path,
    proxy: str | None = None,
    credentials: ProxyCredentials | None = None,
    cacert: Path | None = None,
    resolve: Sequence[str] = (),
    data: bytes | None = None,
    max_time: float = 30.0,
    options: Sequence[str] = (),
) -> CurlResult:
    """curl `url` from `ns`. Body and `-w %{json}` info come back; failures do not raise."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="curl-") as tmp:
        out = Path(tmp) / "body"
        data_file = None
        if data is not None:
            data_file = Path(tmp) / "upload"
            data_file.write_bytes(data)
        config = curl_config(
            url,
            proxy=proxy,
            credentials=credentials,
            cacert=cacert,
            resolve=resolve,
            output=out,
            data_file=data_file,
            max_time=max_time,
            options=options,
        )
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        result = subprocess.run(
            ["ip", "netns", "exec", ns.name, "curl", "--disable", "--config", "-"],
            input=config.encode(),
            capture_output=True,
            timeout=max_time + 15,
            env=env,
        )
        body = out.read_bytes() if out.exists() else b""
    try:
        info = json.loads(result.stdout or b"{}")
    except json.JSONDecodeError:
        info = {}
    return CurlResult(result.returncode, body, info, result.stderr.decode(errors="replace"))
