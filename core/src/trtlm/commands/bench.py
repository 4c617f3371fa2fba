"""``trtlm bench``: the engine's latency against the memory-bandwidth roofline and its offline
throughput (see :mod:`trtlm.bench`); ``trtlm bench serve`` times any OpenAI-compatible server."""
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


def _range(text: str, flag: str) -> tuple[int, int]:
    from trtlm.errors import UserError

    values = _ints(text.replace("-", ","), flag)
    if len(values) != 2 or values[0] > values[1]:
        raise UserError(f"{flag} {text!r}: expected LOW-HIGH, e.g. 128-1024")
    return values[0], values[1]


@click.group("bench", invoke_without_command=True)
@click.option("--engine-dir", type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--family", help="With --preset and --dummy-weights: benchmark a preset with random weights.")
@click.option("--preset", help="The family's preset (`trtlm plugins` lists them).")
@click.option("--dummy-weights", is_flag=True, help="Random weights made on the device (nothing written to disk).")
@click.option("--layers", type=click.IntRange(min=1), help="With a preset: override the number of layers.")
@click.option("--quant", help="With a preset: a quantization format (`trtlm convert --quant` names), its layers "
                              "holding random codes and scales (the layout and kernels of a real checkpoint).")
@click.option("--mode", "modes", default="latency", show_default=True,
              help="Comma-separated: latency (batches of equal prompts: TTFT, decode speed, roofline) and/or "
                   "offline (many requests of random lengths at once: throughput, TTFT/TPOT percentiles, against "
                   "static batching on the same engine).")
@click.option("--batch-size", "batch_sizes", default="1,8,64", show_default=True,
              help="Latency mode: comma-separated batch sizes.")
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(min=1),
              help="Latency mode: prompt tokens.")
@click.option("--output-len", default=256, show_default=True, type=click.IntRange(min=2),
              help="Latency mode: generated tokens.")
@click.option("--num-requests", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Offline mode: requests submitted at once.")
@click.option("--input-range", default="128-1024", show_default=True,
              help="Offline mode: prompt lengths, uniform in LOW-HIGH (seeded).")
@click.option("--output-range", default="128-512", show_default=True,
              help="Offline mode: output lengths, uniform in LOW-HIGH (seeded).")
@click.option("--dataset", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Offline mode: JSONL of {input_len or prompt_ids, output_len} instead of random lengths.")
@click.option("--max-batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Offline mode: sequences in flight (and the static baseline's batch size).")
@click.option("--max-num-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Offline mode: tokens per engine step (longer prompts are chunked).")
@click.option("--static-baseline/--no-static-baseline", default=True, show_default=True,
              help="Offline mode: also run the same requests with static batching.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Replay decode steps from CUDA graphs (GPU).")
@click.option("--dtype", default="bfloat16", show_default=True, help="With a preset: weight/activation dtype.")
@click.option("--device", default="cuda", show_default=True, help="cpu, cuda, cuda:N.")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(min=1),
              help="Latency mode: timed repetitions (median).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompts and weights.")
@click.option("--compare-hf", is_flag=True, help="Also time transformers' generate on the same shapes/requests.")
@click.option("--hf-batch-size", "hf_batch_sizes",
              help="Batch sizes for --compare-hf (default: --batch-size; offline mode: 64).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the JSON document here.")
@click.pass_context
def bench_cmd(ctx, engine_dir, family, preset, dummy_weights, layers, quant, modes, batch_sizes, input_len, output_len,
              num_requests, input_range, output_range, dataset, max_batch_size, max_num_tokens, static_baseline,
              cuda_graphs, dtype, device, reps, seed, compare_hf, hf_batch_sizes, as_json, output):
    """Benchmark the engine: latency against the memory-bandwidth roofline, offline throughput."""
    if ctx.invoked_subcommand is not None:
        return
    from trtlm.bench import MODES, BenchOptions, dummy_model, engine_model, run_bench
    from trtlm.devices import resolve_device
    from trtlm.errors import UserError

    if (engine_dir is None) == (family is None):
        raise UserError("give --engine-dir, or --family with --preset and --dummy-weights")
    if quant and family is None:
        raise UserError("--quant quantizes a preset's random weights: use it with --family/--preset "
                        "(an engine directory is benchmarked as it was converted)")
    if family is not None and (not preset or not dummy_weights):
        raise UserError("--family benchmarks a preset with random weights: add --preset NAME --dummy-weights")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        raise UserError(f"--mode {modes!r}: choose from {', '.join(MODES)}")
    dev = resolve_device(device)
    opts = BenchOptions(batch_sizes=_ints(batch_sizes, "--batch-size"), input_len=input_len, output_len=output_len,
                        modes=mode_list, reps=reps, compare_hf=compare_hf, seed=seed,
                        hf_batch_sizes=_ints(hf_batch_sizes, "--hf-batch-size") if hf_batch_sizes else None,
                        cuda_graphs=cuda_graphs, num_requests=num_requests,
                        input_range=_range(input_range, "--input-range"),
                        output_range=_range(output_range, "--output-range"), dataset=dataset,
                        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, static_baseline=static_baseline)
    if engine_dir is not None:
        from trtlm.modeldir import check_model_path
        from trtlm.runtime.trtllm_backend import is_trtllm_engine

        check_model_path(engine_dir, "engine", "--engine-dir")
        if is_trtllm_engine(engine_dir):
            raise UserError(f"--engine-dir {engine_dir}: built by TensorRT-LLM; `trtlm bench` times trtlm's engine "
                            f"(time this one with TensorRT-LLM's trtllm-bench, or build with --backend torch)")
        bm = engine_model(engine_dir, dev)
    else:
        bm = dummy_model(family, preset, dtype, dev, layers, seed, quant)
    log = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    result = run_bench(bm, dev, opts, log)
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if as_json:
        click.echo(text)


def _attach_serve() -> None:
    """``trtlm bench serve`` lives with the server package (an optional extra's client)."""
    try:
        from trtlm.serve.benchmark import bench_serve
    except ImportError:
        return
    bench_cmd.add_command(bench_serve, "serve")


_attach_serve()
