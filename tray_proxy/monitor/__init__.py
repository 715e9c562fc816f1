"""What the user sees of the relay's work: connection rows, health and statistics, process
attribution and the connection history. Core code: no Qt (tray_proxy/ui reads it)."""
