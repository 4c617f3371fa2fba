"""``trtlm eval``: perplexity of an engine on a local text file (optionally next to transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from trtlm.commands.options import DEVICE


@click.command("eval")
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine built by `trtlm build`.")
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="A .txt file, or .jsonl with \"text\".")
@click.option("--hf-model-dir", type=click.Path(path_type=Path),
              help="Also score the same tokens with transformers' AutoModelForCausalLM from this directory.")
@click.option("--max-seq-len", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per chunk (>= 2: each chunk predicts its tokens after the first).")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the dataset.")
@click.option("--device", default="cpu", show_default=True, type=DEVICE, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(engine_dir, dataset, hf_model_dir, max_seq_len, max_tokens, device, as_json):
    """Perplexity on a local dataset (the role of TensorRT-LLM's summarize.py, without the hub)."""
    from trtlm.devices import resolve_device
    from trtlm.errors import UserError
    from trtlm.evaluate import evaluate
    from trtlm.modeldir import check_model_path

    check_model_path(engine_dir, "engine", "--engine-dir")
    if not dataset.is_file():
        raise UserError(f"--dataset {dataset}: no such file")
    if hf_model_dir is not None:
        check_model_path(hf_model_dir, "model", "--hf-model-dir")
    r = evaluate(engine_dir, dataset, hf_model_dir, max_seq_len, max_tokens, str(resolve_device(device)))
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    quant = r["quant_algo"] or "none"
    if r["kv_cache_quant_algo"]:
        quant += f" + {r['kv_cache_quant_algo']} KV"
    click.echo(f"{r['dataset']}: {r['trtlm']['tokens']} tokens scored in {r['chunks']} chunks of <= {r['max_seq_len']}")
    click.echo(f"trtlm ({quant}): perplexity {r['trtlm']['ppl']:.4f}")
    if "hf" in r:
        click.echo(f"transformers:      perplexity {r['hf']['ppl']:.4f}   (trtlm relative {r['relative_delta']:+.3%})")
