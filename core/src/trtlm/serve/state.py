"""What the routes of ``trtlm serve`` share: settings, the engine once loaded, metrics, live requests."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from trtlm.serve.errors import APIError
from trtlm.serve.generation import Generation

log = logging.getLogger("trtlm.serve")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServeSettings:
    """What the HTTP layer needs to know (the engine's own settings live in the engine)."""

    model_name: str
    api_key: str | None = None
    request_timeout_s: float | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0
    retry_after_s: int = 1


class ServerState:
    """Everything the routes share: the engine (``None`` while loading), templates, metrics, requests."""

    def __init__(self, settings: ServeSettings):
        from trtlm.serve.metrics import Metrics

        self.settings = settings
        self.engine = None  # EngineClient (tokenizer, limits, requests)
        self.chat_template = None
        self.status = "loading"  # loading | ready | failed | draining
        self.error: str | None = None
        self.generations: dict[str, Generation] = {}
        self.created = int(time.time())
        self.metrics = Metrics(settings.model_name, self.stats)

    def stats(self):
        return self.engine.stats() if self.engine is not None else None

    def set_ready(self, engine, chat_template) -> None:
        self.engine, self.chat_template = engine, chat_template
        if self.status == "loading":
            self.status = "ready"

    def set_failed(self, message: str) -> None:
        self.status, self.error = "failed", message

    def problem(self) -> str | None:
        """Why the server cannot take a request now, or ``None``."""
        if self.status == "loading":
            return "the model is still loading"
        if self.status == "failed":
            return f"the engine failed to load: {self.error}"
        if self.status == "draining":
            return "the server is shutting down"
        if self.engine is not None and not getattr(self.engine, "healthy", True):
            err = getattr(self.engine, "error", None)
            return f"the engine stopped: {err}" if err is not None else "the engine stopped"
        return None

    def require_ready(self) -> None:
        problem = self.problem()
        if problem is not None:
            self.metrics.error("unavailable")
            raise APIError(503, problem, code="unavailable", headers={"Retry-After": str(self.settings.retry_after_s)})

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new requests, let in-flight ones finish for ``grace_s``, then abort the rest
        (their clients get a final ``finish_reason: "abort"`` and a clean end of stream)."""
        import asyncio

        if self.status == "ready":
            self.status = "draining"
        deadline = time.monotonic() + grace_s
        while self.generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.generations:
            log.warning("shutdown grace period (%.1f s) over: aborting %d in-flight request(s)", grace_s,
                        len(self.generations))
            await asyncio.gather(*(g.abort() for g in list(self.generations.values())), return_exceptions=True)
