"""``trtlm convert``: a Hugging Face (or FT) checkpoint -> a TensorRT-LLM checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import click

QUANT_MODES = ("fp8", "int8-wo", "int4-wo", "int4-awq", "int8-sq")


@click.command("convert")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Hugging Face (or FasterTransformer) model directory.")
@click.option("--output-dir", required=True, type=click.Path(path_type=Path), help="Where to write the checkpoint.")
@click.option("--family", help="Family name, with --preset and --dummy-weights (or to pick a reader for FT input).")
@click.option("--preset", help="A family preset (e.g. tiny, 7b) to build with --dummy-weights.")
@click.option("--dummy-weights", is_flag=True, help="Random weights of the right shapes (no checkpoint needed).")
@click.option("--dtype", default="auto", show_default=True, help="auto|float32|float16|bfloat16")
@click.option("--tp-size", default=1, show_default=True, type=int)
@click.option("--pp-size", default=1, show_default=True, type=int)
@click.option("--moe-tp-size", type=int, help="Tensor parallelism inside MoE experts (tp = moe_tp x moe_ep).")
@click.option("--moe-ep-size", type=int, help="Expert parallelism (tp = moe_tp x moe_ep).")
@click.option("--moe-normalization-mode", type=click.Choice(["none", "renormalize"]),
              help="Routing-weight normalisation (default: what the model uses).")
@click.option("--quant", type=click.Choice(QUANT_MODES), help="Quantize weights (and activations).")
@click.option("--kv-cache-dtype", type=click.Choice(["fp8", "int8"]), help="Quantize the KV cache.")
@click.option("--calib-data", type=click.Path(path_type=Path), help="Calibration text or JSONL file.")
@click.option("--calib-size", default=64, show_default=True, type=int)
@click.option("--calib-max-seq-len", default=256, show_default=True, type=int)
@click.option("--awq-group-size", default=128, show_default=True, type=int)
@click.option("--smoothquant-alpha", default=0.5, show_default=True, type=float)
@click.option("--to", "to", default="trtllm", show_default=True, help="Output format: trtllm, or ft (MPT).")
@click.option("--no-parallel-embedding", is_flag=True, help="Replicate the embedding instead of splitting its rows.")
@click.option("--workers", default=1, show_default=True, type=int, help="Tensors converted in parallel.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --dummy-weights.")
@click.option("--force", is_flag=True, help="Replace a non-empty --output-dir.")
@click.option("--ft-allow-lossy", is_flag=True,
              help="With --to ft: write even when the model uses settings FT cannot carry (dropped).")
def convert_cmd(model_dir, output_dir, family, preset, dummy_weights, dtype, tp_size, pp_size, moe_tp_size,
                moe_ep_size, moe_normalization_mode, quant, kv_cache_dtype, calib_data, calib_size,
                calib_max_seq_len, awq_group_size, smoothquant_alpha, to, no_parallel_embedding, workers,
                allow_pickle, seed, force, ft_allow_lossy) -> None:
    """Convert a model into a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors)."""
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.errors import UserError

    if model_dir is None and not (family and preset):
        raise UserError("give --model-dir, or --family and --preset with --dummy-weights")
    if model_dir is not None and preset:
        raise UserError("--preset replaces --model-dir; give one of them")
    options = ConvertOptions(
        dtype=dtype, tp_size=tp_size, pp_size=pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size,
        moe_normalization_mode=moe_normalization_mode, workers=workers,
        use_parallel_embedding=not no_parallel_embedding, dummy_weights=dummy_weights, allow_pickle=allow_pickle,
        to=to, force=force, seed=seed, quant=quant, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data,
        calib_size=calib_size, calib_max_seq_len=calib_max_seq_len, awq_group_size=awq_group_size,
        smoothquant_alpha=smoothquant_alpha, progress=sys.stderr.isatty(),
        extra={"ft_allow_lossy": True} if ft_allow_lossy else {},
    )
    result = convert(model_dir, output_dir, options, family=family, preset=preset)
    if to == "trtllm":
        mapping = result.config["mapping"]
        click.echo(f"{result.family}: wrote {result.num_tensors} tensors ({result.bytes_written / 1e6:.1f} MB) "
                   f"for tp={mapping['tp_size']} pp={mapping['pp_size']} to {output_dir}")
    else:
        click.echo(f"{result.family}: wrote {to} format to {output_dir}")
