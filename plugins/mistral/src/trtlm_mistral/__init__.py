"""trtlm family plugin for Mistral (``MistralForCausalLM``).

Mistral is a Llama-style decoder with grouped-query attention and
sliding-window attention.  The core's default hook implementations (the
Llama mapping in :mod:`trtlm.llama`, which carries ``sliding_window`` into
``runtime_defaults``, safetensors loading, rule-driven sharding and the
generic runtime) cover it completely, so this plugin only declares the
family: what it handles, its capabilities and its presets.

This module is the entry point: it imports nothing heavy.
"""
from __future__ import annotations

from trtlm import PLUGIN_API_VERSION, Capabilities, Family, hookimpl
from trtlm.family import ALL_KV_QUANT, ALL_QUANT

TRTLM_PLUGIN_API = PLUGIN_API_VERSION

_TINY = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "sliding_window": 32, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}
_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "dtype": "bfloat16",
}

FAMILY = Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    trtllm_architecture="MistralForCausalLM",
    capabilities=Capabilities(
        parallel=("tp", "pp"),
        quantization=ALL_QUANT,
        kv_cache_quantization=ALL_KV_QUANT,
        formats_in=("hf", "mcore"),
        formats_out=("trtllm", "mcore", "hf"),
    ),
    presets={"tiny": _TINY, "7b": _7B},
    description="Mistral: Llama-style decoder with GQA and sliding-window attention",
)


@hookimpl
def trtlm_families() -> list[Family]:
    return [FAMILY]

