"""Trace's worker SDK: the worker, the HTTP client of the task surface, and the asyncio helpers
they share (``trace_sdk.aio``). Depends on ``trace_core`` (and aiohttp for the HTTP client)."""
