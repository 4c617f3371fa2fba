"""``trtlm build``: a TensorRT-LLM checkpoint -> an engine directory."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("build")
@click.option("--checkpoint-dir", required=True, type=click.Path(path_type=Path))
@click.option("--output-dir", required=True, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["torch", "tensorrt-llm"]), default="torch", show_default=True)
@click.option("--max-batch-size", default=8, show_default=True, type=int)
@click.option("--max-input-len", default=1024, show_default=True, type=int)
@click.option("--max-seq-len", type=int, help="Default: the model's max_position_embeddings.")
@click.option("--workers", default=1, show_default=True, type=int, help="Ranks prepared in parallel.")
@click.option("--force", is_flag=True, help="Replace a non-empty --output-dir.")
def build_cmd(checkpoint_dir, output_dir, backend, max_batch_size, max_input_len, max_seq_len, workers, force):
    """Check a checkpoint against the network and write an engine."""
    import warnings

    from trtlm.runtime.engine import BuildOptions, build

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = build(checkpoint_dir, output_dir, BuildOptions(backend, max_batch_size, max_input_len, max_seq_len,
                                                             workers, force))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(f"built {backend} engine in {output_dir} (max_batch_size={cfg['max_batch_size']}, "
               f"max_seq_len={cfg['max_seq_len']})")
