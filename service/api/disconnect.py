"""Stop the work of a request whose client went away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service.errors import ClientDisconnectedError

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (after the body was read) and cancel it when the client disconnects.

    Once the body is read, the ASGI ``receive`` only ever answers ``http.disconnect``: it is
    watched beside the work, and the work is cancelled (so the core stops its extraction and
    drops its queued clips) when it comes first.

    Raises:
        ClientDisconnectedError: the client went away first (nobody reads the answer).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnectedError("the client disconnected before the answer")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
