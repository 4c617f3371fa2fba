"""The engine's processes: one per rank, started and watched by the API process.

``trtlm serve`` is two kinds of process.  The one the user started serves
HTTP (uvicorn, the routes, tokenization of requests, SSE); the engine runs in
``world_size`` processes of ``python -m trtlm.serve.ranks JOB.json``
started as ``trtlm run`` starts ranks -- the same environment
(:func:`trtlm.runtime.launch.worker_env`), the same rendezvous socket handed to
rank 0, the same watcher that kills every rank when one fails
(:func:`trtlm.runtime.launch.watch`):

* rank 0 loads the engine (all of it for a one-rank engine, its shard as
  :class:`trtlm.api.DistributedLLM` otherwise: scheduler and sampling live
  there and every step is broadcast) and steps it for the API process over a
  socket pair (:mod:`trtlm.serve.engine_core`);
* the other ranks load their shards and run :func:`trtlm.runtime.executor.follow`
  until rank 0's engine says ``stop``, then leave the group.

Why a process of its own even for one rank: HTTP and the engine in one
interpreter take turns on its lock, and at a few hundred streams the event
loop's share stretches every decode step (see :mod:`trtlm.serve.engine_core`).

The ranks ignore SIGINT and SIGTERM: the API process drains and then tells
rank 0 to stop, which releases the followers; all exit 0.  A rank that fails
ends the server with ``rank N failed: ...``; a step that raises leaves the
server answering 503 with the cause until it is stopped.  Every rank also dies
with the API process (``PR_SET_PDEATHSIG``), so none is ever orphaned.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

#: Bound on one collective while serving (an idle server's followers wait in one for as long as no request comes).
SERVE_DIST_TIMEOUT_S = 7 * 24 * 3600.0
#: After ``stop``, how long the ranks get to leave before they are killed.
RANK_EXIT_S = 15.0
#: The inherited socket (a file descriptor number) rank 0 talks to the API process on.
ENGINE_FD_ENV = "TRTLM_ENGINE_FD"


def _rank_job(config) -> str:
    """What a rank needs of ``trtlm serve``'s options (JSON): where the engine is and how to run it."""
    return json.dumps({"engine_dir": str(config.engine_dir),
                       "tokenizer_dir": str(config.tokenizer_dir) if config.tokenizer_dir else None,
                       "device": config.device, "engine": config.engine})


class EngineProcesses:
    """The rank processes of one served engine, as the API process starts, watches and stops them."""

    def __init__(self, config, world_size: int):
        """``config``: ``trtlm serve``'s, with ``engine_dir`` resolved (``--model-dir`` built already)."""
        self.config = config
        self.world_size = world_size
        self.procs: list[subprocess.Popen] = []
        self.tmpdir: Path | None = None
        self.client = None
        self._verdict: list[str] = []  #: the watcher's one-line failure, once a rank failed
        self._watched = threading.Event()

    def start(self):
        """Start the ranks and return an :class:`~trtlm.serve.engine_client.EngineClient` once rank 0's
        engine is ready; :class:`UserError` naming the failure when a rank fails to load."""
        from multiprocessing.connection import Connection

        from trtlm.runtime.loader import load_engine_config, load_tokenizer_and_eos
        from trtlm.serve.engine_client import EngineClient

        self.tmpdir = Path(tempfile.mkdtemp(prefix="trtlm-serve-"))
        cfg_path = self.tmpdir / "job.json"
        cfg_path.write_text(_rank_job(self.config))
        ours, theirs = socket.socketpair()
        spawned = threading.Event()
        # The ranks are started by the thread that watches them, which lives as long as they do:
        # PR_SET_PDEATHSIG (each rank dies with its launcher) fires when the starting *thread* ends.
        threading.Thread(target=self._start_and_watch, args=(cfg_path, theirs, spawned), name="trtlm-ranks",
                         daemon=True).start()
        spawned.wait()
        if not self.procs:
            ours.close()
            raise UserError(self._verdict[0] if self._verdict else "the engine's processes could not be started")
        conn = Connection(ours.detach())
        engine_dir = self.config.engine_dir
        tokenizer, _eos, _error = load_tokenizer_and_eos(load_engine_config(engine_dir),
                                                         Path(self.config.tokenizer_dir or engine_dir))
        info = self._wait_ready(conn)
        self.client = EngineClient(conn, info, tokenizer, max_queue_size=self.config.max_queue_size, stop=self.stop)
        if self._verdict:  # a rank failed between ``ready`` and here
            self.client.fail(self._verdict[0])
        return self.client

    def _wait_ready(self, conn) -> dict[str, Any]:
        while True:
            if self._verdict:
                self.stop(failed=True)
                raise UserError(self._verdict[0])
            try:
                if conn.poll(0.05):
                    message = conn.recv()
                    if message[0] == "ready":
                        return message[1]
            except (EOFError, OSError):  # rank 0 is gone: the watcher says why in a moment
                self._watched.wait(timeout=30)
                self.stop(failed=True)
                raise UserError(self._verdict[0] if self._verdict else "the engine process exited while loading")

    def _spawn(self, cfg_path: Path, theirs: socket.socket) -> None:
        from trtlm.runtime.launch import STORE_FD_ENV, worker_env

        store = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        store.bind(("127.0.0.1", 0))
        store.listen(max(128, self.world_size))
        try:
            for rank in range(self.world_size):
                env = worker_env(rank, self.world_size, store.getsockname()[1], self.tmpdir / f"rank{rank}.json",
                                 store.fileno() if rank == 0 else None)
                fds: tuple[int, ...] = ()
                if rank == 0:
                    env[ENGINE_FD_ENV] = str(theirs.fileno())
                    fds = (store.fileno(), theirs.fileno())
                else:
                    env.pop(STORE_FD_ENV, None)
                self.procs.append(subprocess.Popen([sys.executable, "-m", "trtlm.serve.ranks", str(cfg_path)],
                                                   env=env, stdin=subprocess.DEVNULL, pass_fds=fds))
        finally:
            store.close()
            theirs.close()

    def _start_and_watch(self, cfg_path: Path, theirs: socket.socket, spawned: threading.Event) -> None:
        """The ranks' thread: start them, then wait until all exit 0 after ``stop``, or one fails
        and the rest are killed (its one-line verdict fails the client)."""
        from trtlm.runtime.launch import kill_all, watch

        try:
            try:
                self._spawn(cfg_path, theirs)
            except OSError as exc:
                kill_all(self.procs)
                self.procs.clear()
                self._verdict.append(f"the engine's processes could not be started: {exc}")
                return
            finally:
                spawned.set()
            watch(self.procs, self.tmpdir)
        except UserError as exc:
            message = str(exc)
            if self.world_size == 1:  # one process: "rank 0" would only puzzle
                message = "the engine process failed: " + message.removeprefix("rank 0 failed: ")
            self._verdict.append(message)
            if self.client is not None:
                self.client.fail(message)
        finally:
            self._watched.set()

    def stop(self, failed: bool) -> None:
        """After ``stop`` was sent: wait for the ranks to leave; kill them when ``failed`` or too slow."""
        from trtlm.runtime.launch import kill_all

        if not failed:
            self._watched.wait(timeout=RANK_EXIT_S)
        kill_all(self.procs)
        self._watched.wait(timeout=5)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- in a rank
