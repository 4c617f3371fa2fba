"""``trtlm serve``: an OpenAI- and Triton-compatible HTTP server (see :mod:`trtlm.serve`)."""
from __future__ import annotations

from pathlib import Path

import click

from trtlm.commands.engine_options import engine_options, engine_settings


@click.command("serve")
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="A Hugging Face checkpoint instead: converted and built into a cache on first use.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path), help="Default: the engine / model directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=int, help="0: any free port (printed at start).")
@click.option("--served-model-name", help="The `model` clients send (default: the --engine-dir / --model-dir as given).")
@click.option("--api-key", envvar="TRTLM_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer KEY` on every /v1 and /v2 route.")
@click.option("--max-queue-size", default=2048, show_default=True, type=int,
              help="Requests waiting for the engine at most; more get 503 with Retry-After.")
@click.option("--request-timeout", type=float, help="Seconds a request may take before it is aborted (504).")
@engine_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True, help="With --model-dir: conversion dtype.")
@click.option("--chat-template", type=click.Path(path_type=Path),
              help="A Jinja chat template file (default: the tokenizer's own).")
@click.option("--max-body-size", default=8 * 1024 * 1024, show_default=True, type=int,
              help="Largest request body in bytes; larger ones get 400.")
@click.option("--shutdown-grace", default=30.0, show_default=True, type=float,
              help="On SIGTERM: seconds in-flight requests may finish before they are aborted.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--launch", type=click.Choice(["auto", "single", "multi"]), default="auto", show_default=True,
              help="The engine runs apart from the HTTP process. auto: one engine process per rank; single: "
                   "all ranks merged into one engine process; multi: one per rank (an error for one rank).")
def serve_cmd(engine_dir, model_dir, tokenizer_dir, host, port, served_model_name, api_key, max_queue_size,
              request_timeout, device, dtype, chat_template, max_body_size, shutdown_grace, log_level, launch,
              **engine_flags):
    """Serve a model over HTTP: OpenAI /v1 (completions, chat) and Triton /v2 generate APIs.

    Also /health, Prometheus /metrics; SIGTERM drains in-flight requests and exits 0.
    Needs the `serve` extra: pip install 'trtlm[serve]'.
    """
    from trtlm.serve import require_serve_deps

    require_serve_deps()
    from trtlm.serve.main import serve_main
    from trtlm.serve.server import ServeConfig

    config = ServeConfig(engine_dir=engine_dir, model_dir=model_dir, tokenizer_dir=tokenizer_dir, host=host, port=port,
                         served_model_name=served_model_name, api_key=api_key or None, max_queue_size=max_queue_size,
                         request_timeout=request_timeout, engine=engine_settings(engine_flags), device=device,
                         dtype=dtype, chat_template=chat_template, max_body_size=max_body_size,
                         shutdown_grace=shutdown_grace, log_level=log_level)
    serve_main(config, launch=launch)
