"""``trtlm bench``: time to first token, prefill and decode speed, and the fraction of the
memory-bandwidth roofline that decode reaches (see :mod:`trtlm.bench`)."""
from __future__ import annotations

import json
from pathlib import Path

import click


def _ints(text: str, flag: str) -> list[int]:
    from trtlm.errors import UserError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8,64") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} {text!r}: expected positive integers")
    return values


@click.command("bench")
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--family", help="With --preset and --dummy-weights: benchmark a preset with random weights.")
@click.option("--preset", help="The family's preset (`trtlm plugins` lists them).")
@click.option("--dummy-weights", is_flag=True, help="Random weights made on the device (nothing written to disk).")
@click.option("--layers", type=int, help="With a preset: override the number of layers.")
@click.option("--batch-size", "batch_sizes", default="1,8,64", show_default=True, help="Comma-separated.")
@click.option("--input-len", default=128, show_default=True, type=int)
@click.option("--output-len", default=256, show_default=True, type=int)
@click.option("--dtype", default="bfloat16", show_default=True, help="With a preset: weight/activation dtype.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--mode", "modes", default="graph", show_default=True,
              help="Comma-separated runtime paths to time. graph: fast forward + CUDA graphs (LLM's GPU path); "
                   "compile: graph + torch.compile'd elementwise ops; plain-graph: the model's own forward in "
                   "CUDA graphs; eager: the model's own forward step by step.")
@click.option("--reps", default=3, show_default=True, type=int, help="Timed repetitions (median).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--compare-hf", is_flag=True, help="Also time transformers' eager generate on the same shapes.")
@click.option("--hf-batch-size", "hf_batch_sizes", help="Batch sizes for --compare-hf (default: --batch-size).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the JSON document here.")
def bench_cmd(engine_dir, family, preset, dummy_weights, layers, batch_sizes, input_len, output_len, dtype, device,
              modes, reps, seed, compare_hf, hf_batch_sizes, as_json, output):
    """Benchmark generation speed against the memory-bandwidth roofline."""
    import torch

    from trtlm.bench import BenchOptions, dummy_model, engine_model, run_bench
    from trtlm.errors import UserError

    if (engine_dir is None) == (family is None):
        raise UserError("give --engine-dir, or --family with --preset and --dummy-weights")
    if family is not None and (not preset or not dummy_weights):
        raise UserError("--family benchmarks a preset with random weights: add --preset NAME --dummy-weights")
    if input_len < 1 or output_len < 2:
        raise UserError("--input-len must be >= 1 and --output-len >= 2")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible (use --device cpu)")
    opts = BenchOptions(batch_sizes=_ints(batch_sizes, "--batch-size"), input_len=input_len, output_len=output_len,
                        modes=[m.strip() for m in modes.split(",") if m.strip()], reps=reps,
                        compare_hf=compare_hf, seed=seed,
                        hf_batch_sizes=_ints(hf_batch_sizes, "--hf-batch-size") if hf_batch_sizes else None)
    if engine_dir is not None:
        if not (engine_dir / "config.json").exists():
            raise UserError(f"{engine_dir}: no config.json (build an engine with `trtlm build`)")
        bm = engine_model(engine_dir, dev)
    else:
        bm = dummy_model(family, preset, dtype, dev, layers, seed)
    log = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    result = run_bench(bm, dev, opts, log)
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if as_json:
        click.echo(text)
