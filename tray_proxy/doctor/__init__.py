"""`tray-proxy doctor`: checks of everything tray-proxy needs, each with its exact fix.

- model.py: CheckStatus, CheckResult, Report and the JSON schema version (pure data);
- context.py: DoctorEnv (every path and setting the checks read, real defaults) and the
  bounded ways to wait for the world (run_command, in_thread);
- checks_system.py (nft, kernel NAT, helper, polkit/sudo), checks_session.py (D-Bus,
  keyring), checks_network.py (settings, upstream probes, TLS inspection, redirect, relay,
  IPv6, exclusions), checks_wsl.py (WSL);
- runner.py: the ordered list of checks and `run_checks`; render.py: text and JSON;
- cli.py: the `doctor` subcommand; nat_probe.py: the stdlib script run in a throwaway
  network namespace.
docs/doctor.md documents each check, its fix and the JSON schema.

Public API: doctor.runner.run_checks / CHECKS, doctor.model, doctor.context.DoctorEnv,
doctor.render. This package's __init__ imports nothing, so `tray-proxy --help` (which
imports doctor.cli) stays fast.

Must not import PySide6.
"""
