"""Sans-IO protocol code: bytes in, results and bytes out.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""
