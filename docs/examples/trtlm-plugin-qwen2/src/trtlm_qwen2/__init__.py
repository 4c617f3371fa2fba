"""trtlm family plugin for Qwen2 (``Qwen2ForCausalLM``).

Qwen2 is the Llama layout plus biases on the q, k and v projections (the
output projection and the MLP have none).  The core's Llama mapping does
everything else, so this plugin implements one hook: ``trtlm_map_layers``
calls :func:`trtlm.llama.llama_plan` and adds the fused ``qkv.bias`` — the
split rule for ``attention.qkv.bias`` (by heads, like the weight) comes from
the core's layout table, so sharding and merging need no code here.
"""
from __future__ import annotations

from typing import Any

from trtlm import PLUGIN_API_VERSION, Capabilities, Family, hookimpl

TRTLM_PLUGIN_API = PLUGIN_API_VERSION

TINY = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}

FAMILY = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    trtllm_architecture="Qwen2ForCausalLM",
    capabilities=Capabilities(parallel=("tp", "pp")),
    presets={"tiny": TINY},
    description="Qwen2: Llama layout with q/k/v biases",
)


@hookimpl
def trtlm_families() -> list[Family]:
    return [FAMILY]


@hookimpl
def trtlm_map_layers(family: Family, hf_config: dict[str, Any], options: Any):
    from trtlm.convert.plan import TensorSpec, concat_rows
    from trtlm.llama import llama_dims, llama_plan

    # TensorRT-LLM's Qwen model reads qwen_type; trtlm's runtime reads attn_bias / dense_bias.
    plan = llama_plan(hf_config, options, architecture=family.trtllm_architecture,
                      extra_config={"qwen_type": "qwen2", "attn_bias": True, "dense_bias": False})
    d = llama_dims(hf_config)
    q, kv = d["heads"] * d["head_size"], d["kv_heads"] * d["head_size"]
    for i in range(d["layers"]):
        p = f"model.layers.{i}.self_attn."
        plan.tensors.append(TensorSpec(
            f"transformer.layers.{i}.attention.qkv.bias",
            sources=(p + "q_proj.bias", p + "k_proj.bias", p + "v_proj.bias"),
            shapes=((q,), (kv,), (kv,)), combine=concat_rows, layer=i))
    return plan
