"""The Llama-style decoder mapping shared by Mistral, Mixtral and their kin.

RMSNorm, rotary position embedding, grouped-query attention and a gated
MLP: TensorRT-LLM builds all of these with its LLaMA model class, and the
HF -> TensorRT-LLM names below are the ones its ``models/llama/convert.py``
uses.  Families call :func:`llama_plan` and swap the MLP part
(``mlp_specs``) when their feed-forward differs (Mixtral's MoE).
"""
from __future__ import annotations

from typing import Any, Callable

from trtlm.convert.options import ConvertOptions
from trtlm.convert.plan import ConversionPlan, TensorSpec, concat_rows
from trtlm.errors import UserError
from trtlm.hf_config import require, rope_scaling, rope_theta

MlpSpecs = Callable[[int, dict[str, Any], dict[str, Any]], list[TensorSpec]]


def llama_dims(hf: dict[str, Any]) -> dict[str, int]:
    heads = int(require(hf, "num_attention_heads"))
    hidden = int(require(hf, "hidden_size"))
    return {
        "vocab": int(require(hf, "vocab_size")),
        "hidden": hidden,
        "layers": int(require(hf, "num_hidden_layers")),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_size": int(hf.get("head_dim") or hidden // heads),
        "inter": int(require(hf, "intermediate_size")),
    }


def gated_mlp_specs(i: int, hf: dict[str, Any], d: dict[str, Any]) -> list[TensorSpec]:
    """Dense SwiGLU MLP. TensorRT-LLM's naming is inverted: its ``fc`` is HF's
    gate_proj (the SiLU branch) and its ``gate`` is HF's up_proj."""
    p, t = f"model.layers.{i}.mlp.", f"transformer.layers.{i}.mlp."
    H, I = d["hidden"], d["inter"]
    return [
        TensorSpec(t + "fc.weight", (p + "gate_proj.weight",), ((I, H),), layer=i, quantizable=True),
        TensorSpec(t + "gate.weight", (p + "up_proj.weight",), ((I, H),), layer=i, quantizable=True),
        TensorSpec(t + "proj.weight", (p + "down_proj.weight",), ((H, I),), layer=i, quantizable=True),
    ]


def check_tp(d: dict[str, int], options: ConvertOptions, dense_mlp: bool = True) -> None:
    """Clear errors for a --tp-size the attention (and, when ``dense_mlp``, the MLP)
    cannot be split by.  MoE families check their experts against moe_tp/moe_ep
    themselves: with expert parallelism intermediate_size need not divide by tp."""
    tp = options.tp_size
    if d["heads"] % tp:
        raise UserError(f"--tp-size {tp} does not divide the model's {d['heads']} attention heads")
    kv = d["kv_heads"]
    if kv % tp and tp % kv:
        raise UserError(f"--tp-size {tp} and the model's {kv} KV heads: one must divide the other")
    if dense_mlp and d["inter"] % tp:
        raise UserError(f"--tp-size {tp} does not divide intermediate_size {d['inter']}")


def llama_plan(hf: dict[str, Any], options: ConvertOptions, architecture: str,
               mlp_specs: MlpSpecs = gated_mlp_specs, hidden_act: str = "silu",
               extra_config: dict[str, Any] | None = None) -> ConversionPlan:
    """TensorRT-LLM checkpoint plan for a Llama-style HF model."""
    d = llama_dims(hf)
    check_tp(d, options, dense_mlp=not (extra_config or {}).get("moe"))
    H, D, heads, kv = d["hidden"], d["head_size"], d["heads"], d["kv_heads"]
    tensors: list[TensorSpec] = [
        TensorSpec("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), ((d["vocab"], H),),
                   stage="first"),
    ]
    for i in range(d["layers"]):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        tensors += [
            TensorSpec(t + "input_layernorm.weight", (p + "input_layernorm.weight",), ((H,),), layer=i),
            TensorSpec(t + "attention.qkv.weight",
                       (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                       ((heads * D, H), (kv * D, H), (kv * D, H)), combine=concat_rows, layer=i, quantizable=True),
            TensorSpec(t + "attention.dense.weight", (p + "self_attn.o_proj.weight",), ((H, heads * D),),
                       layer=i, quantizable=True),
            TensorSpec(t + "post_layernorm.weight", (p + "post_attention_layernorm.weight",), ((H,),), layer=i),
        ]
        tensors += mlp_specs(i, hf, d)
    tensors.append(TensorSpec("transformer.ln_f.weight", ("model.norm.weight",), ((H,),), stage="last"))
    lm_source = "model.embed_tokens.weight" if hf.get("tie_word_embeddings") else "lm_head.weight"
    tensors.append(TensorSpec("lm_head.weight", (lm_source,), ((d["vocab"], H),), stage="last"))

    config: dict[str, Any] = {
        "architecture": architecture,
        "dtype": None,  # filled by the pipeline
        "logits_dtype": "float32",
        "vocab_size": d["vocab"],
        "hidden_size": H,
        "num_hidden_layers": d["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_size": D,
        "intermediate_size": d["inter"],
        "hidden_act": hidden_act,
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "rotary_base": rope_theta(hf, default=10000.0),
        "rotary_scaling": rope_scaling(hf),
        "rotary_pct": 1.0,
        "use_parallel_embedding": options.use_parallel_embedding,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "bias": False,
        "residual_mlp": False,
        "lm_head_bias": False,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) is not False:
        # TensorRT-LLM has no checkpoint key for Mistral's window: it is the runtime's
        # max_attention_window_size.  runtime_defaults is where TensorRT-LLM's
        # PretrainedConfig keeps runtime settings a checkpoint recommends; trtlm's
        # runtime reads it from there too.
        config["runtime_defaults"] = {"max_attention_window": [int(window)], "sink_token_length": None}
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    config["trtlm"] = {"bos_token_id": bos, "eos_token_id": eos}
    config.update(extra_config or {})
    return ConversionPlan(config=config, tensors=tensors)
