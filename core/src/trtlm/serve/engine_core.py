"""The engine process's loop: step the engine for the API process at the other end of a pipe.

``trtlm serve`` runs HTTP and the engine in different processes (vLLM v1's
split).  In one process they share one interpreter lock: at a few hundred
running streams the event loop's per-token work (SSE chunks, JSON, socket
writes) and the engine's per-step host work (scheduling, sampling,
detokenization) take turns, and each decode step stretches by the loop's
share.  Here the engine process does nothing but step and ship deltas
(:mod:`trtlm.serve.wire`); the API process does the HTTP.

Protocol (pickled tuples over a :class:`multiprocessing.connection.Connection`):

* API → engine: ``("add", request_id, token_ids, params)``, ``("abort",
  request_id)``, ``("stop",)``.  A thread drains the pipe into a queue so the
  API process never blocks on a busy engine; commands are applied between
  steps, so an abort frees the request's KV blocks before the next step.
* engine → API: ``("ready", info)`` once; then after every step, and after
  commands were applied, ``("step", deltas, rejected, stats, adds_applied)``.
  A step's outputs are built and sent while the next step runs on the GPU
  (``Engine.advance(overlap=...)``): the GPU no longer idles through that host work
  (``rejected``: ``(request_id, message)`` of requests the engine refused);
  ``("dead", message)`` if a step raised, after which only ``stop`` is awaited.
  A thread sends them, so a step never waits for the API process, which
  merges the steps that piled up (:func:`trtlm.serve.wire.merge_steps`).
"""
from __future__ import annotations

import queue
import threading
from typing import Any

from trtlm.errors import UserError
from trtlm.serve.wire import encode_outputs


def _receive(conn: Any, commands: queue.Queue) -> None:
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):  # the API process is gone: stop
        commands.put(("stop",))


def _send_all(conn: Any, outbox: queue.SimpleQueue) -> None:
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except OSError:  # the API process is gone; the receiver turns that into stop
            return


def serve_engine(engine: Any, conn: Any, idle_wait_s: float = 0.05) -> None:
    """Run ``engine`` for the API process until it sends ``stop`` (or goes away).

    Raises what a step raised, after telling the API process (``dead``) and waiting for its ``stop``,
    so the process ends as a failed rank while the server can still say why."""
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=_receive, args=(conn, commands), name="trtlm-engine-commands", daemon=True).start()
    # Steps never wait for the API process: a thread sends, and a slow reader merges what piled up.
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_all, args=(conn, outbox), name="trtlm-engine-outputs", daemon=True)
    sender.start()
    adds = 0
    advanced: list = []  # requests the last step advanced, whose outputs are not built yet
    rejected: list[tuple[str, str]] = []
    applied = False

    def ship() -> None:
        """Build and queue the last step's outputs (while the engine's next step runs on the GPU)."""
        nonlocal advanced, rejected, applied
        if advanced or applied:
            outputs = engine.collect(advanced)
            outbox.put(("step", encode_outputs(outputs), rejected, engine.stats(), adds))
        advanced, rejected, applied = [], [], False

    try:
        while True:
            try:
                busy = engine.has_unfinished() or advanced
                command = commands.get_nowait() if busy else commands.get(timeout=idle_wait_s)
                while True:  # everything that arrived meanwhile, before the next step
                    if command[0] == "stop":
                        ship()
                        outbox.put(None)
                        sender.join(timeout=10)
                        return
                    adds += _apply(engine, command, rejected)
                    applied = True
                    command = commands.get_nowait()
            except queue.Empty:
                pass
            if engine.has_unfinished():
                advanced = engine.advance(overlap=ship)  # ship() runs inside, before this assignment
            else:
                ship()
    except Exception as exc:  # noqa: BLE001 - the API process fails every request with this, then stops us
        from trtlm.runtime.distributed import is_peer_failure

        if is_peer_failure(exc):  # another rank died: exit now, the launcher names that rank
            raise
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        outbox.put(("dead", " ".join(message.split())))
        outbox.put(None)
        while commands.get()[0] != "stop":
            pass
        raise


def _apply(engine: Any, command: tuple, rejected: list[tuple[str, str]]) -> int:
    """Apply one command; 1 for an ``add`` (counted whether or not the engine took it)."""
    if command[0] == "add":
        _, request_id, token_ids, params = command
        try:
            engine.add_request(token_ids, params, request_id=request_id)
        except UserError as exc:
            rejected.append((request_id, str(exc)))
        return 1
    if command[0] == "abort":
        engine.abort(command[1])
    return 0
