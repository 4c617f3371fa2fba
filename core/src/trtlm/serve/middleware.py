"""Pure-ASGI middleware of ``trtlm serve``, outermost first:

* :class:`AccessLog` -- one JSON line per request (``trtlm.serve.access`` logger);
* :class:`BodyLimit` -- reads the request body up front, 400 beyond the limit;
* :class:`ApiKey`    -- ``Authorization: Bearer KEY`` on every ``/v1`` and ``/v2`` path,
  compared in constant time (:func:`hmac.compare_digest`).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse

from trtlm.serve.errors import APIError, bad_request

access_log = logging.getLogger("trtlm.serve.access")


def _is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/v2" or path.startswith("/v2/")


def error_response(path: str, err: APIError):
    """An error answer in the shape of the API ``path`` belongs to."""
    body = err.triton_body() if path.startswith("/v2") else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


class AccessLog:
    """One JSON line per request: time, client, method, path, status, duration and the request's usage."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        info: dict[str, Any] = {}
        scope["trtlm"] = info
        status = [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client")
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "client": f"{client[0]}:{client[1]}" if client else None, "method": scope.get("method"),
                      "path": scope.get("path"), "status": status[0] or None,
                      "duration_ms": round((time.monotonic() - start) * 1000, 2), **info}
            access_log.info(json.dumps(record, separators=(",", ":")))


class BodyLimit:
    """Read the whole body first (at most ``limit`` bytes; more is a 400 naming ``body``), then replay it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = None
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_big = int(declared)
        chunks, size = [], 0
        if too_big is None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    too_big = size
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if too_big is not None:
            err = bad_request("body", f"the request body is {'at least ' if declared is None else ''}{too_big} bytes; "
                                      f"the limit is {self.limit} (--max-body-size)")
            return await error_response(scope["path"], err)(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """``Authorization: Bearer KEY`` on every ``/v1`` and ``/v2`` path; 401 otherwise."""

    def __init__(self, app, key: str, metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _is_api_path(scope["path"]):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                self.metrics.error("unauthorized")
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(scope["path"], err)(scope, receive, send)
        await self.app(scope, receive, send)
