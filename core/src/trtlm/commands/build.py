"""``trtlm build``: a TensorRT-LLM checkpoint -> an engine directory."""
from __future__ import annotations

from pathlib import Path

import click

from trtlm.commands.options import POSITIVE


@click.command("build")
@click.option("--checkpoint-dir", required=True, type=click.Path(path_type=Path),
              help="TensorRT-LLM checkpoint written by `trtlm convert` (config.json + rank{r}.safetensors).")
@click.option("--output-dir", required=True, type=click.Path(path_type=Path),
              help="Where to write the engine; written atomically.")
@click.option("--backend", type=click.Choice(["torch", "tensorrt-llm"]), default="torch", show_default=True,
              help="torch: trtlm's portable runtime (CPU or GPU); tensorrt-llm: TensorRT-LLM's builder "
                   "(needs tensorrt_llm installed).")
@click.option("--max-batch-size", default=8, show_default=True, type=POSITIVE,
              help="Most sequences the engine runs at once; more prompts wait in a queue.")
@click.option("--max-input-len", default=1024, show_default=True, type=POSITIVE,
              help="Longest prompt (tokens) the engine accepts.")
@click.option("--max-seq-len", type=POSITIVE,
              help="Longest prompt + output (tokens). Default: the model's max_position_embeddings.")
@click.option("--workers", default=1, show_default=True, type=POSITIVE, help="Ranks prepared in parallel.")
@click.option("--force", is_flag=True,
              help="Replace an existing --output-dir that holds an earlier trtlm output (never the checkpoint, "
                   "the current or home directory).")
def build_cmd(checkpoint_dir, output_dir, backend, max_batch_size, max_input_len, max_seq_len, workers, force):
    """Check a checkpoint against the network and write an engine."""
    import warnings

    from trtlm.errors import UserError
    from trtlm.fsutil import check_output_dir

    if max_seq_len is not None and max_input_len > max_seq_len:
        raise UserError(f"--max-input-len {max_input_len} is longer than --max-seq-len {max_seq_len}")
    check_output_dir(output_dir, force, {"--checkpoint-dir": checkpoint_dir}, command="build")
    from trtlm.build import BuildOptions, build

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = build(checkpoint_dir, output_dir, BuildOptions(
            backend=backend, max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
            workers=workers, force=force))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(f"built {backend} engine in {output_dir} (max_batch_size={cfg['max_batch_size']}, "
               f"max_seq_len={cfg['max_seq_len']})")
