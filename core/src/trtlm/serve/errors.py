"""Errors the HTTP layer answers with, in OpenAI's and Triton's shapes.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Triton's generate
extension: ``{"error": "message"}``.  Every client mistake becomes an
:class:`APIError` naming the field (``param``) before it can reach the engine.
"""
from __future__ import annotations

from typing import Any

#: HTTP status -> OpenAI error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable",
               504: "timeout_error"}


class APIError(Exception):
    """An error answer: HTTP ``status``, a message, and the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code if self.code is not None else self.status}}

    def triton_body(self) -> dict[str, Any]:
        return {"error": self.message}


def bad_request(param: str | None, message: str) -> APIError:
    """400 whose message starts with the field: ``max_tokens: must be >= 1``."""
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def format_loc(loc: tuple) -> str:
    """A pydantic error location as a field path: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def from_validation_error(exc) -> APIError:
    """The first error of a pydantic ``ValidationError`` as a 400 naming its field."""
    err = exc.errors()[0]
    loc = tuple(p for p in err.get("loc", ()) if p != "body")
    param = format_loc(loc)
    message = err.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if err.get("type") == "missing":
        message = "required field is missing"
    return bad_request(param, message)
