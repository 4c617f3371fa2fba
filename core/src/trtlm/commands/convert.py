"""``trtlm convert``: a Hugging Face (or FT) checkpoint -> a TensorRT-LLM checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from trtlm.commands.options import POSITIVE, UNIT, check_moe_sizes
from trtlm.quant.schemes import kv_names, names

QUANT_MODES = names()  # every registered quantization format (trtlm.quant.schemes); no torch import


class QuantChoice(click.Choice):
    """``--quant``'s choices; a modelopt-only algorithm (e.g. w4a8-awq) gets a one-line reason
    (trtlm's runtime cannot execute its checkpoint) instead of click's bare "not one of"."""

    def convert(self, value, param, ctx):
        from trtlm.quant.modelopt_calib import reject_modelopt_only

        if value not in self.choices:
            reject_modelopt_only(value)
        return super().convert(value, param, ctx)
DTYPES = ("auto", "float32", "float16", "bfloat16")  # = trtlm.convert.options.DTYPES (not imported: no torch here)


@click.command("convert")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="Hugging Face (or FasterTransformer, Megatron-Core) model directory to convert; never modified.")
@click.option("--output-dir", required=True, type=click.Path(path_type=Path),
              help="Where to write the checkpoint (config.json + rank{r}.safetensors); written atomically.")
@click.option("--family", help="Family name, with --preset and --dummy-weights (or to pick a reader for FT input).")
@click.option("--preset", help="A family preset (e.g. tiny, 7b) to build with --dummy-weights.")
@click.option("--dummy-weights", is_flag=True, help="Random weights of the right shapes (no checkpoint needed).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="Weight dtype of the checkpoint; auto keeps the model's torch_dtype.")
@click.option("--tp-size", default=1, show_default=True, type=POSITIVE,
              help="Tensor-parallel ranks: each weight matrix is split across them (must divide the heads).")
@click.option("--pp-size", default=1, show_default=True, type=POSITIVE,
              help="Pipeline-parallel stages: the layers are split across them (at most the layer count).")
@click.option("--moe-tp-size", type=POSITIVE, help="Tensor parallelism inside MoE experts (tp = moe_tp x moe_ep).")
@click.option("--moe-ep-size", type=POSITIVE, help="Expert parallelism (tp = moe_tp x moe_ep).")
@click.option("--moe-normalization-mode", type=click.Choice(["none", "renormalize"]),
              help="Routing-weight normalisation (default: what the model uses).")
@click.option("--quant", type=QuantChoice(QUANT_MODES), help="Quantize weights (and activations).")
@click.option("--kv-cache-dtype", type=click.Choice(kv_names()), help="Quantize the KV cache.")
@click.option("--calib-data", type=click.Path(path_type=Path),
              help="Calibration text (.txt, a sample per line) or JSONL (\"text\" field) file, or "
                   "random:seed=0,batches=4,batch_size=2,seq_len=32. Default: the bundled English text "
                   "(trtlm/data/calib/english.txt) when the model's tokenizer fits, else random ids (the choice "
                   "is printed).")
@click.option("--calib-size", default=64, show_default=True, type=POSITIVE,
              help="Calibration samples used (the first N of --calib-data).")
@click.option("--calib-max-seq-len", default=256, show_default=True, type=POSITIVE,
              help="Tokens per calibration sample (longer ones are cut).")
@click.option("--calibrator", default="trtlm", show_default=True, type=click.Choice(["trtlm", "modelopt"]),
              help="Calibration engine: trtlm's own (layer by layer, one layer in memory at a time) or NVIDIA "
                   "Model Optimizer's mtq.quantize on the HF model (pip install 'trtlm[modelopt]'); its scales "
                   "go through trtlm's own writer either way.")
@click.option("--calib-device", default="auto", show_default=True,
              help="Where calibration runs: auto (the GPU when one is visible, else cpu), cpu, cuda or cuda:N.")
@click.option("--calib-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Calibration compute dtype; auto: the source checkpoint's dtype.")
@click.option("--awq-group-size", default=128, show_default=True, type=POSITIVE,
              help="int4-wo / int4-awq: input channels sharing one scale (must divide each layer's inputs).")
@click.option("--smoothquant-alpha", default=0.5, show_default=True, type=UNIT,
              help="int8-sq: migration strength in [0, 1] (0: all on weights, 1: all on activations).")
@click.option("--to", "to", default="trtllm", show_default=True, help="Output format: trtllm, ft (MPT), mcore (Megatron-Core) or hf (e.g. back from Megatron-Core).")
@click.option("--no-parallel-embedding", is_flag=True, help="Replicate the embedding instead of splitting its rows.")
@click.option("--workers", default=1, show_default=True, type=POSITIVE, help="Tensors converted in parallel.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --dummy-weights.")
@click.option("--force", is_flag=True,
              help="Replace an existing --output-dir that holds an earlier trtlm output (never an input, "
                   "the current or home directory).")
@click.option("--ft-allow-lossy", is_flag=True,
              help="With --to ft: write even when the model uses settings FT cannot carry (dropped).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
def convert_cmd(model_dir, output_dir, family, preset, dummy_weights, dtype, tp_size, pp_size, moe_tp_size,
                moe_ep_size, moe_normalization_mode, quant, kv_cache_dtype, calib_data, calib_size,
                calib_max_seq_len, calibrator, calib_device, calib_dtype, awq_group_size, smoothquant_alpha, to,
                no_parallel_embedding, workers, allow_pickle, seed, force, ft_allow_lossy, quiet) -> None:
    """Convert a model into a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors).

    The output is written into a temporary sibling and renamed at the end: a failed run leaves
    nothing behind.  --force replaces only an earlier trtlm output, never the model itself.
    """
    from trtlm.errors import UserError
    from trtlm.fsutil import check_output_dir

    if model_dir is None and not (family and preset):
        raise UserError("give --model-dir, or --family and --preset with --dummy-weights")
    if model_dir is not None and preset:
        raise UserError("--preset replaces --model-dir; give one of them")
    if to != "mcore":  # Megatron's expert parallelism is its own dimension (tp x pp x ep ranks), not inside tp
        check_moe_sizes(tp_size, moe_tp_size, moe_ep_size)
    # Before any work: --force must never replace an input (or the current directory...).
    check_output_dir(output_dir, force, convert_inputs(model_dir, calib_data),
                     command="convert" if to == "trtllm" else None)

    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert

    options = ConvertOptions(
        dtype=dtype, tp_size=tp_size, pp_size=pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size,
        moe_normalization_mode=moe_normalization_mode, workers=workers,
        use_parallel_embedding=not no_parallel_embedding, dummy_weights=dummy_weights, allow_pickle=allow_pickle,
        to=to, force=force, seed=seed, quant=quant, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data,
        calib_size=calib_size, calib_max_seq_len=calib_max_seq_len, calibrator=calibrator,
        calib_device=calib_device, calib_dtype=calib_dtype, awq_group_size=awq_group_size,
        smoothquant_alpha=smoothquant_alpha, progress=not quiet and sys.stderr.isatty(),
        extra={"ft_allow_lossy": True} if ft_allow_lossy else {},
    )
    if quiet:
        options.extra["quiet"] = True
    result = convert(model_dir, output_dir, options, family=family, preset=preset)
    if to == "trtllm":
        mapping = result.config["mapping"]
        click.echo(f"{result.family}: wrote {result.num_tensors} tensors ({result.bytes_written / 1e6:.1f} MB) "
                   f"for tp={mapping['tp_size']} pp={mapping['pp_size']} to {output_dir}")
    else:
        click.echo(f"{result.family}: wrote {to} format to {output_dir}")


def convert_inputs(model_dir: Path | None, calib_data: Path | None) -> dict[str, Path | None]:
    """The paths a conversion reads, by option: what ``--output-dir`` must never replace."""
    calib = calib_data if calib_data is not None and Path(calib_data).exists() else None
    return {"--model-dir": model_dir, "--calib-data": calib}
