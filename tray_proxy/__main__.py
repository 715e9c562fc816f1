"""`python -m tray_proxy` is the `tray-proxy` command."""

import sys

from tray_proxy.cli import main

sys.exit(main())
