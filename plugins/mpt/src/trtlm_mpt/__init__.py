"""trtlm family plugin for MPT (MosaicML's ``MPTForCausalLM`` / transformers' ``MptForCausalLM``).

MPT differs from the Llama-style default in every layer: ALiBi instead of
rotary positions, LayerNorm without bias, a plain GELU MLP, an optional
``clip_qkv`` clamp of the fused qkv output, optional MQA/GQA through
llm-foundry's ``attn_config.kv_n_heads`` (never duplicated across ranks) and
tied embeddings.  It also has its own on-disk format beside Hugging Face:
FasterTransformer (FT) directories, which this plugin reads
(``trtlm convert --model-dir <ft dir>``) and writes (``--to ft``).

Hooks implemented (everything else is the core's default):

* ``trtlm_map_layers``: :func:`trtlm_mpt.plan.mpt_plan`;
* ``trtlm_load_weights``: FT directories (:mod:`trtlm_mpt.ft`, an implementation
  registered under the hook's name with ``specname``); HF ones go through the core's
  reader, and a wrapper (as Mixtral's) corrects what transformers' MPT saves declare;
* ``trtlm_export``: ``--to ft``;
* ``trtlm_build_network``: the core's Transformer with ``norm="layer"``.

This module is the entry point: it imports nothing heavy (no torch).
See docs/families/mpt.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trtlm import PLUGIN_API_VERSION, Capabilities, Family, hookimpl
from trtlm.family import ALL_QUANT

TRTLM_PLUGIN_API = PLUGIN_API_VERSION

_ATTN = {
    "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
    "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
    "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
}
_TINY = {
    "architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2,
    "expansion_ratio": 4, "max_seq_len": 256, "vocab_size": 1000, "no_bias": True, "layer_norm_epsilon": 1e-5,
    "learned_pos_emb": True, "logit_scale": None, "norm_type": "low_precision_layernorm",
    "attn_config": dict(_ATTN, clip_qkv=6.0), "bos_token_id": 0, "eos_token_id": 0, "dtype": "float32",
}
# mosaicml/mpt-7b's config.json (llm-foundry names; tokenizer: EleutherAI/gpt-neox-20b).
_7B = {
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
    "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "layer_norm_epsilon": 1e-5,
    "learned_pos_emb": True, "logit_scale": None, "norm_type": "low_precision_layernorm",
    "attn_config": dict(_ATTN), "dtype": "bfloat16",
}

FAMILY = Family(
    name="mpt",
    # "MPTForCausalLM" is what llm-foundry's remote-code checkpoints on the hub (mosaicml/mpt-*,
    # replit-code-v1_5) declare; "MptForCausalLM" is transformers' own class.
    hf_architectures=("MptForCausalLM", "MPTForCausalLM"),
    hf_model_types=("mpt",),
    # Both strings map to TensorRT-LLM's MPTForCausalLM class (models/__init__.py MODEL_MAP); trtlm
    # writes the class name, and reads either (modelopt writes the HF spelling).
    trtllm_architecture="MPTForCausalLM",
    trtllm_aliases=("MptForCausalLM",),
    capabilities=Capabilities(
        parallel=("tp", "pp"),
        quantization=ALL_QUANT,
        formats_in=("hf", "ft"),
        formats_out=("trtllm", "ft"),
    ),
    presets={"tiny": _TINY, "7b": _7B},
    description="MPT: ALiBi, LayerNorm without bias, GELU MLP, clip_qkv, MQA/GQA; reads and writes FasterTransformer",
)


@hookimpl
def trtlm_families() -> list[Family]:
    return [FAMILY]


@hookimpl
def trtlm_map_layers(family: Family, hf_config: dict[str, Any], options):
    from trtlm_mpt.plan import mpt_plan

    return mpt_plan(hf_config, options, architecture=family.trtllm_architecture)


@hookimpl(specname="trtlm_load_weights")
def trtlm_load_ft_weights(family: Family, model_dir: Path, options):
    """FasterTransformer directories; ``None`` for anything else (the core's reader takes it)."""
    from trtlm_mpt.io import load_ft

    return load_ft(Path(model_dir), options)


@hookimpl(wrapper=True)
def trtlm_load_weights(family: Family, model_dir: Path, options):
    """Whatever loader opened the directory (the core's safetensors/pickle reader for a Hugging
    Face one), correct ``no_bias`` for transformers' own MPT saves, which never hold biases."""
    loaded = yield
    if loaded is not None:
        from trtlm_mpt.io import fix_no_bias

        fix_no_bias(loaded, Path(model_dir), options)
    return loaded


@hookimpl
def trtlm_export(family: Family, fmt: str, loaded, options, output_dir: Path):
    if fmt != "ft":
        return None
    from trtlm_mpt.io import export_ft

    return export_ft(family, loaded, options, Path(output_dir))


@hookimpl
def trtlm_build_network(family: Family, config: dict[str, Any], backend: str, options):
    if backend != "torch":
        return None
    from functools import partial

    from trtlm.runtime.model import Transformer

    return partial(Transformer, config, norm="layer")
