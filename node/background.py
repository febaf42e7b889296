"""Background work that lives exactly as long as an `async with` block.

Why not a TaskGroup around the block: an exception raised by the block itself (a
StartupError, say) would come out wrapped in an ExceptionGroup, and callers that catch the
plain exception would miss it. Here the block's exception comes out as it was; the tasks
are cancelled and awaited when the block ends (never left running), and a task that
failed on its own is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

log = logging.getLogger("murmur.node")


@contextlib.asynccontextmanager
async def running(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coroutines`` as tasks while the block runs; cancel and await them after."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                async with asyncio.timeout(10):
                    await task
            except asyncio.CancelledError:
                if not task.cancelled():  # we ourselves are being cancelled
                    raise
            except Exception:  # a background task's own failure must not hide the block's
                log.exception("background task %s failed", task.get_coro())
