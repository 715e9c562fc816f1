"""The Qt user interface: tray icon, main window, and the bridge from controller events.

Widgets call injected services (`ui.services.AppServices`) and read `controller.Status`
snapshots; they never import keyring, socket or subprocess, and never compute state.
"""
