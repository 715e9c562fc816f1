"""The dashboard's tabs, one module each: Overview, Connections, Upstreams, Log."""
