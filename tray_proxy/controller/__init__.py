"""The app's controller: one redirect + relay switched on and off, and what the user sees.

One module per job:
- status.py: the state machine's states, the `Status` snapshot and the controller's events;
- services.py: what the controller needs of the world (relay, redirect, keyring, settings);
- inbox.py: engine events from the relay's thread to the controller's loop, in bursts;
- lifecycle.py: the one switch-on / teardown order, shared with headless `tray-proxy run`;
- core.py: `ProxyController`, the state machine over all of these;
- diagnostics.py: the diagnostics report and the advice after a failed test;
- engine_relay.py: the real relay (RelayEngine on its own thread) as a RelayHandle.

Every name other code imports from `tray_proxy.controller` is re-exported here.
Must not import PySide6 or qasync.
"""

from tray_proxy.controller.core import (
    DOWN_AFTER_FAILURES,
    LAST_ERRORS,
    NOTICE_INTERVAL,
    WATCH_INTERVAL,
    NoticeLimiter,
    ProxyController,
)
from tray_proxy.controller.engine_relay import EngineRelay, engine_relay_factory
from tray_proxy.controller.lifecycle import (
    REDIRECT_OFF_TIMEOUT,
    RELAY_START_TIMEOUT,
    RELAY_STOP_MARGIN,
    Lifecycle,
    LifecycleSteps,
    check_settings,
    user_message,
)
from tray_proxy.controller.services import (
    PROBE_TARGET,
    PROBE_TIMEOUT,
    ConfigStore,
    CredentialRefresher,
    Probe,
    RedirectService,
    RelayFactory,
    RelayHandle,
    Resolver,
    connect_probe,
)
from tray_proxy.controller.status import (
    ALLOWED,
    ConnectionsChanged,
    ControllerEvent,
    ControllerObserver,
    ErrorEntry,
    Notice,
    NoticeKind,
    State,
    StateChanged,
    Status,
    StatusUpdated,
    UpstreamInfo,
)

__all__ = [
    "ALLOWED",
    "DOWN_AFTER_FAILURES",
    "LAST_ERRORS",
    "NOTICE_INTERVAL",
    "PROBE_TARGET",
    "PROBE_TIMEOUT",
    "REDIRECT_OFF_TIMEOUT",
    "RELAY_START_TIMEOUT",
    "RELAY_STOP_MARGIN",
    "WATCH_INTERVAL",
    "ConfigStore",
    "ConnectionsChanged",
    "ControllerEvent",
    "ControllerObserver",
    "CredentialRefresher",
    "EngineRelay",
    "ErrorEntry",
    "Lifecycle",
    "LifecycleSteps",
    "Notice",
    "NoticeKind",
    "NoticeLimiter",
    "Probe",
    "ProxyController",
    "RedirectService",
    "RelayFactory",
    "RelayHandle",
    "Resolver",
    "State",
    "StateChanged",
    "Status",
    "StatusUpdated",
    "UpstreamInfo",
    "check_settings",
    "connect_probe",
    "engine_relay_factory",
    "user_message",
]
