"""One HTTP request's engine requests: started, pumped into one queue, timed, aborted.

A :class:`Generation` runs each prompt of a request as one engine request
(``n`` completions each) in its own *pump* task that copies the engine's
outputs into a queue the HTTP handler reads.  Keeping the engine's async
iterator inside a task of its own makes every way a request can end the same
one-liner -- :meth:`Generation.abort` cancels the pumps, which aborts the
engine requests (their KV blocks are freed within one step) and tells the
reader ``aborted`` -- whether the cause is a client disconnect, a per-request
timeout or a SIGTERM grace period running out.  Latency metrics are
recorded as outputs are read, i.e. when the client is sent them.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("trtlm.serve")

_END, _ABORTED, _ERROR, _OUT = "end", "aborted", "error", "out"


class RequestTimeout(Exception):
    """The request ran past ``--request-timeout``; its engine requests were aborted."""


@dataclass
class Prompt:
    """A tokenized prompt and the text to echo for it."""

    token_ids: list[int]
    text: str | None = None


@dataclass
class Generation:
    """The engine requests of one HTTP request (one per prompt)."""

    state: Any  # trtlm.serve.app.ServerState
    prompts: list[Prompt]
    params: Any  # SamplingParams
    timeout_s: float | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrival: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pumps: list[asyncio.Task] = []
        self.engine_ids = [f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        self.last: list[Any] = [None] * len(self.prompts)
        self.ended = [False] * len(self.prompts)
        self.aborted = [False] * len(self.prompts)
        self.pending: list[tuple[int, Any]] = []
        self.deadline = self.arrival + self.timeout_s if self.timeout_s else None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Submit every prompt and wait for each one's first output, so that a full queue (503) or a
        request the engine rejects (400) is known before any response header is sent."""
        self.state.generations[self.request_id] = self
        self.pumps = [asyncio.ensure_future(self._pump(i)) for i in range(len(self.prompts))]
        seen = set()
        try:
            while len(seen) < len(self.prompts):
                idx, kind, payload = await self._get()
                if kind == _ERROR:
                    raise payload
                seen.add(idx)
                self.pending.append((idx, (kind, payload)))
        except BaseException:
            await self.close()
            raise

    async def _pump(self, idx: int) -> None:
        engine = self.state.engine
        agen = engine.generate(self.prompts[idx].token_ids, self.params, request_id=self.engine_ids[idx])
        try:
            async for out in agen:
                self.queue.put_nowait((idx, _OUT, out))
                if out.finished:
                    break
            self.queue.put_nowait((idx, _END, None))
        except asyncio.CancelledError:
            self.queue.put_nowait((idx, _ABORTED, None))
            raise
        except Exception as exc:  # noqa: BLE001 - this request fails, the server does not
            self.queue.put_nowait((idx, _ERROR, exc))
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _get(self) -> tuple[int, str, Any]:
        if self.deadline is None:
            return await self.queue.get()
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.queue.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            await self.abort()
            raise RequestTimeout(f"the request ran longer than --request-timeout ({self.timeout_s:g} s)") from None

    async def next(self) -> tuple[int, Any] | None:
        """``(prompt index, RequestOutput)`` as they come; ``None`` once every prompt ended."""
        while True:
            if self.pending:
                idx, (kind, payload) = self.pending.pop(0)
            elif all(self.ended):
                return None
            else:
                idx, kind, payload = await self._get()
            if kind == _OUT:
                payload = self._catch_up(idx, payload)
                self.last[idx] = payload
                if payload.finished:
                    self.ended[idx] = True
                self._observe(payload)
                return idx, payload
            if kind == _ERROR:
                self.ended[idx] = True
                raise payload
            if kind == _ABORTED:
                self.aborted[idx] = True
            self.ended[idx] = True

    def _catch_up(self, idx: int, out):
        """``out`` merged with the outputs of the same prompt already queued behind it.

        When the event loop falls behind the engine (hundreds of streams), each stream is sent
        what it missed as one chunk instead of one chunk per step, so the loop's work per token
        shrinks as the load grows instead of the backlog growing."""
        while not out.finished and not self.pending:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt[0] != idx or nxt[1] != _OUT:
                self.pending.append((nxt[0], (nxt[1], nxt[2])))
                break
            out = nxt[2].after(out)
        return out

    async def abort(self) -> None:
        """Stop every unfinished engine request now (disconnect, timeout, shutdown)."""
        for task in self.pumps:
            if not task.done():
                task.cancel()
        for idx, rid in enumerate(self.engine_ids):
            if not self.ended[idx] and self.state.engine is not None:
                try:
                    await self.state.engine.abort(rid)
                except Exception:  # noqa: BLE001 - already gone is fine
                    pass
        if self.pumps:
            await asyncio.gather(*self.pumps, return_exceptions=True)

    async def close(self) -> None:
        """Abort what is unfinished and forget this generation (idempotent; call in ``finally``)."""
        if self.closed:
            return
        self.closed = True
        try:
            if not all(self.ended) or any(not t.done() for t in self.pumps):
                await self.abort()
        finally:
            self.state.generations.pop(self.request_id, None)

    # -- results --------------------------------------------------------------------------------
    def _observe(self, out) -> None:
        metrics = self.state.metrics
        now = time.monotonic()
        if any(c.new_token_ids for c in out.outputs):
            if self.first_token_time is None:
                self.first_token_time = now
                metrics.ttft.observe(now - self.arrival)
            else:
                metrics.itl.observe(now - self.last_token_time)
            self.last_token_time = now
        if out.finished:
            for c in out.outputs:
                metrics.finished(c.finish_reason)

    def finish_reason(self, idx: int, completion) -> str | None:
        """The completion's finish reason, ``"abort"`` when it was cut off by an abort."""
        if completion.finish_reason is not None:
            return completion.finish_reason
        return "abort" if self.ended[idx] else None

    def completions(self, idx: int) -> list[Any]:
        """The latest completions of prompt ``idx``; empty ones when it was aborted before any output."""
        out = self.last[idx]
        if out is not None:
            return list(out.outputs)
        from trtlm.runtime.outputs import CompletionOutput

        return [CompletionOutput(index=i, token_ids=[], text="", new_token_ids=[], new_text="")
                for i in range(self.params.n)]

    def usage_counts(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, cached prompt tokens) of the whole request."""
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(len(c.token_ids) for i in range(len(self.prompts)) for c in self.completions(i))
        cached = sum(out.num_cached_tokens for out in self.last if out is not None)
        return prompt, completion, cached

    def e2e_done(self) -> None:
        self.state.metrics.e2e.observe(time.monotonic() - self.arrival)
