"""``trtlm run``: generate text with an engine (or straight from a HF checkpoint).

An engine converted with ``world_size = tp * pp > 1`` runs as that many
processes by default (``--launch auto``): this command starts them itself
(:mod:`trtlm.runtime.launch`), or, started by ``torchrun``, runs as the rank
torchrun says.  Every rank executes the same request; rank 0 prints.
``--launch single`` merges all ranks into this one process instead.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from trtlm.commands.convert import DTYPES
from trtlm.commands.engine_options import engine_config, engine_options, engine_settings
from trtlm.commands.options import DEVICE, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT, TOKEN_IDS, TOP_P
from trtlm.job import RunRequest, check_engine_request, execute, execute_trtllm, run_rank


@click.command("run")
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="A Hugging Face checkpoint instead: converted and built into a cache on first use "
                   "(`trtlm cache list`), said on stderr.")
@click.option("--no-cache", is_flag=True,
              help="With --model-dir: convert and build into a temporary directory, removed after the run.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path), help="Default: the engine / model directory.")
@click.option("--input-text", multiple=True, help="A prompt (repeat for a batch).")
@click.option("--input-file", type=click.Path(path_type=Path), help="One prompt per line.")
@click.option("--input-ids", multiple=True, type=TOKEN_IDS,
              help="Comma-separated token ids, each in [0, vocab size) (no tokenizer needed); repeat for a batch.")
@click.option("--max-output-len", default=32, show_default=True, type=POSITIVE,
              help="Most tokens generated per prompt (fewer when EOS comes first).")
@click.option("--temperature", default=0.0, show_default=True, type=NON_NEGATIVE_FLOAT,
              help="Sampling temperature; 0 = greedy (the most likely token).")
@click.option("--top-k", default=0, show_default=True, type=NON_NEGATIVE,
              help="Sample among the k most likely tokens; 0 = no limit.")
@click.option("--top-p", default=1.0, show_default=True, type=TOP_P,
              help="Sample among the most likely tokens whose probabilities sum to p, in (0, 1]; 1 = no limit.")
@click.option("--seed", type=int, help="Seed of the sampler (same seed, same tokens). Default: random.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE,
              help="cpu, cuda, cuda:1, ...; with several ranks `cuda` gives each rank its own GPU.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="With --model-dir: conversion dtype.")
@click.option("--streaming", is_flag=True,
              help="Print the completion token by token as it is generated (one prompt; same output as without).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document.")
@click.option("--launch", type=click.Choice(["auto", "single", "multi"]), default="auto", show_default=True,
              help="auto: one process per rank when the engine has several ranks (tp x pp), else one process; "
                   "single: merge all ranks into this process; multi: one process per rank.")
@click.option("--dist-timeout", default=300.0, show_default=True, type=POSITIVE_FLOAT,
              help="Seconds any collective may wait for another rank before the job fails.")
@engine_options
def run_cmd(engine_dir, model_dir, no_cache, tokenizer_dir, input_text, input_file, input_ids, max_output_len,
            temperature, top_k, top_p, seed, device, dtype, streaming, as_json, launch, dist_timeout, **engine):
    """Generate from prompts; greedy by default, stops at EOS.

    Output: each prompt followed by its completion (text prompts), or the prompt's token ids
    followed by the generated ones, comma-separated (--input-ids); with --streaming the same
    bytes, printed as they are generated.
    """
    from trtlm.errors import UserError

    sources = sum(bool(x) for x in (input_text, input_file, input_ids))
    if sources != 1:
        raise UserError("give exactly one of --input-text, --input-file and --input-ids")
    if input_ids:
        prompts: list[Any] = [list(ids) for ids in input_ids]
    elif input_file:
        if not input_file.is_file():
            raise UserError(f"--input-file {input_file}: no such file")
        prompts = [line for line in input_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--input-file {input_file}: no prompts (one per non-empty line)")
    else:
        prompts = list(input_text)
        if not all(p for p in prompts):
            raise UserError("--input-text: a prompt is empty")
    if streaming and as_json:
        raise UserError("--streaming prints text as it is generated, --json one document at the end: give one")
    if streaming and len(prompts) > 1:
        raise UserError(f"--streaming streams one prompt, got {len(prompts)}: run them without --streaming "
                        f"(printed one after another), or one at a time")
    request = RunRequest(engine_dir=str(engine_dir) if engine_dir else None,
                         tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None, device=device, prompts=prompts,
                         max_output_len=max_output_len, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         streaming=streaming, as_json=as_json, dist_timeout=dist_timeout,
                         engine=engine_settings(engine))

    from trtlm.runtime.launch import engine_world_size, launch_ranks, rank_env

    env = rank_env()
    if env is not None and env.world_size > 1:  # started by torchrun: be one rank
        if model_dir is not None or engine_dir is None:
            raise UserError("under torchrun give --engine-dir (an engine built with the tp/pp you launch), "
                            "not --model-dir")
        if launch == "single":
            raise UserError("--launch single cannot run under torchrun (WORLD_SIZE > 1): run without torchrun")
        check_engine_request(Path(engine_dir), prompts, max_output_len)
        try:
            run_rank(request, env)
        except UserError as exc:
            raise UserError(f"rank {env.rank}: {exc}") from None
        return

    if (engine_dir is None) == (model_dir is None):
        raise UserError("give exactly one of --engine-dir and --model-dir")
    if no_cache and model_dir is None:
        raise UserError("--no-cache applies to --model-dir (an --engine-dir is used as it is)")
    with contextlib.ExitStack() as stack:
        if model_dir is not None:
            from trtlm.cache import prepare_engine
            from trtlm.convert.options import ConvertOptions

            work = None
            if no_cache:
                import tempfile

                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trtlm-run-")))
            engine_dir = prepare_engine(Path(model_dir), ConvertOptions(dtype=dtype), use_cache=not no_cache,
                                        work_dir=work, log=lambda msg: click.echo(msg, err=True))
            request.engine_dir = str(engine_dir)
            request.tokenizer_dir = request.tokenizer_dir or str(model_dir)
        else:
            from trtlm.modeldir import check_model_path
            from trtlm.runtime.trtllm_backend import is_trtllm_engine

            check_model_path(engine_dir, "engine", "--engine-dir")
            if is_trtllm_engine(engine_dir):  # built by TensorRT-LLM: its own runtime runs it
                execute_trtllm(request)
                return
        check_engine_request(Path(engine_dir), prompts, max_output_len)
        world = engine_world_size(Path(engine_dir))  # no torch import: the ranks import it, not the launcher
        if launch == "multi" or (launch == "auto" and world > 1):
            launch_ranks(request.to_dict(), world)
            return
        from trtlm.api import LLM
        from trtlm.devices import resolve_device

        llm = LLM(engine_dir, tokenizer_dir=request.tokenizer_dir, device=resolve_device(device),
                  engine_config=engine_config(request.engine))
        execute(llm, request, emit=True)


