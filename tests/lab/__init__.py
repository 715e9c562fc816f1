"""The real-proxy lab: network namespaces with Squid, Dante and origin servers, for integration
tests (pytest fixtures in `tests.lab.fixtures`) and for `bench/` scripts (`with Lab() as lab:`).

In a test (fixtures registered by tests/conftest.py):

    def test_something(lab, squid_factory):
        r = lab.curl(lab.origins.url("https", lab.origins.bytes_path(10_000, "s1")), via=lab.squid)
        assert r.sha256 == lab.origins.expected_sha256(10_000, "s1")
        lab.squid.wait_for_entry(lambda e: e.method == "CONNECT" and e.status == 200)
        relay = lab.client.popen(["tray-proxy", "run", "--config", str(cfg), "--no-redirect"])
        with lab.redirect(relay_port):        # nft redirect in the client namespace
            ...
        squid443 = squid_factory(port=443, auth="none")   # extra Squid, gone after the test

In a bench script: `with Lab() as lab: ...` (run from the repository root with `python -m`).
Set TPLAB_KEEP=1 to keep the lab's temp dir (configs, logs) after the run.

Must not import tray_proxy or PySide6; only `fixtures.py` and `test_lab.py` import pytest.
"""

from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult, run_curl
from tests.lab.dante import DanteProxy
from tests.lab.environment import Lab
from tests.lab.netns import (
    LabError,
    LabPrerequisiteError,
    Namespace,
    Redirect,
    apply_redirect,
    cleanup_stale,
)
from tests.lab.origins import Origins
from tests.lab.squid import BasicAuth, NoAuth, SquidAuth, SquidProxy

__all__ = [
    "BasicAuth",
    "CurlResult",
    "DanteProxy",
    "Lab",
    "LabError",
    "LabPrerequisiteError",
    "Namespace",
    "NoAuth",
    "Origins",
    "ProxyCredentials",
    "Redirect",
    "SquidAuth",
    "SquidProxy",
    "apply_redirect",
    "cleanup_stale",
    "run_curl",
]
