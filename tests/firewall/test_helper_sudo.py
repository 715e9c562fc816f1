"""The sudo path end to end: a member of group tray-proxy starts the installed helper with
`sudo -n` under the installer's sudoers drop-in, and the helper serves that member (SUDO_UID,
written by sudo itself) whatever uid variables the member put in its own environment.

It reuses the private mount namespace of test_e2e_pkexec.py (/etc and /usr/libexec overlays
with the test users, the group and the installed helper); the drop-in is installed into that
overlay only. Nothing on the host changes. The helper runs in the lab's client namespace.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

import pytest

from tests.firewall.conftest import Listener
from tests.firewall.e2e_support import LOOPBACK_ONLY, client_left_clean, has_our_table
from tests.firewall.test_e2e_pkexec import INSTALLER, REPO, polkit_sandbox
from tests.integration.relay import allocate_port
from tests.lab.environment import Lab
from tray_proxy.firewall.client import INSTALLED_HELPER_PATH
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

pytestmark = pytest.mark.lab

# Runs as the member with the system python: one apply at a port root listens on (refused),
# one at a port the member listens on (granted), then redirect off and stop.
MEMBER_SCRIPT = r"""
import asyncio, json, socket, sys
sys.path.insert(0, sys.argv[1])
from tray_proxy.firewall.client import RedirectController, RedirectError
from tray_proxy.firewall.ruleset import spec_from_wire

async def main():
    mine = socket.socket()
    mine.bind(("127.0.0.1", 0))
    mine.listen()
    fields = json.loads(sys.argv[2])
    controller = RedirectController(command=["sudo", "-n", sys.argv[3]], start_timeout=30)
    try:
        await controller.start()
    except RedirectError as exc:
        print("error", type(exc).__name__, exc, flush=True)
        return
    try:
        for port in (int(sys.argv[4]), mine.getsockname()[1]):
            try:
                await controller.apply(spec_from_wire({**fields, "relay_port": port}))
                status = await controller.status()
                print("applied", json.dumps([status.owner_uid, status.captured]), flush=True)
            except RedirectError as exc:
                print("error", str(exc).replace(chr(10), " "), flush=True)
        print("removed", await controller.remove(), flush=True)
    finally:
        print("stopped", await controller.stop(), flush=True)

asyncio.run(main())
"""


def test_sudo_member_is_served_as_itself_whatever_its_environment_says(lab: Lab) -> None:
    if shutil.which("sudo") is None:
        pytest.fail("the sudo test needs sudo (apt-get install sudo)", pytrace=False)
    with client_left_clean(lab), polkit_sandbox(lab) as box:
        drop_in = INSTALLER / "sudoers" / "tray-proxy"
        install = [*box.mount_ns, "install", "-o", "root", "-g", "root", "-m", "0440"]
        done = subprocess.run(
            [*install, str(drop_in), "/etc/sudoers.d/tray-proxy"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # PAM's account check (pam_unix) wants the member in shadow: added to the overlay's
        # copy of /etc/shadow ('*': no password works, the drop-in needs none).
        entry = f"tptest{box.member}:*:19000:0:99999:7:::"
        done = subprocess.run(
            [*box.mount_ns, "sh", "-c", 'echo "$1" >> /etc/shadow', "sh", entry],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        script = box.workdir / "member_sudo.py"
        script.write_text(MEMBER_SCRIPT)
        script.chmod(0o644)
        spec = RuleSpec(
            relay_port=1,  # replaced by the script
            excluded_networks=tuple(ipaddress.ip_network(n) for n in LOOPBACK_ONLY),
            capture_containers=False,
        )
        root_port = allocate_port(lab)
        roots = Listener(lab.client.name, root_port)  # root's, e.g. another user's service
        try:
            argv = [
                # A member's own claims: sudo's env_reset drops them and writes SUDO_UID.
                *("env", "PKEXEC_UID=0", "SUDO_UID=0"),
                *("/usr/bin/python3", "-I", str(script), str(REPO)),
                json.dumps(spec_to_wire(spec)),
                INSTALLED_HELPER_PATH,
                str(root_port),
            ]
            member = subprocess.run(
                box.as_user(box.member, lab.client.name, argv),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
        finally:
            roots.close()
        lines = member.stdout.strip().splitlines()
        who = f"uid {box.member} (tptest{box.member})"
        assert lines == [
            f"error The redirect helper refused 'apply': relay_port: {root_port} is not a port"
            f" your user (uid {box.member}) listens on",
            "applied " + json.dumps([box.member, f"{who} and system accounts (uid < 1000)"]),
            "removed True",
            "stopped 0",
        ], (member.stdout, member.stderr)
        assert not has_our_table(lab.client)
