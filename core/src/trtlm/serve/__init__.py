"""``trtlm serve``: an OpenAI- and Triton-compatible HTTP server; the engine runs in processes of its own.

The server needs the optional ``serve`` extra (FastAPI, uvicorn, jinja2,
prometheus-client); :func:`require_serve_deps` turns a missing one into one
line saying which pip command installs it.  Modules:

* :mod:`trtlm.serve.server`   -- configuration, engine loading, uvicorn, SIGTERM draining, ranks
* :mod:`trtlm.serve.app`      -- the FastAPI application (routes)
* :mod:`trtlm.serve.state`    -- what the routes share (settings, engine, metrics, live requests)
* :mod:`trtlm.serve.middleware` -- access log, body limit, API key
* :mod:`trtlm.serve.handling` -- validate, tokenize, check lengths, submit (shared by the routes)
* :mod:`trtlm.serve.generation` -- one HTTP request's engine requests: pumped, timed, aborted
* :mod:`trtlm.serve.streams`  -- the SSE streams of completions, chat and Triton generate_stream
* :mod:`trtlm.serve.openai_protocol` / :mod:`trtlm.serve.triton_protocol` -- request validation, responses
* :mod:`trtlm.serve.errors`   -- OpenAI / Triton error shapes
* :mod:`trtlm.serve.ranks`    -- the engine's processes (one per rank), started and watched from here
* :mod:`trtlm.serve.engine_core` -- rank 0's loop: apply commands, step, send each step's deltas
* :mod:`trtlm.serve.engine_client` -- this process's side: submit, stream, abort, health
* :mod:`trtlm.serve.wire`     -- the per-step deltas and their reassembly into RequestOutputs
* :mod:`trtlm.serve.chat_template` -- chat templates rendered as transformers renders them
* :mod:`trtlm.serve.metrics`  -- Prometheus metrics
* :mod:`trtlm.serve.streaming` -- server-sent events with disconnect detection
* :mod:`trtlm.serve.benchmark` -- ``trtlm bench serve``, a load generator for any OpenAI-compatible URL
"""
from __future__ import annotations

import importlib.util

from trtlm.errors import UserError

#: import name -> distribution name of what ``trtlm[serve]`` installs.
SERVE_DEPS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "jinja2": "jinja2", "prometheus_client": "prometheus-client"}
INSTALL_HINT = "pip install 'trtlm[serve]'"


def require_serve_deps() -> None:
    """Raise one :class:`UserError` line naming the missing packages and the pip command."""
    missing = [dist for mod, dist in SERVE_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError(f"trtlm serve needs {', '.join(missing)}: {INSTALL_HINT}")
