"""``trtlm run``: generate text with an engine (or straight from a HF checkpoint).

An engine converted with ``world_size = tp * pp > 1`` runs as that many
processes by default (``--launch auto``): this command starts them itself
(:mod:`trtlm.runtime.launch`), or, started by ``torchrun``, runs as the rank
torchrun says.  Every rank executes the same request; rank 0 prints.
``--launch single`` merges all ranks into this one process instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


@click.command("run")
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="A Hugging Face checkpoint instead: converted and built into a cache on first use.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path), help="Default: the engine / model directory.")
@click.option("--input-text", multiple=True, help="A prompt (repeat for a batch).")
@click.option("--input-file", type=click.Path(path_type=Path), help="One prompt per line.")
@click.option("--input-ids", multiple=True,
              help="Comma-separated token ids (no tokenizer needed); repeat for a batch.")
@click.option("--max-output-len", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int)
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:1, ...; with several ranks `cuda` gives each rank its own GPU.")
@click.option("--dtype", default="auto", show_default=True, help="With --model-dir: conversion dtype.")
@click.option("--streaming", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document.")
@click.option("--launch", type=click.Choice(["auto", "single", "multi"]), default="auto", show_default=True,
              help="auto: one process per rank when the engine has several ranks (tp x pp), else one process; "
                   "single: merge all ranks into this process; multi: one process per rank.")
@click.option("--dist-timeout", default=300.0, show_default=True, type=float,
              help="Seconds any collective may wait for another rank before the job fails.")
def run_cmd(engine_dir, model_dir, tokenizer_dir, input_text, input_file, input_ids, max_output_len, temperature,
            top_k, top_p, seed, device, dtype, streaming, as_json, launch, dist_timeout):
    """Generate from prompts; greedy by default, stops at EOS."""
    from trtlm.errors import UserError

    sources = sum(bool(x) for x in (input_text, input_file, input_ids))
    if sources != 1:
        raise UserError("give exactly one of --input-text, --input-file and --input-ids")
    if input_ids:
        prompts: list[Any] = [parse_ids(spec) for spec in input_ids]
    elif input_file:
        if not input_file.exists():
            raise UserError(f"{input_file}: no such file")
        prompts = [line for line in input_file.read_text().splitlines() if line.strip()]
    else:
        prompts = list(input_text)
    request = {"engine_dir": str(engine_dir) if engine_dir else None, "tokenizer_dir": str(tokenizer_dir or "") or None,
               "device": device, "prompts": prompts, "max_output_len": max_output_len, "temperature": temperature,
               "top_k": top_k, "top_p": top_p, "seed": seed, "streaming": streaming, "as_json": as_json,
               "dist_timeout": dist_timeout}

    from trtlm.runtime.launch import engine_world_size, launch_ranks, rank_env

    env = rank_env()
    if env is not None and env.world_size > 1:  # started by torchrun: be one rank
        if model_dir is not None or engine_dir is None:
            raise UserError("under torchrun give --engine-dir (an engine built with the tp/pp you launch), "
                            "not --model-dir")
        if launch == "single":
            raise UserError("--launch single cannot run under torchrun (WORLD_SIZE > 1): run without torchrun")
        try:
            run_rank(request, env)
        except UserError as exc:
            raise UserError(f"rank {env.rank}: {exc}") from None
        return

    if (engine_dir is None) == (model_dir is None):
        raise UserError("give exactly one of --engine-dir and --model-dir")
    if model_dir is not None:
        from trtlm.api import prepare_engine
        from trtlm.convert.options import ConvertOptions

        engine_dir = prepare_engine(Path(model_dir), ConvertOptions(dtype=dtype))
        request.update(engine_dir=str(engine_dir), tokenizer_dir=request["tokenizer_dir"] or str(model_dir))
    world = engine_world_size(Path(engine_dir))  # no torch import: the ranks import it, not the launcher
    if launch == "multi" or (launch == "auto" and world > 1):
        launch_ranks(request, world)
        return
    from trtlm.api import LLM

    llm = LLM(engine_dir, tokenizer_dir=request["tokenizer_dir"], device=device)
    execute(llm, request, emit=True)


def parse_ids(spec: str) -> list[int]:
    from trtlm.errors import UserError

    try:
        ids = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--input-ids {spec!r}: expected comma-separated integers") from None
    if not ids:
        raise UserError(f"--input-ids {spec!r}: no token ids")
    return ids


def run_rank(request: dict[str, Any], env) -> None:
    """Be rank ``env.rank`` of the job: load this rank's file, generate, and print on rank 0."""
    from trtlm.api import DistributedLLM

    with DistributedLLM(request["engine_dir"], tokenizer_dir=request["tokenizer_dir"], device=request["device"],
                        timeout_s=request["dist_timeout"], env=env) as llm:
        execute(llm, request, emit=env.rank == 0)


def execute(llm, request: dict[str, Any], emit: bool) -> list[dict[str, Any]]:
    """Generate for ``request`` with ``llm`` (one process or one rank); print when ``emit``."""
    prompts = request["prompts"]
    on_tokens = None
    if emit and request["streaming"] and len(prompts) == 1 and not request["as_json"]:
        texts = isinstance(prompts[0], str)
        sofar: list[int] = []
        printed = [""]

        def on_tokens(step, ids):
            if ids[0] < 0:
                return
            sofar.append(ids[0])
            if texts:
                text = llm.tokenizer.decode(sofar)
                sys.stdout.write(text[len(printed[0]):])
                printed[0] = text
            else:
                sys.stdout.write(f"{ids[0]} ")
            sys.stdout.flush()

    outputs = llm.generate(prompts, max_new_tokens=request["max_output_len"], temperature=request["temperature"],
                           top_k=request["top_k"], top_p=request["top_p"], seed=request["seed"],
                           on_tokens=on_tokens)
    if not emit:
        return outputs
    if request["as_json"]:
        click.echo(json.dumps({"outputs": outputs}))
    elif on_tokens is not None:
        click.echo()
    else:
        for prompt, out in zip(prompts, outputs):
            if out["text"] is not None:
                click.echo(f"{prompt}{out['text']}")
            else:
                click.echo(",".join(map(str, out["output_ids"])))
    sys.stdout.flush()
    return outputs
