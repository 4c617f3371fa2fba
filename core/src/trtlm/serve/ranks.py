"""Serving a multi-rank (tensor / pipeline parallel) engine: one process per rank, rank 0 serves.

``trtlm serve`` on an engine with ``tp * pp > 1`` starts the ranks as
``trtlm run`` does -- the same environment (:func:`trtlm.runtime.launch.worker_env`),
the same rendezvous socket handed to rank 0, the same watcher that kills every
rank when one fails (:func:`trtlm.runtime.launch.watch`) -- but each rank runs
``python -m trtlm.serve.ranks CONFIG.json``:

* rank 0 loads its shard as :class:`trtlm.api.DistributedLLM` (the engine's
  scheduler and sampling live there, every step is broadcast) and serves HTTP
  on it exactly like a single-process server;
* the other ranks load their shards and run :func:`trtlm.runtime.executor.follow`
  until rank 0's engine says ``stop`` (on shutdown), then leave the group.

Collectives wait :data:`SERVE_DIST_TIMEOUT_S`: an idle server's followers
block in a broadcast for as long as no request comes, and a rank that dies is
noticed by the launcher (its exit), which then stops the others.  SIGTERM or
Ctrl-C to ``trtlm serve`` is passed to rank 0, which drains and stops the
followers; all exit 0.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from trtlm.errors import UserError

#: Bound on one collective while serving (an idle server waits in one for as long as no request comes).
SERVE_DIST_TIMEOUT_S = 7 * 24 * 3600.0
#: After rank 0 exited, how long the followers get to leave the group before they are killed.
FOLLOWER_EXIT_S = 10.0


def _config_json(config) -> str:
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()})


def _config_from_json(text: str):
    from trtlm.serve.server import ServeConfig

    raw = json.loads(text)
    for key in ("engine_dir", "model_dir", "tokenizer_dir", "chat_template"):
        if raw.get(key) is not None:
            raw[key] = Path(raw[key])
    return ServeConfig(**raw)


def serve_ranks(config, world_size: int) -> None:
    """Start ``world_size`` rank processes (rank 0 serves), forward SIGTERM/SIGINT to rank 0, and
    wait; raise :class:`UserError` naming the rank when one fails."""
    from trtlm.runtime.launch import _forward_output, kill_all, watch, worker_env

    with tempfile.TemporaryDirectory(prefix="trtlm-serve-") as tmp:
        tmpdir = Path(tmp)
        cfg_path = tmpdir / "serve.json"
        cfg_path.write_text(_config_json(config))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(128, world_size))
        port = listener.getsockname()[1]
        procs: list[subprocess.Popen] = []
        forwarder = None
        signals = {"count": 0}

        def on_signal(signum, frame):
            signals["count"] += 1
            if signals["count"] == 1 and procs and procs[0].poll() is None:
                procs[0].send_signal(signal.SIGTERM)  # rank 0 drains and releases the followers
            elif signals["count"] > 1:
                raise KeyboardInterrupt

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            for rank in range(world_size):
                fd = listener.fileno() if rank == 0 else None
                env = worker_env(rank, world_size, port, tmpdir / f"rank{rank}.json", fd)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "trtlm.serve.ranks", str(cfg_path)], env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, pass_fds=(fd,) if fd is not None else (),
                    start_new_session=False))
                if rank == 0:
                    listener.close()
                    forwarder = threading.Thread(target=_forward_output, args=(procs[0].stdout, sys.stdout), daemon=True)
                    forwarder.start()
            _watch_serving(procs, tmpdir, watch)
        finally:
            listener.close()
            kill_all(procs)
            if forwarder is not None:
                forwarder.join(timeout=5)
            for s, h in previous.items():
                signal.signal(s, h)


def _watch_serving(procs, tmpdir: Path, watch) -> None:
    """:func:`trtlm.runtime.launch.watch`, plus: once rank 0 exited 0, followers that do not leave within
    :data:`FOLLOWER_EXIT_S` are killed (the server is done either way)."""
    done = threading.Event()
    error: list[BaseException] = []

    def run():
        try:
            watch(procs, tmpdir)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    rank0_exit: float | None = None
    while not done.wait(0.05):
        if procs[0].poll() == 0:
            rank0_exit = rank0_exit or time.monotonic()
            if time.monotonic() - rank0_exit > FOLLOWER_EXIT_S:
                for p in procs[1:]:
                    if p.poll() is None:
                        p.kill()
                break
    t.join(timeout=15)
    if error:
        raise error[0]


def _load_rank0(config, env):
    """rank 0's loader for :func:`trtlm.serve.server.run_server`."""
    from trtlm.api import DistributedLLM
    from trtlm.runtime.async_engine import AsyncEngine
    from trtlm.serve.server import engine_config, load_chat_template

    engine_dir = Path(config.engine_dir)
    template = load_chat_template(config, engine_dir, config.tokenizer_dir)
    llm = DistributedLLM(engine_dir, tokenizer_dir=config.tokenizer_dir, device=config.device,
                         timeout_s=SERVE_DIST_TIMEOUT_S, env=env, engine_config=engine_config(config))
    async_engine = AsyncEngine(llm.engine, max_queue_size=config.max_queue_size)
    async_engine.start()
    return async_engine, llm.engine, template


def _follow(config, env) -> None:
    from trtlm.api import DistributedLLM
    from trtlm.runtime.distributed import shutdown
    from trtlm.runtime.executor import follow

    llm = DistributedLLM(Path(config.engine_dir), tokenizer_dir=config.tokenizer_dir, device=config.device,
                         timeout_s=SERVE_DIST_TIMEOUT_S, env=env, engine_config=None)
    while follow(llm.model, llm.state, llm._pool_box)[0] != "stop":
        pass
    shutdown()


def main(argv: list[str] | None = None) -> int:
    """One rank of a served multi-rank engine (started by :func:`serve_ranks`)."""
    from trtlm.runtime.worker import _die_with_launcher, fail

    argv = sys.argv[1:] if argv is None else argv
    _die_with_launcher()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which tells rank 0
    try:
        from trtlm.runtime.launch import rank_env

        env = rank_env()
        if env is None or len(argv) != 1:
            raise UserError("trtlm.serve.ranks is started by `trtlm serve` for a multi-rank engine")
        config = _config_from_json(Path(argv[0]).read_text())
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if env.rank == 0:
            from trtlm.runtime.distributed import shutdown
            from trtlm.serve.server import run_server

            signal.signal(signal.SIGINT, signal.default_int_handler)
            run_server(config, loader=lambda c: _load_rank0(c, env), on_stop=shutdown)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when the followers stop
            _follow(config, env)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        return fail(exc)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
