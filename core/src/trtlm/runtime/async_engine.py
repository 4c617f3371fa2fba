"""The engine for servers: a thread steps it, asyncio tasks stream from it.

:class:`AsyncEngine` owns one :class:`~trtlm.runtime.engine.Engine` and one
background thread that runs ``engine.step()`` whenever there is work.  Every
change to the engine (adding, aborting) happens on that thread, between
steps, so the engine itself stays single-threaded.  Each request's outputs are
handed to its asyncio queue; a step's outputs for one event loop travel in
one ``call_soon_threadsafe`` (one wake-up per step, not one per token: at a
few hundred running requests the per-token wake-ups alone cost the loop more
than the step); a consumer that
stops iterating (a client that disconnected, a cancelled task) aborts its
request, and the blocks are free before the next step runs.

The waiting queue is bounded (``max_queue_size``): a request beyond it is
refused at once with :class:`QueueFullError`, so memory never grows with the
offered load.  If a step raises, the engine is marked unhealthy, every
in-flight request fails with that error, and new requests are refused.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, AsyncIterator

from trtlm.errors import UserError
from trtlm.runtime.outputs import EngineStats, RequestOutput
from trtlm.runtime.sampling import SamplingParams


class QueueFullError(Exception):
    """The waiting queue is full: try again later (HTTP 503)."""


class EngineDeadError(Exception):
    """The engine's stepping thread failed; no request can run any more."""


_END = object()


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Any, max_queue_size: int | None = None, idle_wait_s: float = 0.05):
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._pending = 0  #: requests accepted but not yet added by the stepping thread
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._accepting = True
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._stats = engine.stats()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="trtlm-engine", daemon=True)
            self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``grace_s`` seconds, abort the rest."""
        import time

        self._accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._streams or self._pending) and self.healthy:
            time.sleep(0.02)
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._deliver_many([(rid, _END) for rid in list(self._streams)])
        if self.error is not None:  # a failed step: peers (other ranks) may be gone, no collective
            return
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - shutting down: the engine may already be broken
            pass

    def stats(self) -> EngineStats:
        return self._stats

    # -- requests -----------------------------------------------------------------------------------
    def check(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or :class:`UserError` — before anything is queued."""
        params.validate()
        _text, ids = self.engine.encode(prompt)
        self.engine.check_prompt(ids, params)
        return ids

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       keep_logits: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (one per step that advanced it; the last has ``finished``)."""
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        self.check(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = self._stats.waiting + self._pending
            if self.max_queue_size is not None and waiting >= self.max_queue_size:
                raise QueueFullError(f"{waiting} requests are waiting (--max-queue-size {self.max_queue_size})")
            if request_id in self._streams:
                raise UserError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, q)
            self._pending += 1
        self._commands.put(("add", request_id, prompt, params, keep_logits))
        finished = False
        try:
            while True:
                item = await q.get()
                if item is _END:
                    raise EngineDeadError(f"the engine stopped: {self.error or 'shut down'}")
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- the stepping thread ------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        self._deliver_many([(request_id, item)])

    def _deliver_many(self, items: list[tuple[str, Any]]) -> None:
        """Hand ``(request id, output or error)`` pairs to their streams: one hop per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, prompt, params, keep_logits = command
            with self._lock:
                self._pending -= 1
            if rid not in self._streams:  # the client left before its request was added
                return
            try:
                self.engine.add_request(prompt, params, request_id=rid, keep_logits=keep_logits)
            except UserError as exc:
                self._deliver(rid, exc)
        elif kind == "abort":
            self.engine.abort(command[1])

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    command = self._commands.get(timeout=self.idle_wait_s) if block else \
                        self._commands.get_nowait()
                    self._apply(command)
                    while True:  # everything else that arrived meanwhile, before the next step
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    self._deliver_many([(out.request_id, out) for out in self.engine.step()])
                self._stats = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - every in-flight request learns why it failed
            self.error = exc
            failure = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
            self._deliver_many([(rid, failure) for rid in list(self._streams)])
