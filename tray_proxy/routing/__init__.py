"""Routing: which way each redirected connection goes (issue 15 sections 2 and 3).

Pure decision core: ordered rules on host names, networks and ports (`rules`), NO_PROXY
import (`noproxy`), PAC results and their cache (`pac`), per-upstream circuit breakers and
latency (`health`), the order to try upstreams in (`select`), and the `Router` that puts them
together (`router`). The only modules here that do I/O are `pac_source` (fetching the PAC
script) and `pac_worker` (evaluating it with pypac in a child process); the relay drives them.

Must not import PySide6, qasync, asyncio, the relay engine or the controller.
"""
