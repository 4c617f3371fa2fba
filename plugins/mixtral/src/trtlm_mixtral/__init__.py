"""trtlm family plugin for Mixtral (``MixtralForCausalLM``).

Mixtral is a Llama-style decoder (GQA, RoPE with base 1e6) whose feed-forward
is a sparse mixture of experts: a float32 router picks ``top_k`` of ``E``
SwiGLU experts per token.  TensorRT-LLM builds it with its LLaMA model class
and an MoE layer, so the plugin reuses the core's Llama mapping
(:func:`trtlm.llama.llama_plan`) and swaps in the MoE tensors
(:mod:`trtlm_mixtral.plan`).  Expert parallelism (``--moe-ep-size``) and
tensor parallelism inside experts (``--moe-tp-size``) are sharded by the core's
split rules (:class:`trtlm.layout.ExpertSplit`) and run by the core's runtime
MoE layer (:mod:`trtlm.runtime.moe`).

Hooks implemented here: ``trtlm_families``, ``trtlm_map_layers``, a
``trtlm_load_weights`` wrapper that records which of the two on-disk expert
layouts a checkpoint uses (see :mod:`trtlm_mixtral.plan`), and the
Megatron-Core pair ``trtlm_mcore_layout`` / ``trtlm_mcore_config`` (MoE names
and expert-parallel placement, :mod:`trtlm_mixtral.mcore`).

This module is the entry point: it imports nothing heavy (no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trtlm import PLUGIN_API_VERSION, Capabilities, Family, hookimpl
from trtlm.family import ALL_KV_QUANT, ALL_QUANT

TRTLM_PLUGIN_API = PLUGIN_API_VERSION

_TINY = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}
#: mistralai/Mixtral-8x7B-v0.1's config.json.
_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu", "router_aux_loss_coef": 0.02,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
}

FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    trtllm_architecture="MixtralForCausalLM",
    capabilities=Capabilities(
        parallel=("tp", "pp", "ep"),
        quantization=ALL_QUANT,
        kv_cache_quantization=ALL_KV_QUANT,
        formats_in=("hf", "mcore"),
        formats_out=("trtllm", "mcore", "hf"),
    ),
    presets={"tiny": _TINY, "8x7b": _8X7B},
    description="Mixtral: Llama-style decoder with a top-k routed sparse mixture of SwiGLU experts",
)


@hookimpl
def trtlm_families() -> list[Family]:
    return [FAMILY]


@hookimpl(wrapper=True)
def trtlm_load_weights(family: Family, model_dir: Path, options: Any):
    """Whatever loader opened the directory (the core's safetensors/pickle one by
    default), note its expert layout in the config so the plan names the tensors
    that are actually on disk."""
    loaded = yield
    if loaded is not None:
        from trtlm_mixtral.plan import LAYOUT_KEY, expert_layout

        loaded.hf_config = dict(loaded.hf_config, **{LAYOUT_KEY: expert_layout(loaded.source.keys())})
    return loaded


@hookimpl
def trtlm_map_layers(family: Family, hf_config: dict[str, Any], options: Any):
    from trtlm_mixtral.plan import mixtral_plan

    return mixtral_plan(hf_config, options, architecture=family.trtllm_architecture)


@hookimpl
def trtlm_mcore_layout(family: Family, hf_config: dict[str, Any], tp_size: int, pp_size: int, ep_size: int):
    """Megatron-Core names of the router and experts, experts placed on expert-parallel ranks
    (:mod:`trtlm_mixtral.mcore`); the core's Llama table for the rest."""
    from trtlm_mixtral.mcore import mixtral_layout

    return mixtral_layout(hf_config, tp_size, pp_size, ep_size)


@hookimpl
def trtlm_mcore_config(family: Family, args: dict[str, Any]):
    """Mixtral's config from Megatron MoE args (:func:`trtlm_mixtral.mcore.mixtral_hf_config`)."""
    from trtlm_mixtral.mcore import mixtral_hf_config

    return mixtral_hf_config(args, family)
