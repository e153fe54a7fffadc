"""Calling a stage's hook outside mitmproxy, as mitmproxy does: awaited when it is a
coroutine (a stage may make a hook async, e.g. to move work off the event loop)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


def call(hook: Callable[..., Any], *args: Any) -> Any:
    """`hook(*args)`, run to completion on a new event loop when it returns an awaitable."""
    result = hook(*args)
    return asyncio.run(_wait(result)) if inspect.isawaitable(result) else result


async def _wait(awaitable: Any) -> Any:
    return await awaitable
