"""Server-sent events and client-disconnect detection.

A client that goes away must stop costing KV blocks at once, not when the
next token fails to send (vLLM #54947, tensorrtllm_backend #176).  Both the
streaming response (:class:`EventStream`) and a plain request waiting for its
result (:func:`until_disconnect`) therefore listen on the ASGI ``receive``
channel for ``http.disconnect`` while the work runs, and cancel the work when
it arrives; the work's ``finally`` aborts the engine request (see
:mod:`trtlm.serve.app`).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was complete."""


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (or ``data: [DONE]``)."""
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first: then cancel it and raise
    :class:`ClientDisconnected`.  ``receive`` must be called only after the body was read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    raise ClientDisconnected()


class EventStream(Response):
    """An ASGI ``text/event-stream`` response fed by an async iterator of byte chunks.

    While it streams it listens for ``http.disconnect``; on one the iterator
    is cancelled and closed (its ``finally`` blocks run) and ``on_disconnect``
    is called.
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 on_disconnect: Callable[[], None] | None = None):
        super().__init__(status_code=200)
        self.chunks = chunks
        self.extra_headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", self.media_type.encode())]
        headers += [(k.encode(), v.encode()) for k, v in self.extra_headers.items()]
        disconnected = False

        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                disconnected = True
                task.cancel()
            watcher.cancel()
            try:
                await task
            except (asyncio.CancelledError, OSError):
                disconnected = True
            finally:
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
        if disconnected and self.on_disconnect is not None:
            self.on_disconnect()
