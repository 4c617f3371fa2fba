"""``trtlm run``: generate text with an engine (or straight from a HF checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("run")
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="A Hugging Face checkpoint instead: converted and built into a cache on first use.")
@click.option("--tokenizer-dir", type=click.Path(path_type=Path), help="Default: the engine / model directory.")
@click.option("--input-text", multiple=True, help="A prompt (repeat for a batch).")
@click.option("--input-file", type=click.Path(path_type=Path), help="One prompt per line.")
@click.option("--input-ids", help="Comma-separated token ids (no tokenizer needed).")
@click.option("--max-output-len", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True, help="With --model-dir: conversion dtype.")
@click.option("--streaming", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document.")
def run_cmd(engine_dir, model_dir, tokenizer_dir, input_text, input_file, input_ids, max_output_len, temperature,
            top_k, top_p, seed, device, dtype, streaming, as_json):
    """Generate from prompts; greedy by default, stops at EOS."""
    from trtlm.api import LLM
    from trtlm.convert.options import ConvertOptions
    from trtlm.errors import UserError

    sources = sum(bool(x) for x in (input_text, input_file, input_ids))
    if sources != 1:
        raise UserError("give exactly one of --input-text, --input-file and --input-ids")
    if input_ids:
        try:
            prompts = [[int(t) for t in input_ids.split(",") if t.strip()]]
        except ValueError:
            raise UserError(f"--input-ids {input_ids!r}: expected comma-separated integers") from None
    elif input_file:
        if not input_file.exists():
            raise UserError(f"{input_file}: no such file")
        prompts = [line for line in input_file.read_text().splitlines() if line.strip()]
    else:
        prompts = list(input_text)
    llm = LLM(engine_dir, model_dir=model_dir, tokenizer_dir=tokenizer_dir, device=device,
              convert_options=ConvertOptions(dtype=dtype))
    on_tokens = None
    if streaming and len(prompts) == 1 and not as_json:
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

    outputs = llm.generate(prompts, max_new_tokens=max_output_len, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, on_tokens=on_tokens)
    if as_json:
        click.echo(json.dumps({"outputs": outputs}))
    elif on_tokens is not None:
        click.echo()
    else:
        for prompt, out in zip(prompts, outputs):
            if out["text"] is not None:
                click.echo(f"{prompt}{out['text']}")
            else:
                click.echo(",".join(map(str, out["output_ids"])))
