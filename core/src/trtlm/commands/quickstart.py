"""``trtlm quickstart``: the whole job once — convert, build, run — on a bundled model or yours."""
from __future__ import annotations

import time
from pathlib import Path

import click

from trtlm.commands.options import DEVICE, POSITIVE


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
@click.option("--tp-size", default=1, show_default=True, type=POSITIVE,
              help="Tensor-parallel ranks of the checkpoint (run merged in this process).")
@click.option("--max-output-len", default=48, show_default=True, type=POSITIVE, help="Tokens generated per prompt.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu, cuda or cuda:N.")
def quickstart_cmd(model_dir, work_dir, prompts, tp_size, max_output_len, device):
    """Convert, build and run a model end to end, printing each step.

    WORK_DIR/checkpoint and WORK_DIR/engine are replaced on each run when they hold an earlier
    trtlm output; anything else there (or the model itself) is never replaced.
    """
    from trtlm.devices import resolve_device
    from trtlm.fsutil import check_output_dir
    from trtlm.modeldir import check_model_path

    model_dir = check_model_path(model_dir, "model", "--model-dir") if model_dir else bundled_model_dir()
    prompts = prompts or ("def ", "for i in range(", "    def __init__(self")
    ckpt, engine = work_dir / "checkpoint", work_dir / "engine"
    for out, step in ((ckpt, "convert"), (engine, "build")):  # its own earlier outputs only, never an input
        check_output_dir(out, True, {"--model-dir": model_dir}, flag="--work-dir", command=step)
    dev = resolve_device(device)

    from trtlm.api import LLM
    from trtlm.build import BuildOptions, build
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert

    t0 = time.perf_counter()
    result = convert(model_dir, ckpt, ConvertOptions(tp_size=tp_size, force=True))
    click.echo(f"[1/3] convert  {model_dir} -> {ckpt}  ({result.family}, {result.num_tensors} tensors, "
               f"tp={tp_size}, {time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    build(ckpt, engine, BuildOptions(force=True))
    click.echo(f"[2/3] build    {ckpt} -> {engine}  ({time.perf_counter() - t0:.2f} s)")
    t0 = time.perf_counter()
    llm = LLM(engine, tokenizer_dir=model_dir, device=dev)
    outputs = llm.generate(list(prompts), max_new_tokens=max_output_len)
    click.echo(f"[3/3] run      {len(prompts)} prompt(s), greedy, {max_output_len} tokens "
               f"({time.perf_counter() - t0:.2f} s)\n")
    for prompt, out in zip(prompts, outputs):
        click.echo(click.style(prompt, bold=True) + (out["text"] or ""))
        click.echo("-" * 60)
