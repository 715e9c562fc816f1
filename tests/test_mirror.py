"""The tests mirror the source tree: every module under tray_proxy/ has its test module at the
same path (tray_proxy/a/b.py -> tests/a/test_b.py), or is listed below with the test file that
exercises it instead and why. A new module without either fails here."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tray_proxy"
TESTS = ROOT / "tests"

# module -> (test file, a text that file holds to show it exercises the module, why it is there)
COVERED_ELSEWHERE: dict[str, tuple[str, str, str]] = {
    "__main__.py": (
        "tests/test_cli.py",
        '"-m", "tray_proxy"',
        "the entry point: the CLI tests run `python -m tray_proxy` as a process",
    ),
    "app.py": (
        "tests/ui/test_app.py",
        "from tray_proxy.app import",
        "the Qt composition root: its tests need a QApplication, so they live with the UI's",
    ),
    "cli_credentials.py": (
        "tests/test_keyring_store.py",
        "from tray_proxy import cli_credentials",
        "`tray-proxy credentials` is tested against the real keyring beside the store it drives",
    ),
    "cli_rules.py": (
        "tests/routing/test_cli_rules.py",
        '"rules"',
        "`tray-proxy rules` is tested beside the routing it explains",
    ),
    "cli_unlock.py": (
        "tests/test_keyring_store.py",
        "from tray_proxy.cli_unlock import",
        "unlocking the keyring is tested with the keyring store, on a real gnome-keyring",
    ),
    "controller/diagnostics.py": (
        "tests/controller/test_core.py",
        "rig.controller.diagnostics(",
        "the report is asked of the controller, which assembles it",
    ),
    "controller/engine_relay.py": (
        "tests/relay/test_runner.py",
        "from tray_proxy.controller.engine_relay import EngineRelay",
        "the adapter over the relay's thread is tested with that thread (relay/runner.py)",
    ),
    "controller/history.py": (
        "tests/ui/test_app.py",
        "from tray_proxy.controller.history import",
        "the history file is opened by the app; tested through its services",
    ),
    "controller/services.py": (
        "tests/test_cli_setup.py",
        "ConfigFile",
        "protocols (checked by mypy) and ConfigFile, which setup and the app write through",
    ),
    "controller/status.py": (
        "tests/controller/test_core.py",
        "State.ON",
        "the states and the Status snapshot are the controller's output: asserted there",
    ),
    "doctor/context.py": (
        "tests/doctor/test_runner.py",
        "from tray_proxy.doctor.context import DoctorEnv",
        "the environment every check runs in, tested with the runner",
    ),
    "doctor/model.py": (
        "tests/doctor/test_runner.py",
        "from tray_proxy.doctor.model import",
        "the result types, tested with the runner and renderers that use them",
    ),
    "doctor/nat_probe.py": (
        "tests/doctor/test_checks_system.py",
        "check_nat_redirect",
        "a script the NAT check runs in a throwaway namespace: tested through that check",
    ),
    "doctor/render.py": (
        "tests/doctor/test_runner.py",
        "from tray_proxy.doctor.render import",
        "the renderers are tested with the runner whose report they render",
    ),
    "monitor/attribution_worker.py": (
        "tests/monitor/test_attribution.py",
        "attribution_worker.main()",
        "a worker process of the attributor: tested through it",
    ),
    "monitor/history_writer_worker.py": (
        "tests/monitor/test_history.py",
        "tray_proxy.monitor.history_writer_worker",
        "a worker process of the history writer: tested through it",
    ),
    "monitor/query.py": (
        "tests/monitor/test_history.py",
        "from tray_proxy.monitor.query import",
        "the history's queries are tested on the history file they read",
    ),
    "relay/aio.py": (
        "tests/relay/test_opening.py",
        "did not complete the handshake within",
        "within(), the relay's time limit, is asserted through the limits it enforces",
    ),
    "relay/failures.py": (
        "tests/relay/test_upstream.py",
        "UpstreamError",
        "the failures and their words are raised by the upstream connectors",
    ),
    "relay/probe.py": (
        "tests/relay/test_auth_engine.py",
        "from tray_proxy.relay.probe import",
        "the upstream probe is tested against the proxy stubs of the auth engine tests",
    ),
    "relay/protocol/auth.py": (
        "tests/relay/protocol/test_protocol_auth.py",
        "tray_proxy.relay.protocol.auth",
        "named test_protocol_auth beside relay/test_auth*.py, which test the engine's auth",
    ),
    "relay/protocol/errors.py": (
        "tests/relay/protocol/test_protocol_errors.py",
        "tray_proxy.relay.protocol.errors",
        "named test_protocol_errors, as test_protocol_auth",
    ),
    "relay/records.py": (
        "tests/relay/test_engine.py",
        "from tray_proxy.relay.records import",
        "the connection records are the engine's output: asserted in the engine tests",
    ),
    "relay/settings.py": (
        "tests/test_config.py",
        "from tray_proxy.relay.settings import",
        "the relay's settings are built and checked by the config file's loader",
    ),
    "relay/sockets.py": (
        "tests/relay/test_local_proxy.py",
        "from tray_proxy.relay.sockets import",
        "socket options, read from outside with `ss -ti` on real connections",
    ),
    "relay/spnego_auth.py": (
        "tests/relay/test_auth_engine.py",
        "import spnego",
        "NTLM/Negotiate with real pyspnego on both sides (Kerberos: test_kerberos_lab.py)",
    ),
    "routing/pac_source.py": (
        "tests/routing/test_pac_worker.py",
        "from tray_proxy.routing.pac_source import",
        "fetching the PAC file is tested with the worker that evaluates it",
    ),
    "routing/select.py": (
        "tests/routing/test_health.py",
        "from tray_proxy.routing.select import",
        "the order of upstreams follows from their health: tested together",
    ),
    "setup_flow.py": (
        "tests/test_cli_setup.py",
        "from tray_proxy.setup_flow import",
        "the steps of `tray-proxy setup` (and of the setup window, tests/ui/test_setup_window.py)",
    ),
    "ui/dashboard/connections.py": (
        "tests/ui/test_connections_tab.py",
        "from tray_proxy.ui.dashboard.connections import",
        "named after the tab the user sees",
    ),
    "ui/dashboard/log.py": (
        "tests/ui/test_log_tab.py",
        "from tray_proxy.ui.dashboard.log import",
        "named after the tab the user sees",
    ),
    "ui/dashboard/overview.py": (
        "tests/ui/test_main_window.py",
        "def test_overview_",
        "the Overview tab is tested in the window that holds it",
    ),
    "ui/dashboard/pace.py": (
        "tests/ui/test_pace.py",
        "from tray_proxy.ui.dashboard.pace import",
        "tests/ui/ holds the dashboard's tests in one folder",
    ),
    "ui/dashboard/tables.py": (
        "tests/ui/test_connection_models.py",
        "from tray_proxy.ui.dashboard.tables import",
        "the table views are tested with the models they show",
    ),
    "ui/dashboard/upstreams.py": (
        "tests/integration/test_dashboard_lab.py",
        "from tray_proxy.ui.dashboard.upstreams import",
        "the upstream cards need real proxies and probes: the dashboard lab",
    ),
    "ui/menu.py": (
        "tests/ui/test_tray.py",
        "from tray_proxy.ui.menu import",
        "the tray's menu is tested with the tray",
    ),
    "ui/models/columns.py": (
        "tests/ui/test_connection_models.py",
        "from tray_proxy.ui.models.columns import",
        "the column constants are asserted through the models that use them",
    ),
    "ui/models/connections.py": (
        "tests/ui/test_connection_models.py",
        "tray_proxy.ui.models.connections",
        "one file for the live connection tables' models",
    ),
    "ui/models/log.py": (
        "tests/ui/test_log_tab.py",
        "from tray_proxy.ui.models.log import",
        "the log model is tested with the log tab",
    ),
    "ui/services.py": (
        "tests/ui/test_credentials_dialog.py",
        "from tray_proxy.ui.services import",
        "the services the views call are tested through the views (and tests/ui/test_app.py)",
    ),
}


def source_modules() -> list[str]:
    """Every module, relative to tray_proxy/. Package __init__ files are left out: they hold
    the package's docstring and re-exports, tested through the modules they re-export."""
    return sorted(
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )


