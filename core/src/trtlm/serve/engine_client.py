"""The API process's handle on the engine process: submit, stream, abort, and know its health.

:class:`EngineClient` sends commands down the pipe to the engine process
(:mod:`trtlm.serve.engine_core`) and a reader thread turns each step's deltas
back into :class:`~trtlm.runtime.outputs.RequestOutput` objects, handing a
step's outputs for one event loop over in one ``call_soon_threadsafe`` (one
wake-up per step, not one per token).  A consumer that stops iterating (a
client that disconnected, a cancelled task) aborts its request; the engine
applies the abort before its next step.

Prompts are checked here, against the engine's :class:`~trtlm.runtime.limits.PromptLimits`
(sent once when it was ready), so a bad request is a 400 before it crosses
the process boundary.  The waiting queue is bounded (``max_queue_size``): a
request beyond it is refused at once with :class:`QueueFullError`.  If the
engine fails (a step raised, a rank died), every in-flight request fails with
:class:`EngineDeadError` naming the cause, and new ones are refused.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, AsyncIterator, Callable

from trtlm.errors import UserError
from trtlm.runtime.limits import PromptLimits
from trtlm.serve.wire import OutputAssembler, merge_steps


class QueueFullError(Exception):
    """The waiting queue is full: try again later (HTTP 503)."""


class EngineDeadError(Exception):
    """The engine failed; no request can run any more."""


_END = object()
#: Step messages waiting in the pipe that the reader merges into one hand-over (see ``merge_steps``).
MAX_STEPS_MERGED = 32
#: After the engine's pipe closed, how long to wait for the process watcher to say which rank failed.
EOF_VERDICT_S = 3.0


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class EngineClient:
    """The engine as the HTTP layer sees it (one per server)."""

    def __init__(self, conn: Any, info: dict[str, Any], tokenizer: Any, *, max_queue_size: int | None = None,
                 stop: Callable[[bool], None] | None = None):
        self._conn = conn
        self.limits = PromptLimits(**info["limits"])
        self.tokenizer = tokenizer
        self.vocab_size = self.limits.vocab_size
        self.max_seq_len = self.limits.max_seq_len
        self.max_input_len = self.limits.max_input_len
        self.max_queue_size = max_queue_size
        self._stop_processes = stop
        self._stats = info["stats"]
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._assembler = OutputAssembler()
        self._adds_sent = 0
        self._adds_applied = 0
        self._ids = itertools.count()
        self._accepting = True
        self._closed = False
        self._gone = False  #: a rank process died
        self.error: EngineDeadError | None = None
        #: Called (from the reader or watcher thread) when the engine fails while serving.
        self.on_failure: Callable[[], None] | None = None
        self._reader = threading.Thread(target=self._read, name="trtlm-engine-reader", daemon=True)
        self._reader.start()

    # -- state --------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closed

    def stats(self):
        return self._stats

    def fail(self, message: str, process_gone: bool = True) -> None:
        """The engine failed (``message`` says why): fail every in-flight request, refuse new ones.

        ``process_gone``: a rank process died, nothing can be served any more and ``on_failure`` is
        called (the server stops); else a step raised and the server answers 503 until stopped."""
        if self._closed:
            return
        if self.error is None:
            self.error = EngineDeadError(message)
            self._deliver_many([(rid, EngineDeadError(f"the engine failed: {message}"))
                                for rid in list(self._streams)])
        if process_gone and not self._gone:
            self._gone = True
            if self.on_failure is not None:
                self.on_failure()

    def shutdown(self) -> None:
        """Stop the engine process(es); requests still in flight end (the server drained them first,
        see ``ServerState.drain``).  A failed engine's processes are killed, not asked to stop."""
        self._accepting = False
        failed = self.error is not None
        if not failed:
            try:
                self._send(("stop",))
            except OSError:
                failed = True
        self._closed = True
        if self._stop_processes is not None:
            self._stop_processes(failed)
        self._deliver_many([(rid, _END) for rid in list(self._streams)])

    # -- requests -----------------------------------------------------------------------------------
    def check(self, token_ids: list[int], params: Any) -> list[int]:
        """The prompt's token ids as ints, or :class:`UserError` -- before anything is queued (the
        HTTP layer tokenizes text prompts itself, with :attr:`tokenizer`)."""
        params.validate()
        ids = [int(t) for t in token_ids]
        self.limits.check(ids, params)
        return ids

    async def generate(self, token_ids: list[int], params: Any,
                       request_id: str | None = None) -> AsyncIterator[Any]:
        """Stream a request's outputs (one per step that advanced it; the last has ``finished``)."""
        if not self._accepting or self._closed:
            raise EngineDeadError("the server is shutting down")
        if self.error is not None:
            raise EngineDeadError(f"the engine failed: {self.error}")
        ids = self.check(token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = self._stats.waiting + (self._adds_sent - self._adds_applied)
            if self.max_queue_size is not None and waiting >= self.max_queue_size:
                raise QueueFullError(f"{waiting} requests are waiting (--max-queue-size {self.max_queue_size})")
            if request_id in self._streams:
                raise UserError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
            self._assembler.start(request_id, ids)
            self._adds_sent += 1
        finished = False
        try:
            self._send(("add", request_id, ids, params))
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
            with self._lock:
                self._streams.pop(request_id, None)
                self._assembler.forget(request_id)
            if not finished and self.healthy:
                try:
                    self._send(("abort", request_id))
                except OSError:
                    pass

    async def abort(self, request_id: str) -> None:
        if self.healthy:
            self._send(("abort", request_id))

    # -- the pipe -----------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read(self) -> None:
        """The reader thread: the engine's step messages, several at once when it fell behind."""
        try:
            while True:
                batch = [self._conn.recv()]
                while len(batch) < MAX_STEPS_MERGED and self._conn.poll(0):
                    batch.append(self._conn.recv())
                steps = [m for m in batch if m[0] == "step"]
                if steps:
                    self._deliver_steps(steps)
                for message in batch:
                    if message[0] == "dead":
                        self.fail(message[1], process_gone=False)
        except (EOFError, OSError):
            # A rank that died says why through the process watcher (``rank 1 failed: ...``), which
            # may learn it a moment after the pipe closed: give it the chance to name the cause.
            import time

            deadline = time.monotonic() + EOF_VERDICT_S
            while time.monotonic() < deadline and not self._closed and not self._gone:
                time.sleep(0.02)
            if not self._closed and not self._gone:
                self.fail("the engine process exited")

    def _deliver_steps(self, steps: list[tuple]) -> None:
        deltas = merge_steps([m[1] for m in steps])
        with self._lock:
            self._stats, self._adds_applied = steps[-1][3], steps[-1][4]
            items = [(d[0], out) for d in deltas if (out := self._assembler.assemble(d)) is not None]
        items += [(rid, UserError(msg)) for m in steps for rid, msg in m[2]]
        self._deliver_many(items)

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
