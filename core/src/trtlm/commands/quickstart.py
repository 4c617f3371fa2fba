"""``trtlm quickstart``: the whole job once — convert, build, run — on a bundled model or yours."""
from __future__ import annotations

import time
from pathlib import Path

import click


def bundled_model_dir() -> Path:
    """The tiny Mistral-architecture code model shipped inside the package
    (trained on the CPU on Python's standard library; see scripts/train_tiny_mistral.py)."""
    return Path(__file__).resolve().parent.parent / "data" / "tiny-mistral"


@click.command("quickstart")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="A Hugging Face checkpoint (default: the bundled tiny code model).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("trtlm-quickstart"), show_default=True,
              help="Where the checkpoint and engine are written.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt(s) to complete.")
@click.option("--tp-size", default=1, show_default=True, type=int)
@click.option("--max-output-len", default=48, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
def quickstart_cmd(model_dir, work_dir, prompts, tp_size, max_output_len, device):
    """Convert, build and run a model end to end, printing each step."""
    from trtlm.api import LLM
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.runtime.engine import BuildOptions, build

    model_dir = model_dir or bundled_model_dir()
    prompts = prompts or ("def ", "for i in range(", "    def __init__(self")
    ckpt, engine = work_dir / "checkpoint", work_dir / "engine"
    t0 = time.perf_counter()
    result = convert(model_dir, ckpt, ConvertOptions(tp_size=tp_size, force=True))
    click.echo(f"[1/3] convert  {model_dir} -> {ckpt}  ({result.family}, {result.num_tensors} tensors, "
               f"tp={tp_size}, {time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    build(ckpt, engine, BuildOptions(force=True))
    click.echo(f"[2/3] build    {ckpt} -> {engine}  ({time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    llm = LLM(engine, tokenizer_dir=model_dir, device=device)
    outputs = llm.generate(list(prompts), max_new_tokens=max_output_len)
    click.echo(f"[3/3] run      {len(prompts)} prompt(s), greedy, {max_output_len} tokens "
               f"({time.perf_counter() - t0:.2f} s)\n")
    for prompt, out in zip(prompts, outputs):
        click.echo(click.style(prompt, bold=True) + (out["text"] or ""))
        click.echo("-" * 60)