def mirror(module: str) -> Path:
    path = Path(module)
    return TESTS / path.parent / f"test_{path.name}"


def test_every_module_has_its_test_module() -> None:
    missing = [
        f"tray_proxy/{m}: add {mirror(m).relative_to(ROOT)} (or list it in COVERED_ELSEWHERE)"
        for m in source_modules()
        if not mirror(m).is_file() and m not in COVERED_ELSEWHERE
    ]
    assert missing == [], "\n".join(missing)


def test_listed_test_files_exercise_their_module() -> None:
    wrong = []
    for module, (test_file, needle, reason) in COVERED_ELSEWHERE.items():
        assert reason, module
        path = ROOT / test_file
        if not path.is_file():
            wrong.append(f"{module}: {test_file} does not exist")
        elif needle not in path.read_text(encoding="utf-8"):
            wrong.append(f"{module}: {test_file} no longer holds {needle!r}")
    assert wrong == [], "\n".join(wrong)


def test_the_list_holds_only_what_it_must() -> None:
    """A module that is gone, or has its mirrored test module now, leaves the list."""
    modules = set(source_modules())
    stale = [
        f"{m}: {'gone' if m not in modules else 'has ' + str(mirror(m).relative_to(ROOT))}"
        for m in COVERED_ELSEWHERE
        if m not in modules or mirror(m).is_file()
    ]
    assert stale == [], "\n".join(stale)
