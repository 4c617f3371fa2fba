"""``trtlm triton-repo``: write a Triton model repository for an engine (and optionally serve it)."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("triton-repo")
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path),
              help="Engine built by `trtlm build` (torch or tensorrt-llm backend).")
@click.option("--output-dir", required=True, type=click.Path(path_type=Path), help="The model repository to write.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path),
              help="Tokenizer files (default: the engine's own; required for tensorrt-llm engines).")
@click.option("--model-name", default="ensemble", show_default=True,
              help="Name of the model clients call (/v2/models/NAME/generate).")
@click.option("--max-batch-size", type=int, help="Triton max_batch_size (default: the engine's build max_batch_size).")
@click.option("--decoupled/--no-decoupled", default=True, show_default=True,
              help="Decoupled transaction policy: needed for streaming (generate_stream, stream=true).")
@click.option("--instance-count", default=1, show_default=True, type=int,
              help="Model instances (torch: engine copies; tensorrt-llm: pre/postprocessing and BLS instances).")
@click.option("--kv-cache-free-gpu-mem-fraction", default=0.9, show_default=True, type=float,
              help="Share of the GPU memory free after loading that the KV cache takes.")
@click.option("--max-queue-delay-us", default=0, show_default=True, type=int,
              help="Triton dynamic batcher's max_queue_delay_microseconds.")
@click.option("--copy/--link", "copy", default=True, show_default=True,
              help="Copy engine and tokenizer into the repository (hard links where possible), or symlink them.")
@click.option("--force", is_flag=True, help="Replace an existing repository written by trtlm.")
@click.option("--launch", is_flag=True,
              help="Then run tritonserver on it (Ctrl-C stops it); says how to install Triton when it is missing.")
@click.option("--http-port", default=8000, show_default=True, type=int, help="With --launch: HTTP port.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
def triton_repo_cmd(engine_dir, output_dir, tokenizer_dir, model_name, max_batch_size, decoupled, instance_count,
                    kv_cache_free_gpu_mem_fraction, max_queue_delay_us, copy, force, launch, http_port, as_json):
    """Write a Triton Inference Server model repository for an engine.

    A torch engine becomes a Python-backend model running trtlm's engine; a
    tensorrt-llm engine becomes tensorrtllm_backend's inflight_batcher_llm
    layout with every parameter filled.  Both answer tensorrtllm_backend's
    `POST /v2/models/ensemble/generate` (docs/deploy-triton.md).
    """
    from trtlm.triton.repo import RepoOptions, write_repo

    options = RepoOptions(model_name=model_name, max_batch_size=max_batch_size, decoupled=decoupled,
                          instance_count=instance_count, kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
                          max_queue_delay_us=max_queue_delay_us, link=not copy, force=force)
    summary = write_repo(engine_dir, output_dir, options, tokenizer_dir)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {summary['repository']} ({summary['kind']} engine): models {', '.join(summary['models'])}")
        click.echo(f"serve: tritonserver --model-repository {summary['repository']}")
        click.echo(f"try:   curl -X POST localhost:{http_port}/v2/models/{model_name}/generate "
                   f"-d '{{\"text_input\": \"def fib(n):\", \"max_tokens\": 20, \"bad_words\": \"\", "
                   f"\"stop_words\": \"\"}}'")
    if launch:
        serve(Path(summary["repository"]), http_port)


def serve(repo: Path, http_port: int) -> None:
    """Run tritonserver on ``repo`` in the foreground until it exits or Ctrl-C."""
    import os

    from trtlm.errors import UserError
    from trtlm.triton.server import TritonServer, find_triton

    work = Path(os.environ.get("TRTLM_CACHE") or Path.home() / ".cache" / "trtlm") / "triton"
    work.mkdir(parents=True, exist_ok=True)
    install = find_triton(work)
    server = TritonServer(install, repo, work / "tritonserver.log", http_port=http_port)
    click.echo(f"starting {install.origin} on port {http_port} (log: {server.log_path})", err=True)
    with server:  # stopped on the way out, whatever happens
        try:
            try:
                server.wait_ready()
            except RuntimeError:
                raise UserError(f"tritonserver did not become ready on {repo}; its log: {server.log_path}") from None
            click.echo(f"ready: {server.url}/v2/health/ready (Ctrl-C stops it)", err=True)
            server.proc.wait()
        except KeyboardInterrupt:
            click.echo("stopping tritonserver", err=True)
