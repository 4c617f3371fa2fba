"""Running ``trtlm serve``: load the engine behind a listening socket, serve, drain on SIGTERM.

The socket is bound first and the engine loads on a thread, so ``/health``
answers 503 ``loading`` (instead of connection refused) while weights load,
and a bad ``--port`` fails before any weight is read.  A load failure stops
the server with one ``error:`` line and exit 1.

SIGTERM (or Ctrl-C) starts a graceful shutdown: uvicorn stops accepting
connections, new requests on open connections get 503, in-flight requests
run to completion for ``--shutdown-grace`` seconds and are then aborted (each
client still gets a final ``finish_reason: "abort"`` and ``data: [DONE]``),
the engine stops, and the process exits 0.  A second Ctrl-C forces the exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

log = logging.getLogger("trtlm.serve")

#: How long a thread may hold the GIL while another waits for it (``sys.setswitchinterval``).
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass
class ServeConfig:
    """``trtlm serve``'s options."""

    engine_dir: Path | None = None
    model_dir: Path | None = None
    tokenizer_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue_size: int | None = 2048
    request_timeout: float | None = None
    #: EngineConfig fields (``trtlm.commands.engine_options.ENGINE_FLAGS``), JSON-able for rank workers.
    engine: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "auto"
    chat_template: Path | None = None
    max_body_size: int = 8 * 1024 * 1024
    shutdown_grace: float = 30.0
    log_level: str = "info"

    def validate(self) -> None:
        if (self.engine_dir is None) == (self.model_dir is None):
            raise UserError("give exactly one of --engine-dir and --model-dir")
        for flag, path in (("--engine-dir", self.engine_dir), ("--model-dir", self.model_dir),
                           ("--tokenizer-dir", self.tokenizer_dir)):
            if path is not None and not Path(path).is_dir():
                raise UserError(f"{flag} {path}: no such directory")
        if self.engine_dir is not None and not (Path(self.engine_dir) / "config.json").is_file():
            raise UserError(f"--engine-dir {self.engine_dir}: no config.json (build an engine with `trtlm build`)")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: must be between 0 and 65535 (0: any free port)")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise UserError(f"--max-queue-size {self.max_queue_size}: must be >= 1")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise UserError(f"--request-timeout {self.request_timeout}: must be > 0 seconds")
        if self.max_body_size < 1024:
            raise UserError(f"--max-body-size {self.max_body_size}: must be >= 1024 bytes")
        if self.shutdown_grace < 0:
            raise UserError(f"--shutdown-grace {self.shutdown_grace}: must be >= 0 seconds")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise UserError(f"--chat-template {self.chat_template}: no such file")

    def model_name(self) -> str:
        return self.served_model_name or str(self.model_dir or self.engine_dir)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free port), with one clear error when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def engine_config(config: ServeConfig):
    """The EngineConfig of the command's engine flags (one definition shared with ``trtlm run``)."""
    from trtlm.commands.engine_options import engine_config as from_settings

    return from_settings(config.engine)


def resolve_engine_dir(config: ServeConfig) -> tuple[Path, Path | None]:
    """(engine directory, tokenizer directory): ``--model-dir`` is converted and built into the cache."""
    if config.engine_dir is not None:
        return Path(config.engine_dir), config.tokenizer_dir
    from trtlm.cache import prepare_engine
    from trtlm.convert.options import ConvertOptions

    engine_dir = prepare_engine(Path(config.model_dir), ConvertOptions(dtype=config.dtype), log=log.info)
    return engine_dir, config.tokenizer_dir or Path(config.model_dir)


def load_chat_template(config: ServeConfig, engine_dir: Path, tokenizer_dir: Path | None):
    from trtlm.serve.chat_template import ChatTemplate

    return ChatTemplate.from_directory(Path(tokenizer_dir or engine_dir), override=config.chat_template)