def _serve_rank0(job: dict[str, Any], env) -> None:
    from multiprocessing.connection import Connection

    from trtlm.commands.engine_options import engine_config
    from trtlm.serve.engine_core import serve_engine

    conn = Connection(int(os.environ[ENGINE_FD_ENV]))
    if env.world_size == 1:
        from trtlm.runtime.engine import Engine

        engine = Engine.from_engine_dir(job["engine_dir"], device=job["device"], tokenizer_dir=job["tokenizer_dir"],
                                        config=engine_config(job["engine"]))
    else:
        from trtlm.api import DistributedLLM

        engine = DistributedLLM(Path(job["engine_dir"]), tokenizer_dir=job["tokenizer_dir"], device=job["device"],
                                timeout_s=SERVE_DIST_TIMEOUT_S, env=env,
                                engine_config=engine_config(job["engine"])).engine
    engine.warm_up()  # compile kernels, capture graphs: no request pays for them
    conn.send(("ready", {"limits": engine.limits().to_dict(), "stats": engine.stats()}))
    serve_engine(engine, conn)
    engine.close()  # a multi-rank engine's close tells the followers to stop
    if env.world_size > 1:
        from trtlm.runtime.distributed import shutdown

        shutdown()


def _follow(job: dict[str, Any], env) -> None:
    from trtlm.api import DistributedLLM
    from trtlm.runtime.distributed import shutdown
    from trtlm.runtime.executor import follow

    llm = DistributedLLM(Path(job["engine_dir"]), tokenizer_dir=job["tokenizer_dir"], device=job["device"],
                         timeout_s=SERVE_DIST_TIMEOUT_S, env=env, engine_config=None)
    while follow(llm.model, llm.state, llm._pool_box)[0] != "stop":
        pass
    shutdown()


def main(argv: list[str] | None = None) -> int:
    """One rank of a served engine (started by :class:`EngineProcesses`)."""
    from trtlm.runtime.worker import _die_with_launcher, fail

    argv = sys.argv[1:] if argv is None else argv
    _die_with_launcher()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API process, which stops the ranks
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from trtlm.runtime.launch import rank_env

        env = rank_env()
        if env is None or len(argv) != 1:
            raise UserError("trtlm.serve.ranks is started by `trtlm serve`")
        job = json.loads(Path(argv[0]).read_text())
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if env.rank == 0:
            _serve_rank0(job, env)
        else:
            _follow(job, env)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        return fail(exc)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