def start_engine(config: ServeConfig, world_size: int = 1):
    """(EngineClient, ChatTemplate | None): the engine started in its own process(es), ready."""
    from trtlm.serve.ranks import EngineProcesses

    engine_dir, tokenizer_dir = resolve_engine_dir(config)
    template = load_chat_template(config, engine_dir, tokenizer_dir)
    resolved = replace(config, engine_dir=engine_dir, model_dir=None, tokenizer_dir=tokenizer_dir)
    return EngineProcesses(resolved, world_size).start(), template


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def setup_logging(level: str) -> None:
    """Server logs and the JSON access log on stderr (uvicorn's own access log is off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    access = logging.StreamHandler(sys.stderr)
    access.setFormatter(logging.Formatter("%(message)s"))
    for name, h in (("trtlm.serve", handler), ("uvicorn.error", handler), ("trtlm.serve.access", access)):
        lg = logging.getLogger(name)
        lg.handlers[:] = [h]
        lg.setLevel(level.upper())
        lg.propagate = False


def run_server(config: ServeConfig, world_size: int = 1) -> None:
    """Serve until SIGTERM / SIGINT; raise :class:`UserError` when the engine fails to load or dies.

    HTTP runs in this process, the engine in ``world_size`` rank processes (:mod:`trtlm.serve.ranks`).
    """
    import uvicorn

    from trtlm.serve.app import create_app
    from trtlm.serve.state import ServerState, ServeSettings

    setup_logging(config.log_level)
    # The engine's reader thread and the event loop share this process's GIL: when a step's outputs
    # arrive, the reader queues for it for up to the switch interval (5 ms by default) while the loop
    # streams tokens.  0.5 ms bounds that wait.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    settings = ServeSettings(model_name=config.model_name(), api_key=config.api_key,
                             request_timeout_s=config.request_timeout, max_body_bytes=config.max_body_size,
                             shutdown_grace_s=config.shutdown_grace)
    state = ServerState(settings)
    app = create_app(state)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    uconfig = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, log_level=config.log_level,
                             timeout_graceful_shutdown=config.shutdown_grace + 10, timeout_keep_alive=5)
    server = _Server(uconfig, state, config.shutdown_grace)

    def stop_serving() -> None:  # a rank died: the server cannot recover, stop with the cause
        server.should_exit = True

    def load() -> None:
        try:
            started = time.monotonic()
            engine, template = start_engine(config, world_size)
            engine.on_failure = stop_serving
            state.set_ready(engine, template)
            if not engine.healthy:  # it failed before it could tell us
                stop_serving()
            log.info("model %r ready in %.1f s (max_seq_len %d, chat template: %s)", settings.model_name,
                     time.monotonic() - started, engine.max_seq_len, "yes" if template is not None else "none")
            print(f"trtlm serve: ready at {url}", flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported as one line and the server stops
            state.set_failed(_one_line(exc))
            if not isinstance(exc, UserError):
                log.exception("loading the engine failed")
            server.should_exit = True

    print(f"trtlm serve: listening on {url} (model {settings.model_name!r}, loading)", flush=True)
    loader_thread = threading.Thread(target=load, name="trtlm-load", daemon=True)
    loader_thread.start()
    dead = None
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        loader_thread.join(timeout=None if state.status != "loading" else 0)
        engine = state.engine
        if engine is not None:
            dead = engine.error
            engine.shutdown()
    if state.status == "failed":
        raise UserError(state.error or "the engine failed to load")
    if dead is not None:
        raise UserError(f"the engine failed while serving: {dead}")
    print("trtlm serve: stopped", flush=True)


class _Server:
    """uvicorn's server with trtlm's shutdown: drain on the first SIGTERM/SIGINT, exit 0 (uvicorn
    re-raises the signal after its own shutdown, which would end the process with -15)."""

    def __new__(cls, uconfig, state, grace_s: float):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig, frame):
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                    return
                if not self.should_exit:
                    log.info("%s: shutting down (grace period %.1f s)", signal.Signals(sig).name, grace_s)
                    loop = self._loop
                    if loop is not None:  # keep a reference: the loop holds tasks only weakly
                        loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task",
                                                                  loop.create_task(state.drain(grace_s))))
                self.should_exit = True

            async def serve(self, sockets=None):
                self._loop = asyncio.get_running_loop()
                await super().serve(sockets=sockets)

        server = Server(uconfig)
        server._loop = None
        return server
